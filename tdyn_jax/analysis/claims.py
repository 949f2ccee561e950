"""The seed claims about transformer training, each measured on one run by checks fixed in advance.

(a) weights keep a Gaussian bulk while their tails grow, with a sharp change early in training;
(b) residual-stream activations move from Gaussian to logistic-like soon after training starts, with
    large outliers that sit in a few persistent channels;
(c) gradients stay close to Gaussian, without large outliers;
(d) E of each matmul has a high dynamic range, R needs precision, and E in the log domain with R on
    8 bits loses less than 8-bit A and W.
"Early" and "soon" mean within the first `EARLY` of the run's steps. Tails are measured as
max |x - mean| / std against what a Gaussian or a logistic of the same size reaches.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
from scipy import stats as sps

from tdyn_jax.analysis.findings import logistic_onset, top_channel_share
from tdyn_jax.analysis.fit import fit, ks_statistic
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.verdicts import Check, Claim, share
from tdyn_jax.probes.lowprec import BITS
from tdyn_jax.probes.naming import layer_free

EARLY = 0.25  # share of the training steps that counts as early
LOGISTIC_KURTOSIS = 1.2  # excess kurtosis of the logistic distribution
INT8_BINADES = float(np.log2(127))  # the range a uniform 8-bit grid resolves, in binades
TAIL_QUANTILE = 0.99  # quantile of a distribution's largest value used as its tail reference
KS_LEVEL = 0.01  # significance level of the Gaussian KS test on the samples
# E in an 8-bit log format: log2 E with 3 fractional bits (and 5 integer bits, 32 binades of range)
E_FRAC_BITS = 3
RESIDUAL = "resid/out"
RESIDUAL_GRADS = ("resid/out/grad", "resid/mid/grad")

WEIGHTS_STATEMENT = "weights keep a Gaussian bulk while their tails grow, with a sharp change early"
RESIDUAL_STATEMENT = (
    "residual activations go from Gaussian to logistic-like soon after the start, with large outliers"
    " in a few persistent channels"
)
GRADIENTS_STATEMENT = "gradients stay close to Gaussian, without large outliers"
ENERGY_STATEMENT = (
    "E has a high dynamic range, R needs precision: C stored as E (its norm vectors) and 8-bit R loses"
    " less than C stored in 8 bits"
)


def gaussian_max(n: float, q: float = TAIL_QUANTILE) -> float:
    """The q-quantile of max |z| over n standard Gaussian values (in units of the std)."""
    tail = -np.expm1(np.log(q) / n)  # 1 - q^(1/n), exact for large n
    return float(sps.norm.isf(tail / 2))


def logistic_max(n: float, q: float = TAIL_QUANTILE) -> float:
    """The q-quantile of max |x| over n logistic values, in units of the logistic's std (P(|x| <= t) =
    tanh(t / 2s) with s = sqrt(3) / pi)."""
    tail = -np.expm1(np.log(q) / n)
    return float(np.sqrt(3) / np.pi * np.log((2 - tail) / tail))


@cache
def gaussian_ks_critical(n: int, level: float = KS_LEVEL, trials: int = 2000) -> float:
    """The (1 - level)-quantile of the KS statistic of n Gaussian values against their own Gaussian fit
    (a Lilliefors test), by simulation with a fixed seed."""
    samples = np.random.default_rng(0).standard_normal((trials, n))
    return float(np.quantile(ks_statistic("gaussian", samples, fit(samples, "gaussian").params), 1 - level))


def site_grid(captures: Captures, sites: list[str], stat: str) -> pd.DataFrame:
    """Scalar `stat` of `sites`: rows sites, columns capture steps."""
    t = captures.table
    rows = t[(t.stat == stat) & t.site.isin(sites)]
    return rows.pivot_table(index="site", columns="step", values="value", aggfunc="first")


def tail_ratio(captures: Captures, sites: list[str]) -> pd.DataFrame:
    """max |x - mean| / std per site (rows) and capture step (columns)."""
    grid = {s: site_grid(captures, sites, s) for s in ("min", "max", "mean", "std")}
    spread = np.maximum(grid["max"] - grid["mean"], grid["mean"] - grid["min"])
    return spread / grid["std"]


def weight_tails(captures: Captures, num_steps: int) -> pd.DataFrame:
    """The tail ratio of every weight matrix at every capture, tidy: site, n (its elements), step,
    progress (step / num_steps), tail_ratio (max abs(x - mean) / std)."""
    sites = weight_sites(captures)
    ratio = tail_ratio(captures, sites)
    tidy = ratio.stack().rename("tail_ratio").reset_index()
    tidy.insert(1, "n", tidy.site.map(_sizes(captures, sites)).astype(np.int64))
    tidy.insert(3, "progress", tidy.step / num_steps)
    return tidy


def sites_where(captures: Captures, test) -> list[str]:
    """The captured site names for which `test(name)` is true, sorted."""
    return sorted(s for s in captures.table.site.unique() if test(s))


def weight_sites(captures: Captures, collection: str = "params") -> list[str]:
    """The matmul weights, <collection>/.../kernel: their values (params) or gradients (grads)."""
    return sites_where(captures, lambda s: s.startswith(f"{collection}/") and s.endswith("/kernel"))


def residual_grad_sites(captures: Captures) -> list[str]:
    """The gradients of the residual stream: .../resid/out/grad and .../resid/mid/grad."""
    return sites_where(captures, lambda s: layer_free(s) in RESIDUAL_GRADS)


def residual_sites(captures: Captures) -> list[str]:
    """The residual stream after each block: .../resid/out."""
    return sites_where(captures, lambda s: layer_free(s) == RESIDUAL)


def _sizes(captures: Captures, sites: list[str]) -> pd.Series:
    """Element count per site (its first capture)."""
    return site_grid(captures, sites, "count").iloc[:, 0]


def _early_step(steps: np.ndarray, num_steps: int) -> int | None:
    """The last capture step within the first EARLY of training (None if only step 0 or none)."""
    early = steps[(steps > 0) & (steps <= EARLY * num_steps)]
    return int(early[-1]) if early.size else None


def weights_claim(captures: Captures, fits: pd.DataFrame, num_steps: int) -> Claim:
    """(a) Core: the share of weight matrices x captures whose Gaussian fit passes a KS test at 1%
    (>= 0.9). Then: the share of matrices whose tail ratio at the last capture exceeds the 99% quantile of
    a Gaussian of their size (>= 0.5); and the median share of each matrix's change of tail ratio (first
    to last capture) reached by the end of the early phase (>= 0.5)."""
    sites = weight_sites(captures)
    gauss = fits[(fits.family == "gaussian") & fits.site.isin(sites)]
    n = int(gauss.n.max()) if len(gauss) else 0
    critical = gaussian_ks_critical(n) if n >= 8 else float("nan")
    passed = gauss.ks.to_numpy() <= critical
    by_step = pd.Series(passed).groupby(gauss.step.to_numpy()).mean()
    bulk = Check(
        "share of weight matrices x captures whose Gaussian fit passes a KS test at 1%",
        share(passed) if len(gauss) else float("nan"),
        ">=",
        0.9,
        f"{passed.sum()} of {len(passed)}; median KS {np.median(gauss.ks) if len(gauss) else np.nan:.4f},"
        f" critical {critical:.4f} for n = {n}; share passing by step: "
        + ", ".join(f"{step} {value:.2f}" for step, value in by_step.items()),
    )
    ratio = tail_ratio(captures, sites)
    if ratio.empty:
        return Claim("a", WEIGHTS_STATEMENT, (bulk,))
    reference = _sizes(captures, sites).map(gaussian_max)
    last = ratio.iloc[:, -1]
    tails = Check(
        "share of weight matrices with max abs(x - mean) / std above a Gaussian's 99% quantile at the last"
        " capture",
        share(last > reference),
        ">=",
        0.5,
        f"median ratio {last.median():.2f} at step {ratio.columns[-1]} vs {reference.median():.2f} for a"
        f" Gaussian (step {ratio.columns[0]}: {ratio.iloc[:, 0].median():.2f})",
    )
    early = _early_step(ratio.columns.to_numpy(), num_steps)
    change = last - ratio.iloc[:, 0]
    reached = (ratio[early] - ratio.iloc[:, 0]) / change if early is not None else pd.Series(dtype=float)
    reached = reached[change.abs() > 0]
    sharp = Check(
        "median share of the tail-ratio change (first to last capture) reached early",
        float(reached.median()) if len(reached) else float("nan"),
        ">=",
        0.5,
        f"by step {early}, the end of the first {EARLY:.0%} of {num_steps} steps",
    )
    return Claim("a", WEIGHTS_STATEMENT, (bulk, tails, sharp))


def residual_claim(captures: Captures, fits: pd.DataFrame, num_steps: int) -> Claim:
    """(b) Core: the share of residual layers (resid/out) where the logistic fits no better than the
    Gaussian at step 0 and beats it from a step within the early phase on (>= 0.75). Then: the share of
    layers whose tail ratio at the last capture exceeds the 99% quantile of a logistic of their size
    (>= 0.5); and the share of layers where one channel holds the largest abs(x) in at least half the
    captures after step 0 (>= 0.5)."""
    sites = residual_sites(captures)
    onset = logistic_onset(fits, sites)
    first = fits[fits.site.isin(sites) & (fits.step == 0)].pivot_table(
        index="site", columns="family", values="mean_loglik"
    )
    gaussian_at_start = (
        {s: bool(first.loc[s, "logistic"] <= first.loc[s, "gaussian"]) for s in first.index}
        if {"gaussian", "logistic"} <= set(first.columns)
        else {}
    )
    early = EARLY * num_steps
    shifted = [gaussian_at_start.get(s, False) and o is not None and o <= early for s, o in onset.items()]
    held = sorted(o for o in onset.values() if o is not None)
    shape = Check(
        "share of residual layers Gaussian at step 0 and logistic (by likelihood) from an early step on",
        share(shifted) if onset and gaussian_at_start else float("nan"),
        ">=",
        0.75,
        f"{sum(shifted)} of {len(onset)} layers; Gaussian at step 0 in {sum(gaussian_at_start.values())},"
        f" logistic from steps {held} (early: <= {early:g})",
    )
    ratio = tail_ratio(captures, sites)
    checks = [shape]
    if not ratio.empty:
        sizes = _sizes(captures, sites)
        reference, n = sizes.map(logistic_max), sizes.median()
        last = ratio.iloc[:, -1]
        checks.append(
            Check(
                "share of residual layers with max abs(x - mean) / std above a logistic's 99% quantile at the"
                " last capture",
                share(last > reference),
                ">=",
                0.5,
                f"ratios {', '.join(f'{v:.1f}' for v in last)} vs {logistic_max(n):.1f} for a logistic and"
                f" {gaussian_max(n):.1f} for a Gaussian of {n:.0f} values",
            )
        )
    if "massive_channel" in captures.arrays:
        after = [int(s) for s in captures.arrays["massive_channel"].steps if s > 0]
        tops = {s: top_channel_share(captures, s, after) for s in sites}
        tops = {s: v for s, v in tops.items() if v is not None}
        persistent = [s for s, (_, frac) in tops.items() if frac >= 0.5]
        best = max(tops, key=lambda s: tops[s][1]) if tops else None
        checks.append(
            Check(
                "share of residual layers where one channel holds the largest abs(x) in >= half the captures",
                share([s in persistent for s in tops]) if tops else float("nan"),
                ">=",
                0.5,
                f"{len(persistent)} of {len(tops)} layers"
                + (f"; most: channel {tops[best][0]} of {best}, {tops[best][1]:.0%}" if best else ""),
            )
        )
    return Claim("b", RESIDUAL_STATEMENT, tuple(checks))


def gradients_claim(captures: Captures) -> Claim:
    """(c) Core: the share of weight-gradient tensors (grads/.../kernel) x captures after step 0 with
    excess kurtosis at most the logistic's 1.2 (>= 0.75). Then: the same share for the residual-stream
    gradients (>= 0.75); and the share of all those gradient tensors x captures whose tail ratio stays
    below a logistic's 99% quantile of their size (>= 0.9)."""
    weight_grads, residual_grads = weight_sites(captures, "grads"), residual_grad_sites(captures)
    checks = []
    for name, sites in (("weight-gradient", weight_grads), ("residual-gradient", residual_grads)):
        kurt = site_grid(captures, sites, "kurtosis")
        kurt = kurt.loc[:, kurt.columns > 0].to_numpy().ravel() if not kurt.empty else np.full(1, np.nan)
        checks.append(
            Check(
                f"share of {name} tensors x captures after step 0 with excess kurtosis <= 1.2",
                share(kurt <= LOGISTIC_KURTOSIS) if np.isfinite(kurt).all() else float("nan"),
                ">=",
                0.75,
                f"median {np.median(kurt):.2f}, max {kurt.max():.1f} over {kurt.size}",
            )
        )
    sites = weight_grads + residual_grads
    ratio = tail_ratio(captures, sites)
    if not ratio.empty:
        ratio = ratio.loc[:, ratio.columns > 0]
        reference = _sizes(captures, sites).map(logistic_max)
        below = ratio.le(reference, axis=0).to_numpy().ravel()
        checks.append(
            Check(
                "share of gradient tensors x captures after step 0 with max abs(x - mean) / std below a"
                " logistic's 99% quantile",
                share(below),
                ">=",
                0.9,
                f"median ratio {np.nanmedian(ratio.to_numpy()):.1f}, max {np.nanmax(ratio.to_numpy()):.1f};"
                f" logistic reference {reference.median():.1f}",
            )
        )
    return Claim("c", GRADIENTS_STATEMENT, tuple(checks))


def energy_claim(captures: Captures) -> Claim:
    """(d) At the last capture, over the matmul sites, storing C (like for like). Core: the median
    relative error of C stored as exact E (the n + m norms) times R on 8 uniform bits, divided by the
    smallest median error of C stored directly in an 8-bit format and scaling (<= 1). Then: E's median
    log2 range in binades (>= log2 127, the range of a uniform 8-bit grid); and R's median share of
    var(log2 |C|) (>= 0.5). The detail gives E as an 8-bit log code (E_FRAC_BITS and 0 fractional
    bits) and the E/R-split GEMM against channel scaling in E4M3."""
    t = captures.table
    last = t[t.step == t.step.max()]
    errors = last[last.site.str.endswith("/lowprec") & last.stat.str.endswith("/rel_err")]
    medians = errors.groupby("stat")["value"].median()
    er = "store/er/exact/r8/rel_err"
    direct = [
        s for s in medians.index if s.startswith("store/") and BITS.get(s.split("/")[1]) == 8
    ]  # C itself in an 8-bit format
    checks = []
    if er in medians and direct:
        best = medians[direct].idxmin()
        name = lambda stat: stat.removesuffix("/rel_err")
        value = lambda stat: medians.get(stat, np.nan)
        checks.append(
            Check(
                "median error of C stored as exact E and 8-bit R over that of the best 8-bit storage of C",
                float(medians[er] / medians[best]),
                "<=",
                1.0,
                f"{name(er)} {medians[er]:.3g} vs {name(best)} {medians[best]:.3g}; E as an 8-bit log code:"
                f" {value(f'store/er/e{E_FRAC_BITS}/r8/rel_err'):.3g} ({E_FRAC_BITS} fractional bits),"
                f" {value('store/er/e0/r8/rel_err'):.3g} (powers of two); computing C in e4m3:"
                f" E/R-split {value('gemm/e4m3/er/rel_err'):.3g} vs channel"
                f" {value('gemm/e4m3/channel/rel_err'):.3g}",
            )
        )
    else:
        missing = f"no {er} or 8-bit store/ errors captured (probes.r_bits must include 8)"
        checks.append(Check("error of storing C: E/R vs 8-bit", float("nan"), "<=", 1.0, missing))
    energy = last[last.site.str.endswith("/E")]
    e_range = energy[energy.stat == "log2_range"].value
    correlation = last[last.site.str.endswith("/R")]
    r_share = correlation[correlation.stat == "share_r"].value
    r_std = correlation[correlation.stat == "std"].value
    checks.append(
        Check(
            "median log2 range of E in binades",
            float(e_range.median()) if len(e_range) else float("nan"),
            ">=",
            round(INT8_BINADES, 2),
            f"over {len(e_range)} matmuls, max {e_range.max() if len(e_range) else np.nan:.1f}",
        )
    )
    checks.append(
        Check(
            "median share of var(log2|C|) carried by R",
            float(r_share.median()) if len(r_share) else float("nan"),
            ">=",
            0.5,
            f"over {len(r_share)} matmuls; R's median std {r_std.median():.3f}",
        )
    )
    return Claim("d", ENERGY_STATEMENT, tuple(checks))


def seed_claims(captures: Captures, fits: pd.DataFrame, num_steps: int) -> list[Claim]:
    """Claims (a)-(d) of one run; `fits` needs the Gaussian and logistic fits of the weight and resid/out
    samples."""
    return [
        weights_claim(captures, fits, num_steps),
        residual_claim(captures, fits, num_steps),
        gradients_claim(captures),
        energy_claim(captures),
    ]
