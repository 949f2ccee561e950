"""Runs trained in simulated low precision, compared with float32: loss gaps, divergence and the
residual stream's outliers per format, and the E/R-split GEMM judged against absmax scaling."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tdyn_jax.analysis.levers import kurtosis_series
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.verdicts import Check, Claim

REFERENCE = "float32"  # the run every gap is measured against
DIVERGED_GAP = 1.0  # nats above the reference's loss at the same logged step that count as diverged
# (E/R-split run, the run with the same element format under absmax per-row/column scaling)
ER_PAIRS = (
    ("er_fp4", "fp4_channel"),
    ("er_fp8", "fp8_channel"),
    ("er_fp4_bwd", "fp4_channel_bwd"),
    ("er_fp8_bwd", "fp8_channel_bwd"),
)
ER_STATEMENT = (
    "computing C as E ⊙ R (directions quantised, E exact: the E/R-split GEMM) trains closer to float32"
    " than the same format scaled per row and column by absmax"
)


def divergence_step(metrics: pd.DataFrame, reference: pd.DataFrame, stopped_at: int | None) -> float:
    """The first logged step whose loss is not finite or exceeds the reference run's loss at that step by
    more than DIVERGED_GAP nats, or the step a non-finite loss stopped the run at; nan if neither."""
    steps = []
    if stopped_at is not None:
        steps.append(stopped_at)
    if len(metrics):
        ref = reference.set_index("step").loss.reindex(metrics.step).to_numpy()
        loss = metrics.loss.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(loss) | (loss > ref + DIVERGED_GAP)
        if bad.any():
            steps.append(int(metrics.step.to_numpy()[bad.argmax()]))
    return float(min(steps)) if steps else float("nan")


def run_summary(
    captures: Captures, metrics: pd.DataFrame, reference: pd.DataFrame, stopped_at: int | None = None
) -> dict[str, float]:
    """Final train and validation loss, their gaps to the reference run's, the divergence step, and the
    residual stream's peak (over captures) and final largest-over-layers RMS kurtosis and peak
    massive-activation ratio (largest |x| / median |x|)."""
    last = lambda frame, col: (
        float(frame[col].dropna().iloc[-1]) if col in frame and frame[col].notna().any() else np.nan
    )
    out = {"final_loss": last(metrics, "loss"), "val_loss": last(metrics, "val_loss")}
    out["loss_gap"] = out["final_loss"] - last(reference, "loss")
    out["val_gap"] = out["val_loss"] - last(reference, "val_loss")
    out["diverged_at"] = divergence_step(metrics, reference, stopped_at)
    kurt = kurtosis_series(captures)
    out["peak_rms_kurtosis"] = float(kurt.max()) if len(kurt) else np.nan
    out["final_rms_kurtosis"] = float(kurt.iloc[-1]) if len(kurt) else np.nan
    ratios = captures.arrays.get("massive_ratio")
    out["peak_massive_ratio"] = float(np.nanmax(ratios.values)) if ratios is not None else np.nan
    return out


def er_claim(table: pd.DataFrame) -> Claim:
    """(er): one check per pair of ER_PAIRS, the E/R-split run's validation-loss gap to float32 minus
    that of the same element format with absmax channel scaling (<= 0: the split trains at least as
    close). The core is 4-bit forward only, where the scale matters most. A diverged run's gap counts
    as DIVERGED_GAP; a missing run, or both runs diverged, makes the check not measurable."""
    rows = table.set_index("run")
    checks = []
    for er, channel in ER_PAIRS:
        gaps, notes = [], []
        for run in (er, channel):
            diverged = np.isfinite(rows.diverged_at.get(run, np.nan))
            gaps.append(DIVERGED_GAP if diverged else rows.val_gap.get(run, np.nan))
            notes.append(
                f"{run} diverged at step {rows.diverged_at[run]:.0f}"
                if diverged
                else f"{run} {gaps[-1]:+.3f} nats"
            )
        both = all(np.isfinite(rows.diverged_at.get(run, np.nan)) for run in (er, channel))
        checks.append(
            Check(
                f"validation-loss gap to float32 of {er} minus that of {channel}",
                float("nan") if both else float(gaps[0] - gaps[1]),
                "<=",
                0.0,
                ", ".join(notes),
            )
        )
    return Claim("er", ER_STATEMENT, tuple(checks))
