"""Entry point: python run.py --config=configs/small.py [--config.x=y] [--workdir=DIR]."""

from __future__ import annotations

import logging as std_logging
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from tdyn_jax.cli import fail, refuse_extra_args

flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>); rerun to resume.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/small.py.")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (bad flag, unknown config field, bad file) are one line, exit 2."""
    config_args = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not config_args:
        fail("--config is required, e.g. --config=configs/small.py")
    try:
        rest = flags.FLAGS(argv)
        _ = flags.FLAGS.config.name  # loads the config file now, so its errors surface here
    except flags.Error as e:
        fail(f"{e}")
    except (AttributeError, KeyError) as e:
        field = str(e).strip("\"'")
        culprit = next((a for a in argv if a.startswith("--config.") and f".{field}" in a), field)
        fail(f"unknown config field in {culprit}: configs/base.py lists the fields")
    except OSError as e:
        fail(f"cannot load the config file {config_args[-1]} ({type(e).__name__}): check the path")
    return rest


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
    """Keeps the log to this package's lines, plus warnings and errors from libraries."""
    return record.levelno >= std_logging.WARNING or "/tdyn_jax/" in record.pathname


def main(argv: list[str]) -> int:
    """Trains or resumes the configured run; user mistakes exit 2 with one line."""
    refuse_extra_args(argv)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    import jax

    from tdyn_jax.config import ConfigError
    from tdyn_jax.data import DataError
    from tdyn_jax.train import train

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or f"runs/{cfg.name}"
    try:
        final = train(cfg, workdir)
    except (ConfigError, DataError) as e:
        fail(str(e))
    logging.info("finished %s: %s", workdir, final)
    print(f"run directory: {workdir}")
    if cfg.analysis.report and final.get("step") == cfg.train.num_steps and jax.process_index() == 0:
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
        workdir, a.kinds, criterion=a.criterion, workers=a.workers, progress=sys.stderr.isatty()
    )
    print(f"report: {page} (open it in a browser)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
