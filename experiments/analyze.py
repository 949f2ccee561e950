"""Analyse a run directory: python experiments/analyze.py --workdir=W [--sites=a,b] [--steps=0,100].

Writes W/analysis/fits.csv, the figures and animations, and W/analysis/report.html, then prints the
page's path. Works on a run that is still training (it reads the finished captures). Figure choices
default to the run's own config (section analysis); the flags override them.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from configs import base
from tdyn_jax import cli
from tdyn_jax.cli import fail

flags.DEFINE_string("workdir", None, "Run directory to analyse.")
flags.DEFINE_list("sites", None, "Only these sites (fnmatch patterns, with or without the layer).")
flags.DEFINE_list("steps", None, "Only these capture steps.")
flags.DEFINE_list("kinds", None, "Sites (without the layer) to draw; default: the run's analysis.kinds.")
flags.DEFINE_enum("criterion", None, ["aic", "bic"], "Best-family criterion; default: the run's.")
flags.DEFINE_enum("reference", None, ["none", "pythia"], "Compare with Pythia's weights; default: the run's.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    from tdyn_jax.analysis.load import CapturesError
    from tdyn_jax.analysis.report import write_report

    workdir = cli.run_directory(flags.FLAGS.workdir)
    saved = json.loads((workdir / "config.json").read_text()).get("analysis", {})
    defaults = base.get_config().analysis
    try:
        steps = [int(s) for s in flags.FLAGS.steps] if flags.FLAGS.steps else None
    except ValueError:
        fail(f"--steps={','.join(flags.FLAGS.steps)} must be step numbers, e.g. --steps=0,100")
    try:
        page = write_report(
            workdir,
            flags.FLAGS.kinds or saved.get("kinds", defaults.kinds),
            sites=flags.FLAGS.sites,
            steps=steps,
            criterion=flags.FLAGS.criterion or saved.get("criterion", defaults.criterion),
            workers=saved.get("workers", defaults.workers),
            progress=sys.stderr.isatty(),
            require_kinds=bool(flags.FLAGS.kinds),
            reference=flags.FLAGS.reference or saved.get("reference", defaults.reference),
        )
    except (CapturesError, ValueError) as e:
        fail(str(e))
    print(f"report: {page}")


if __name__ == "__main__":
    cli.run(main)
