"""What happened in a run, in a few lines for the top of its report: the loss, the heaviest-tailed
sites, when the residual stream turned logistic, the best and worst low-precision format, and any
non-finite values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tdyn_jax.analysis.findings import logistic_onset
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.views import kind_sites

TREES = ("params/", "grads/", "updates/", "nu/")  # parameter-tree sites, apart from activations
DERIVED = ("a_norm", "w_norm", "E", "R", "lowprec")  # parts of a matmul site computed from its tensors
HEAVIEST = 3  # sites named in the heavy-tails line
RESIDUAL = "resid/out"


def loss_line(metrics: pd.DataFrame) -> str:
    """'<first> at step <s> -> <last> at step <t>; validation <v> at step <u>'."""
    if metrics.empty or "loss" not in metrics:
        return "no metrics logged"
    rows = metrics.dropna(subset=["loss"])
    if rows.empty:
        return "no finite loss logged"
    first, last = rows.iloc[0], rows.iloc[-1]
    text = f"{first.loss:.4f} at step {first.step:.0f} -> {last.loss:.4f} at step {last.step:.0f}"
    val = metrics.dropna(subset=["val_loss"]) if "val_loss" in metrics else pd.DataFrame()
    if len(val):
        text += f"; validation {val.val_loss.iloc[-1]:.4f} at step {val.step.iloc[-1]:.0f}"
    return text


def heaviest(captures: Captures, count: int = HEAVIEST) -> pd.DataFrame:
    """The `count` activation or activation-gradient sites with the largest excess kurtosis at any
    capture: columns site, step, kurtosis (largest first)."""
    t = captures.table
    rows = t[(t.stat == "kurtosis") & np.isfinite(t.value)]
    tensor = ~rows.site.str.startswith(TREES) & ~rows.site.str.rsplit("/", n=1).str[-1].isin(DERIVED)
    rows = rows[tensor].sort_values("value", ascending=False).drop_duplicates("site")
    return rows.head(count)[["site", "step", "value"]].rename(columns={"value": "kurtosis"})


def logistic_line(captures: Captures, fits: pd.DataFrame) -> str:
    """When the residual stream's fits turned logistic (AIC), from `findings.logistic_onset`."""
    onset = logistic_onset(fits, kind_sites(captures, RESIDUAL, "sample"))
    if not onset:
        return f"{RESIDUAL} not captured with samples"
    held = {site: step for site, step in onset.items() if step is not None}
    if not held:
        return f"Gaussian as good as logistic at the last capture in all {len(onset)} layers"
    first = min(held.values())
    return f"from step {first} (first layer), logistic at the end in {len(held)} of {len(onset)} layers"


def lowprec_line(captures: Captures) -> str:
    """The best and worst format for computing C: the median over matmuls of gemm/.../rel_err at the
    last capture."""
    t = captures.table
    last = t[(t.step == t.step.max()) & t.site.str.endswith("/lowprec") & t.stat.str.startswith("gemm/")]
    errors = last[last.stat.str.endswith("/rel_err")].groupby("stat").value.median().dropna()
    if errors.empty:
        return "no low-precision statistics captured"
    name = lambda stat: stat.removeprefix("gemm/").removesuffix("/rel_err")
    best, worst = errors.idxmin(), errors.idxmax()
    return (
        f"best {name(best)} (median relative error of C {errors[best]:.3g}), worst {name(worst)}"
        f" ({errors[worst]:.3g}), over {last.site.nunique()} matmuls at step {t.step.max()}"
    )


def nonfinite_line(captures: Captures, metrics: pd.DataFrame) -> str:
    """Logged steps whose loss or gradient norm is not finite, and captures with non-finite values."""
    parts = []
    for column in ("loss", "grad_norm"):
        if column in metrics:
            bad = metrics.step[metrics[column].isna() | ~np.isfinite(metrics[column].astype(float))]
            if len(bad):
                parts.append(f"{column} not finite at logged steps {', '.join(str(s) for s in bad)}")
    t = captures.table
    bad = t[(t.stat == "nonfinite") & (t.value > 0)]
    if len(bad):
        parts.append(f"non-finite values at {bad.site.nunique()} sites from step {bad.step.min()}")
    return "; ".join(parts) if parts else "none"


def summary(captures: Captures, fits: pd.DataFrame, metrics: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, text) lines of what happened in the run."""
    heavy = heaviest(captures)
    tails = "; ".join(f"{r.site}: {r.kurtosis:.3g} at step {r.step}" for r in heavy.itertuples())
    return [
        ("loss", loss_line(metrics)),
        ("heaviest tails (excess kurtosis)", tails or "no kurtosis captured"),
        (f"{RESIDUAL} turns logistic", logistic_line(captures, fits)),
        ("low precision, computing C", lowprec_line(captures)),
        ("non-finite", nonfinite_line(captures, metrics)),
    ]
