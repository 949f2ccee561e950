"""Metric writers: WORKDIR/metrics.jsonl (cut back on resume), the log, optional TensorBoard.

metrics.jsonl is strict JSON, one object per logged step: {"step": int, metric: number or null}; a
non-finite value (a run that diverged, see `train.nonfinite`) is null."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import logging


def _row(line: bytes) -> dict | None:
    """The metrics row of one line: a JSON object with an integer "step", or None (junk)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return row if isinstance(step, int) and not isinstance(step, bool) else None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(rows, dropped): the readable rows of a metrics JSON-lines file (JSON objects with an integer
    "step") and the number of other non-empty lines (a line cut short by a crash, bytes that are not
    UTF-8, JSON that is not such an object)."""
    rows, dropped = [], 0
    for line in path.read_bytes().splitlines() if path.exists() else []:
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif line.strip():
            dropped += 1
    return rows, dropped


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the readable rows with step <= last_step (drops what was written after the checkpoint a
    run resumes from); unreadable lines are dropped with one warning."""
    if not path.exists():
        return
    rows, dropped = read_jsonl(path)
    if dropped:
        logging.warning("%s: dropped %d unreadable line(s) (not a JSON object with a step)", path, dropped)
    kept = [_dumps(row) for row in rows if row["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _dumps(row: dict) -> str:
    """Strict JSON: a non-finite number (nan, inf) is written as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


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
        self.file.write(_dumps(row) + "\n")
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
