"""Entry point: python run.py --config=configs/small.py [--config.x=y] [--workdir=DIR]."""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>); rerun to resume.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/small.py.")
flags.mark_flags_as_required(["config"])


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
    """Keeps the log to this package's lines, plus warnings and errors from libraries."""
    return record.levelno >= std_logging.WARNING or "/tdyn_jax/" in record.pathname


def main(argv: list[str]) -> int:
    """Validates the config, then trains or resumes; user mistakes exit 2 with one line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from tdyn_jax.config import ConfigError
    from tdyn_jax.data import DataError
    from tdyn_jax.train import train

    logging.get_absl_handler().addFilter(_quiet_libraries)
    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or f"runs/{cfg.name}"
    try:
        final = train(cfg, workdir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.info("finished %s: %s", workdir, final)
    print(f"run directory: {workdir}")
    return 0


if __name__ == "__main__":
    app.run(main)
