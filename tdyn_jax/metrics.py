"""Metric writers: WORKDIR/metrics.jsonl (cut back on resume), the log, optional TensorBoard."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import logging


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file; a line cut short (a crash while writing) is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the complete lines with step <= last_step (drops what was written after the checkpoint a
    run resumes from, and a line cut short by a crash)."""
    if not path.exists():
        return
    kept = [json.dumps(row) for row in read_jsonl(path) if row["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON line per logged step and echoes it (to the log, or above a progress bar)."""

    def __init__(
        self,
        workdir: Path,
        start_step: int,
        tensorboard: bool,
        echo: Callable[[str], None] = logging.info,
    ):
        self.active = jax.process_index() == 0  # process 0 writes for all
        self.echo = echo
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not self.active:
            return
        truncate_jsonl(self.path, start_step)
        self.file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=start_step + 1)

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Records `values` for `step` in every sink."""
        if not self.active:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.echo(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        """Flushes and closes every sink."""
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
