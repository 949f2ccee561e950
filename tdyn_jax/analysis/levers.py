"""The outlier levers of He et al. (2024) tested on a sweep: per-run outlier summaries of the residual
stream, and paired comparisons that change one factor and keep the others."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.verdicts import Check, Claim, share
from tdyn_jax.analysis.views import scalar

KIND = "resid/out"
FACTORS = ("lr", "eps", "norm")  # the sweep's factors; norm is pre | post | none
MIN_PAIRS = 2  # fewer comparable pairs decide nothing


def kurtosis_series(captures: Captures, stat: str = "rms_kurtosis") -> pd.Series:
    """The largest `stat` over the layers of the residual stream at each capture step."""
    return scalar(captures, KIND, stat).max(axis=0)


def run_summary(captures: Captures, metrics: pd.DataFrame) -> dict[str, float]:
    """Peak (over captures) and final values of the residual stream's largest-over-layers RMS kurtosis
    (He et al.), excess kurtosis, and total LLM.int8 outlier channels; the final train and validation
    loss. A run whose loss is not finite at the end counts as diverged: its outlier figures are nan."""
    loss = float(metrics.loss.iloc[-1]) if len(metrics) else float("nan")
    val = metrics.val_loss.dropna() if "val_loss" in metrics else pd.Series(dtype=float)
    out = {"final_loss": loss, "val_loss": float(val.iloc[-1]) if len(val) else float("nan")}
    figures = {
        "rms_kurtosis": kurtosis_series(captures, "rms_kurtosis"),
        "kurtosis": kurtosis_series(captures, "kurtosis"),
        "outlier_channels": scalar(captures, KIND, "int8_outlier_channels").sum(axis=0),
    }
    for name, series in figures.items():
        diverged = not np.isfinite(loss) or series.empty
        out[f"peak_{name}"] = float("nan") if diverged else float(series.max())
        out[f"final_{name}"] = float("nan") if diverged else float(series.iloc[-1])
    return out


def paired_share(
    table: pd.DataFrame, factor: str, raising: object, lowering: object, metric: str
) -> tuple[float, int]:
    """Over the pairs of runs that differ only in `factor` (`raising` vs `lowering`): (share of pairs where
    the `raising` run has the larger finite `metric`, pairs compared). Share is nan below MIN_PAIRS."""
    others = [f for f in FACTORS if f != factor]
    wins: list[bool] = []
    if raising == lowering:  # the sweep did not vary this factor
        return float("nan"), 0
    for _, group in table.groupby(others):
        up, down = group[group[factor] == raising][metric], group[group[factor] == lowering][metric]
        if len(up) == 1 and len(down) == 1 and np.isfinite(up.iloc[0]) and np.isfinite(down.iloc[0]):
            wins.append(bool(up.iloc[0] > down.iloc[0]))
    return (share(wins) if len(wins) >= MIN_PAIRS else float("nan")), len(wins)


def lever_claims(table: pd.DataFrame) -> list[Claim]:
    """One claim per lever: core check, the share of pairs where the lever raises the peak RMS kurtosis
    (>= 0.75); second check, the same for the final RMS kurtosis (>= 0.75). The learning rate and epsilon
    levers compare the sweep's largest and smallest values."""
    lrs, epss = sorted(table.lr.unique()), sorted(table.eps.unique())
    levers = [
        (
            "lr",
            f"a larger learning rate ({lrs[-1]:g} vs {lrs[0]:g}) raises the kurtosis",
            "lr",
            lrs[-1],
            lrs[0],
        ),
        ("eps", f"a smaller Adam epsilon ({epss[0]:g} vs {epss[-1]:g}) raises it", "eps", epss[0], epss[-1]),
        ("pre", "pre-norm raises it over post-norm", "norm", "pre", "post"),
        ("none", "removing the norms lowers it (vs pre-norm)", "norm", "pre", "none"),
    ]
    claims = []
    for key, statement, factor, raising, lowering in levers:
        checks = []
        for when in ("peak", "final"):
            value, pairs = paired_share(table, factor, raising, lowering, f"{when}_rms_kurtosis")
            checks.append(
                Check(
                    f"share of pairs where {factor}={raising} has the larger {when} RMS kurtosis than"
                    f" {factor}={lowering}",
                    value,
                    ">=",
                    0.75,
                    f"{pairs} comparable pairs",
                )
            )
        claims.append(Claim(key, statement, tuple(checks)))
    return claims
