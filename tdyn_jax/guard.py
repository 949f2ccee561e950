"""What a run does at a non-finite loss or gradient norm: `train.nonfinite` = stop | skip | ignore.

The step itself skips (`make_train_step`: with `skip`, a non-finite step leaves the parameters and the
optimizer state as they were and reports `skipped`); this guard reads the metrics of every step once,
on the host, before each log line and each checkpoint, and says where the run must stop.
"""

from __future__ import annotations

import math

EXIT_CODE = 3  # the exit code of a run stopped by the guard (a user mistake exits 2)


class NonFiniteStop(Exception):
    """The run stopped at step `step` (train.nonfinite); the message says where it is and how to go on."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NonFiniteGuard:
    """Tells, from the metrics of each step in order, the step at which the run stops."""

    def __init__(self, mode: str, max_skipped: int):
        self.mode, self.max_skipped, self.in_a_row = mode, max_skipped, 0

    def check(self, rows: list[tuple[int, dict[str, float]]]) -> tuple[int, str] | None:
        """(step, reason) of the first of `rows` ((step, metrics), each passed once) that stops the
        run: under `stop` a non-finite loss or grad_norm, under `skip` the max_skipped-th skipped
        step in a row; None if none does."""
        for step, metrics in rows:
            if self.mode == "stop":
                bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])), None)
                if bad:
                    return step, f"non-finite {bad} ({metrics[bad]})"
            elif self.mode == "skip":
                self.in_a_row = self.in_a_row + 1 if metrics["skipped"] else 0
                if self.in_a_row >= self.max_skipped:
                    return step, f"{self.in_a_row} non-finite steps in a row (train.max_skipped)"
        return None
