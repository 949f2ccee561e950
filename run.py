"""Entry point: python run.py --config=configs/small.py [--config.x=y] [--workdir=DIR]."""

from __future__ import annotations

import sys

from tdyn_jax.cli import quit_on_interrupt

quit_on_interrupt()  # before the libraries load: Ctrl-C from the first moment is one line, exit 130

from pathlib import Path  # noqa: E402

import ml_collections  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tdyn_jax import cli  # noqa: E402
from tdyn_jax.cli import fail  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>); rerun to resume.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/small.py.")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
    """`cli.parse_flags`, with --config required (one line, exit 2)."""
    if not any(a.startswith("--config=") for a in argv):
        fail("--config is required, e.g. --config=configs/small.py")
    return cli.parse_flags(argv)


def main(argv: list[str]) -> int:
    """Trains or resumes the configured run; user mistakes exit 2 with one line."""
    import jax

    from tdyn_jax.checkpoint import CheckpointError
    from tdyn_jax.config import ConfigError
    from tdyn_jax.data import DataError
    from tdyn_jax.guard import EXIT_CODE, NonFiniteStop
    from tdyn_jax.train import train

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or f"runs/{cfg.name}"
    try:
        final = train(cfg, workdir)
    except (ConfigError, DataError, CheckpointError) as e:
        fail(str(e))
    except NonFiniteStop as e:
        print(f"run directory: {workdir}")
        if cfg.analysis.report and jax.process_index() == 0:
            write_analysis(cfg, workdir)  # what was captured before the blow-up
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CODE
    logging.info("finished %s: %s", workdir, final)
    print(f"run directory: {workdir}")
    finished = final["step"] >= cfg.train.num_steps and jax.process_index() == 0
    if cfg.analysis.report and finished:
        if "loss" in final:  # trained in this invocation
            write_analysis(cfg, workdir)
        elif not (Path(workdir) / "analysis" / "report.html").exists():
            print("the run is finished but its report is missing: writing it")
            write_analysis(cfg, workdir)
    return 0


def write_analysis(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the run's report (analysis.report) and prints where it is."""
    if not cfg.probes.enabled:
        logging.info("probes.enabled=False: no captures, so no report")
        return
    from tdyn_jax.analysis.report import write_report

    a = cfg.analysis
    page = write_report(
        workdir,
        a.kinds,
        criterion=a.criterion,
        workers=a.workers,
        progress=sys.stderr.isatty(),
        reference=a.reference,
    )
    print(f"report: {page} (open it in a browser)")


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
