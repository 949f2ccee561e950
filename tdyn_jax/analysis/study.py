"""What the experiment scripts share: how long a run trained and the machine it ran on."""

from __future__ import annotations

import os
import platform

import jax
import numpy as np
import pandas as pd


def training_seconds(metrics: pd.DataFrame) -> float:
    """Seconds a run spent in its train steps and compiles, from its own metrics.jsonl: each logged
    interval's mean step time times its steps, plus the compile times (evaluations are left out)."""
    if metrics.empty or "step_time_s" not in metrics:
        return float("nan")
    steps = np.diff(np.concatenate([[0], metrics.step.to_numpy()]))
    compile_s = metrics.compile_s.fillna(0).sum() if "compile_s" in metrics else 0.0
    return float(np.nansum(steps * metrics.step_time_s.to_numpy()) + compile_s)


def machine() -> str:
    """'<cpu count> CPU cores (<processor>), JAX <version> on <platform>'."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), JAX {jax.__version__} on {jax.device_count()} x {kind}"
