"""What the study scripts share: how long a run trained, the machine it ran on, publishing a page."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from tdyn_jax.analysis.report import write_atomic
from tdyn_jax.analysis.verdicts import Claim


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


def markdown_table(table: pd.DataFrame) -> str:
    """`table` as a markdown table, floats to 3 significant digits."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_table(found: list[Claim]) -> pd.DataFrame:
    """One row per check of each claim: claim, verdict, measure, value, sense, threshold, holds, detail."""
    return pd.DataFrame(
        [
            {"claim": c.key, "verdict": c.verdict, "measure": k.measure, "value": k.value, "sense": k.sense}
            | {"threshold": k.threshold, "holds": k.holds, "detail": k.detail}
            for c in found
            for k in c.checks
        ]
    )


def publish(path: Path, page: str, found: list[Claim]) -> None:
    """Writes the results page atomically and prints each claim's verdict and the page's path."""
    write_atomic(path, page)
    for claim in found:
        print(f"({claim.key}) {claim.verdict}: {claim.statement}")
    print(f"results: {path}")
