"""Claim (a)'s tail part measured on real Pythia training and on any run of the project, by one set of
rules over a tidy table of weight tail ratios (matrix, n, progress, tail_ratio).

Progress is the fraction of the run's training (Pythia: step / 143000). The Gaussian bulk of claim (a)
cannot be measured from Pythia's published statistics (no samples), so only the tails and their timing
are judged here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tdyn_jax.analysis.claims import EARLY, gaussian_max
from tdyn_jax.analysis.verdicts import Check, Claim
from tdyn_jax.reference import PYTHIA_SIZES, pythia, pythia_elements

SHARP_WINDOW = 0.05  # a change is sharp when most of it happens within this fraction of training
SHARP_SHARE = 0.5
TAILS_SHARE = 0.5  # as claim (a): at least half the matrices above the Gaussian reference at the end
EARLY_SHARE = 0.5  # as claim (a): the median matrix has made half its change by the end of EARLY
STATEMENT = "weight tails grow beyond a Gaussian's, with a sharp change early in training"


def pythia_tails(size: str) -> pd.DataFrame:
    """Pythia `size`'s weight matrices as a tail table: matrix ('<module>/layer_NN'), n, step,
    progress, tail_ratio = max / std (see PROVENANCE.md for why max / std)."""
    stats = (
        pythia(size)
        .pivot_table(index=["module", "layer", "step", "progress"], columns="stat", values="value")
        .reset_index()
    )
    return pd.DataFrame(
        {
            "matrix": stats.module + "/layer_" + stats.layer.map("{:02d}".format),
            "n": stats.module.map(lambda m: pythia_elements(size, m)),
            "step": stats.step,
            "progress": stats.progress,
            "tail_ratio": stats["max"] / stats["std"],
        }
    )


def _sharp_share(progress: np.ndarray, ratio: np.ndarray, change: float) -> float:
    """The largest rise of `ratio` between two points at most SHARP_WINDOW of training apart, as a
    share of the whole change (signed like it)."""
    best = 0.0
    for i in range(len(progress)):
        j = np.searchsorted(progress, progress[i] + SHARP_WINDOW + 1e-12, side="right")
        best = max(best, float(np.max((ratio[i:j] - ratio[i]) * np.sign(change))))
    return best / abs(change)


def tail_measures(tails: pd.DataFrame) -> pd.DataFrame:
    """Per matrix: n, the first and last tail ratio, the Gaussian 99% reference for n, whether the last
    is above it, the progress of the largest change between consecutive points, the share of the whole
    change (first to last) reached by the end of EARLY, and the sharp share (see `_sharp_share`)."""
    rows = []
    for matrix, frame in tails.sort_values("progress").groupby("matrix", sort=True):
        progress, ratio = frame.progress.to_numpy(), frame.tail_ratio.to_numpy()
        n = int(frame.n.iloc[0])
        reference = gaussian_max(n)
        change = ratio[-1] - ratio[0]
        early = ratio[progress <= EARLY][-1] if (progress <= EARLY).any() else np.nan
        moved = change != 0 and len(ratio) > 1
        largest = progress[1:][np.argmax(np.abs(np.diff(ratio)))] if moved else np.nan
        rows.append(
            {
                "matrix": matrix,
                "n": n,
                "first": ratio[0],
                "last": ratio[-1],
                "reference": reference,
                "above": bool(ratio[-1] > reference),
                "largest_change_at": float(largest),
                "early_share": (early - ratio[0]) / change if moved else np.nan,
                "sharp_share": _sharp_share(progress, ratio, change) if moved else np.nan,
            }
        )
    return pd.DataFrame(rows)


def tails_claim(key: str, measures: pd.DataFrame, label: str) -> Claim:
    """Claim (a)'s tail part on one model: core, the share of matrices above the Gaussian reference at
    the end (>= TAILS_SHARE); then the median early share (>= EARLY_SHARE) and the median sharp share
    (>= SHARP_SHARE)."""
    m = measures
    checks = (
        Check(
            "share of weight matrices with max / std above a Gaussian's 99% quantile at the end",
            float(m.above.mean()) if len(m) else np.nan,
            ">=",
            TAILS_SHARE,
            f"{label}: {int(m.above.sum())} of {len(m)}; median max/std {m.last.median():.2f} vs"
            f" {m.reference.median():.2f} (first point {m['first'].median():.2f})",
        ),
        Check(
            f"median share of the tail-ratio change reached by {EARLY:.0%} of training",
            float(m.early_share.median()) if len(m) else np.nan,
            ">=",
            EARLY_SHARE,
            f"largest change at {m.largest_change_at.median():.1%} of training (median)",
        ),
        Check(
            f"median share of the change made within {SHARP_WINDOW:.0%} of training",
            float(m.sharp_share.median()) if len(m) else np.nan,
            ">=",
            SHARP_SHARE,
            f"interquartile {m.sharp_share.quantile(0.25):.2f}-{m.sharp_share.quantile(0.75):.2f}",
        ),
    )
    return Claim(key, f"{STATEMENT} ({label})", checks)


def with_pythia(label: str, run: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tail tables of every Pythia size (keyed by size) and of one run (keyed by `label`)."""
    return {size: pythia_tails(size) for size in PYTHIA_SIZES} | {label: run}


def run_tails(weight_tails: pd.DataFrame) -> pd.DataFrame:
    """A project run's tail table from its weight_tails.csv (`claims.weight_tails`)."""
    return weight_tails.rename(columns={"site": "matrix"})[["matrix", "n", "step", "progress", "tail_ratio"]]


def scaling_table(measures: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model: matrices, share above the reference, median first and last max/std, median
    progress of the largest change, median early and sharp shares."""
    rows = []
    for label, m in measures.items():
        name, d, layers = PYTHIA_SIZES.get(label, (label, np.nan, np.nan))
        rows.append(
            {
                "model": label,
                "name": name,
                "d_model": d,
                "layers": layers,
                "matrices": len(m),
                "share_above": m.above.mean(),
                "first_ratio": m["first"].median(),
                "last_ratio": m["last"].median(),
                "reference": m.reference.median(),
                "largest_change_at": m.largest_change_at.median(),
                "early_share": m.early_share.median(),
                "sharp_share": m.sharp_share.median(),
            }
        )
    return pd.DataFrame(rows)
