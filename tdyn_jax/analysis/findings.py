"""Short findings computed from a run's captures and fits, one sentence each, for the report.

Every finding is a rule over the data, stated in its docstring; nothing here is written by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from tdyn_jax.analysis.fit import best_family
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.views import kind_sites, scalar
from tdyn_jax.probes.naming import layer_free


@dataclasses.dataclass(frozen=True)
class Finding:
    """One line of the findings table: what it is about, the sentence, and the number behind it."""

    topic: str
    text: str
    value: float


def logistic_onset(fits: pd.DataFrame, sites: list[str]) -> dict[str, int | None]:
    """Per site: the first capture step from which the logistic fit has a lower AIC than the Gaussian at
    every later capture (None when it does not hold at the last capture)."""
    onset: dict[str, int | None] = {}
    for site in sites:
        rows = fits[fits.site == site].pivot_table(index="step", columns="family", values="aic")
        if rows.empty or not {"gaussian", "logistic"} <= set(rows.columns):
            continue
        wins = (rows["logistic"] < rows["gaussian"]).to_numpy()
        if not wins[-1]:
            onset[site] = None
            continue
        first = len(wins) - np.argmin(wins[::-1]) if not wins.all() else 0
        onset[site] = int(rows.index[first])
    return onset


def gaussian_to_logistic(fits: pd.DataFrame, captures: Captures, kind: str) -> Finding | None:
    """'<kind>: logistic beats Gaussian by AIC from step N on in k of L layers', N the latest onset among
    those k layers (AIC and BIC rank two two-parameter families the same way)."""
    onset = logistic_onset(fits, kind_sites(captures, kind, "sample"))
    if not onset:
        return None
    held = [s for s in onset.values() if s is not None]
    if not held:
        text = f"{kind}: at the last capture the Gaussian fits as well as the logistic (AIC) in every layer"
        return Finding("shape", text, 0.0)
    layers = f"{len(held)} of {len(onset)} layers"
    text = f"{kind}: logistic beats Gaussian by AIC from step {max(held)} on in {layers}"
    return Finding("shape", text, float(len(held)))


def best_families(fits: pd.DataFrame, captures: Captures, kind: str, criterion: str) -> Finding | None:
    """'<kind> at step S: best fit by BIC is ...' with the number of layers per family, last capture."""
    sites = kind_sites(captures, kind, "sample")
    last = fits[fits.site.isin(sites)].step.max()
    if pd.isna(last):
        return None
    winners = best_family(fits[(fits.step == last) & fits.site.isin(sites)], criterion)
    if winners.empty:
        return None
    counts = winners.value_counts()
    parts = ", ".join(f"{family} in {n}" for family, n in counts.items())
    text = f"{kind} at step {last}: best fit by {criterion.upper()}: {parts} of {len(winners)} layers"
    return Finding("shape", text, float(counts.iloc[0]))


def kurtosis_peak(captures: Captures, kind: str) -> Finding | None:
    """'<kind>: peak excess kurtosis K (layer l, step s); median over layers at the last capture m'."""
    grid = scalar(captures, kind, "kurtosis")
    if grid.empty or not np.isfinite(grid.to_numpy(np.float64)).any():
        return None
    layer, step = grid.stack().idxmax()
    peak = grid.loc[layer, step]
    last = float(np.nanmedian(grid.iloc[:, -1]))
    where = f"layer {layer}, " if layer >= 0 else ""
    text = (
        f"{kind}: peak excess kurtosis {peak:.2f} ({where}step {step}); median {last:.2f} at the last capture"
    )
    return Finding("tails", text, float(peak))


def top_channel_share(
    captures: Captures, site: str, steps: list[int] | None = None
) -> tuple[int, float] | None:
    """(channel, share): the channel that most often holds the largest |x| of `site` over the captures
    at `steps` (all when None), and the share of those captures where it does; None without captures."""
    channels = captures.arrays["massive_channel"]
    rows = np.ones(len(channels.steps), bool) if steps is None else np.isin(channels.steps, steps)
    top1 = channels.site(site)[rows, 0].astype(int)
    if not top1.size:
        return None
    channel = int(np.bincount(top1).argmax())
    return channel, float(np.mean(top1 == channel))


def persistent_channel(captures: Captures, kind: str) -> Finding | None:
    """'<kind>: in L of L layers one channel holds the largest |x| in at least half of the captures' (the
    most frequent top-1 channel of each layer, and the layer where it is most persistent)."""
    if "massive_channel" not in captures.arrays:
        return None
    sites = kind_sites(captures, kind, "massive_channel")
    if not sites:
        return None
    shares = {site: top_channel_share(captures, site) for site in sites}
    persistent = [s for s, (_, share) in shares.items() if share >= 0.5]
    site = max(shares, key=lambda s: shares[s][1])
    channel, share = shares[site]
    text = (
        f"{kind}: in {len(persistent)} of {len(sites)} layers one channel holds the largest |x| in at least"
        f" half of the captures (most: channel {channel} of {site}, {share:.0%} of captures)"
    )
    return Finding("outliers", text, share)


def energy_and_correlation(captures: Captures, kinds: list[str]) -> Finding | None:
    """'E spans a median X binades, R has std Y; R carries Z of var(log2|C|)' at the last capture, medians
    over the matmul sites."""
    ranges = [scalar(captures, f"{k}/E", "log2_range").iloc[:, -1] for k in kinds]
    spread = [scalar(captures, f"{k}/R", "std").iloc[:, -1] for k in kinds]
    share = [scalar(captures, f"{k}/R", "share_r").iloc[:, -1] for k in kinds]
    if not ranges:
        return None
    e_range = float(np.nanmedian(pd.concat(ranges)))
    r_std = float(np.nanmedian(pd.concat(spread)))
    r_share = float(np.nanmedian(pd.concat(share)))
    text = (
        f"matmuls at the last capture: E spans a median {e_range:.1f} binades, R has a median std of"
        f" {r_std:.3f}, and R carries a median {r_share:.0%} of the variance of log2|C|"
    )
    return Finding("E/R", text, e_range)


def low_precision(captures: Captures, kinds: list[str]) -> list[Finding]:
    """Median over matmul sites at the last capture of the relative error of C for each gemm/ and store/
    format and scaling (see `probes.lowprec`)."""
    t = captures.table
    step = t.step.max()
    rows = t[(t.step == step) & t.site.str.endswith("/lowprec") & t.stat.str.endswith("rel_err")]
    rows = rows[[layer_free(s).removesuffix("/lowprec") in kinds for s in rows.site]]
    if rows.empty:
        return []
    medians = rows.groupby("stat")["value"].median()
    return [
        Finding("low precision", f"relative error of C, {name.removesuffix('/rel_err')}: median {v:.3g}", v)
        for name, v in medians.items()
    ]
