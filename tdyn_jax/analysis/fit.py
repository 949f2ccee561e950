"""Maximum-likelihood fits of Gaussian, logistic, Laplace and Student-t distributions to captured samples,
and binned fits of the two-parameter families to the linear histograms (every element of a tensor).

Every function takes a batch of samples, one per row of an (m, s) array padded with nan, and fits all rows
at once in float64: the Gaussian and Laplace fits are closed-form; the logistic and Student-t fits run a
Levenberg-Marquardt ascent of the log-likelihood with analytic gradients and Hessians, vectorised over the
rows, on each row standardised by its median and standard deviation (so that one damping suits all rows).
The estimates are those of `scipy.stats.<dist>.fit` (location and scale; Student-t also its degrees of
freedom).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import special
from tqdm import tqdm

from tdyn_jax.analysis.load import Captures
from tdyn_jax.probes.naming import layer_of

FAMILIES = ("gaussian", "logistic", "laplace", "student_t")
PARAMS = {"gaussian": ("loc", "scale"), "logistic": ("loc", "scale"), "laplace": ("loc", "scale")}
PARAMS["student_t"] = ("loc", "scale", "df")
MIN_COUNT = 8  # rows with fewer finite values, or all equal, are not fitted (all results nan)
MAX_DF = 1e4  # largest Student-t df (a Gaussian sample's likelihood keeps rising with df)
_TOL = 1e-10  # convergence: largest |gradient| of the mean log-likelihood (standardised parameters)
_MAX_ITERS = 200


@dataclasses.dataclass(frozen=True)
class Fit:
    """One family fitted to m samples: parameters (m, k) in `PARAMS[family]` order, the count n of finite
    values, the mean log-likelihood, AIC = 2k - 2 n ll, BIC = k ln n - 2 n ll and the one-sample
    Kolmogorov-Smirnov statistic sup |F_n - F|."""

    family: str
    params: np.ndarray
    n: np.ndarray
    mean_loglik: np.ndarray
    aic: np.ndarray
    bic: np.ndarray
    ks: np.ndarray


def _rows(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, w, n): samples as float64 (m, s) with non-finite values set to 0, their 0/1 weights, counts."""
    x = np.asarray(samples, np.float64)
    x = x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)
    w = np.isfinite(x).astype(np.float64)
    n = w.sum(axis=1)
    return np.where(w > 0, x, 0.0), w, n


def _mean(values: np.ndarray, w: np.ndarray, n: np.ndarray) -> np.ndarray:
    return (values * w).sum(axis=1) / n


def _median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.nanmedian(np.where(w > 0, x, np.nan), axis=1)


def _gaussian(x: np.ndarray, w: np.ndarray, n: np.ndarray) -> np.ndarray:
    loc = _mean(x, w, n)
    return np.stack([loc, np.sqrt(_mean((x - loc[:, None]) ** 2, w, n))], axis=1)


def _laplace(x: np.ndarray, w: np.ndarray, n: np.ndarray) -> np.ndarray:
    loc = _median(x, w)
    return np.stack([loc, _mean(np.abs(x - loc[:, None]), w, n)], axis=1)


# Derivatives of the mean log-likelihood of standardised rows z. Each returns (ll, g, H) with respect to the
# natural parameters; `_ascend` moves them to (loc, log scale[, log df]).


def _logistic_derivs(z: np.ndarray, w: np.ndarray, n: np.ndarray, theta: np.ndarray):
    mu, s = theta[:, 0], np.exp(theta[:, 1])
    u = (z - mu[:, None]) / s[:, None]
    t = np.tanh(u / 2)
    sech2 = 1 - t * t
    ll = -np.log(s) + _mean(-np.abs(u) - 2 * np.log1p(np.exp(-np.abs(u))), w, n)
    g = np.stack([_mean(t, w, n) / s, (_mean(u * t, w, n) - 1) / s], axis=1)
    h_mm = -_mean(sech2, w, n) / (2 * s**2)
    h_ms = -_mean(t + u * sech2 / 2, w, n) / s**2
    h_ss = -_mean(2 * u * t - 1 + u * u * sech2 / 2, w, n) / s**2
    rows = [[h_mm, h_ms], [h_ms, h_ss]]
    return ll, g, np.stack([np.stack(r, -1) for r in rows], -2)


def _student_t_derivs(z: np.ndarray, w: np.ndarray, n: np.ndarray, theta: np.ndarray):
    mu, s, nu = theta[:, 0], np.exp(theta[:, 1]), np.exp(theta[:, 2])
    u = (z - mu[:, None]) / s[:, None]
    v = nu[:, None]
    u2 = u * u
    d = v + u2
    log1p = np.log1p(u2 / v)
    c = special.gammaln((nu + 1) / 2) - special.gammaln(nu / 2) - 0.5 * np.log(np.pi * nu)
    ll = c - np.log(s) - (nu + 1) / 2 * _mean(log1p, w, n)
    a = (v + 1) / d
    g_m = _mean(a * u, w, n) / s
    g_s = (_mean(a * u2, w, n) - 1) / s
    g_n = 0.5 * (special.digamma((nu + 1) / 2) - special.digamma(nu / 2)) + _mean(
        -0.5 * log1p + (u2 - 1) / (2 * d), w, n
    )
    d2 = d * d
    h_mm = _mean((v + 1) * (u2 - v) / d2, w, n) / s**2
    h_ms = _mean(-2 * (v + 1) * v * u / d2, w, n) / s**2
    h_mn = _mean(u * (u2 - 1) / d2, w, n) / s
    h_ss = (1 - _mean((v + 1) * u2 * (3 * v + u2) / d2, w, n)) / s**2
    h_sn = _mean(u2 * (u2 - 1) / d2, w, n) / s
    h_nn = 0.25 * (special.polygamma(1, (nu + 1) / 2) - special.polygamma(1, nu / 2)) + _mean(
        u2 / (2 * v * d) - (u2 - 1) / (2 * d2), w, n
    )
    h = np.stack(
        [
            np.stack([h_mm, h_ms, h_mn], -1),
            np.stack([h_ms, h_ss, h_sn], -1),
            np.stack([h_mn, h_sn, h_nn], -1),
        ],
        -2,
    )
    return ll, np.stack([g_m, g_s, g_n], axis=1), h


def _ascend(
    derivs: Callable, z: np.ndarray, w: np.ndarray, n: np.ndarray, theta: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """Levenberg-Marquardt ascent of the mean log-likelihood per row, over theta = (loc, log scale, ...)
    (every parameter after the first is a log) kept at or below `upper`. Rows stop on their own when
    converged. Candidates that overflow are rejected, so floating-point warnings are silenced."""
    m, k = theta.shape
    logs = np.arange(k) > 0

    def at(rows: np.ndarray, th: np.ndarray):
        ll, g, h = derivs(z[rows], w[rows], n[rows], th)
        p = np.where(logs, np.exp(th), 1.0)  # d natural / d theta (= its second derivative for logs)
        h = h * p[:, :, None] * p[:, None, :] + np.einsum("ij,jk->ijk", np.where(logs, g * p, 0.0), np.eye(k))
        g = g * p
        pinned = (th >= upper) & (g > 0)  # at a bound and pushing past it: held there
        h = np.where(pinned[:, :, None] | pinned[:, None, :], -np.eye(k), h)
        return ll, np.where(pinned, 0.0, g), h

    with np.errstate(all="ignore"):
        ll, g, h = at(np.arange(m), theta)
        damping = np.full(m, 1e-3)
        active = np.isfinite(ll) & (np.abs(g).max(axis=1) > _TOL)
        for _ in range(_MAX_ITERS):
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            lhs = -h[rows] + damping[rows, None, None] * np.eye(k)
            step = np.linalg.solve(lhs, g[rows][:, :, None])[:, :, 0]
            candidate = np.minimum(theta[rows] + step, upper)
            ll_c, g_c, h_c = at(rows, candidate)
            better = np.isfinite(ll_c) & (ll_c >= ll[rows])
            up = rows[better]
            theta[up], ll[up], g[up], h[up] = candidate[better], ll_c[better], g_c[better], h_c[better]
            damping[up] = np.maximum(damping[up] / 10, 1e-12)
            damping[rows[~better]] *= 10
            active[rows] = (np.abs(g[rows]).max(axis=1) > _TOL) & (damping[rows] < 1e12)
            active[rows[better]] &= np.abs(step[better]).max(axis=1) > 1e-14
    return theta


def _standardised(x: np.ndarray, w: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, center, spread): rows shifted by their median and divided by their standard deviation."""
    center = _median(x, w)
    spread = np.sqrt(_mean((x - center[:, None]) ** 2, w, n))
    return (x - center[:, None]) / spread[:, None] * w, center, spread


def _logistic(x: np.ndarray, w: np.ndarray, n: np.ndarray) -> np.ndarray:
    z, center, spread = _standardised(x, w, n)
    theta = np.stack([np.zeros_like(center), np.full_like(center, np.log(np.sqrt(3) / np.pi))], axis=1)
    theta = _ascend(_logistic_derivs, z, w, n, theta, np.full(2, np.inf))
    return np.stack([center + spread * theta[:, 0], spread * np.exp(theta[:, 1])], axis=1)


def _student_t(x: np.ndarray, w: np.ndarray, n: np.ndarray) -> np.ndarray:
    z, center, spread = _standardised(x, w, n)
    kurtosis = _mean(z**4, w, n) / _mean(z**2, w, n) ** 2 - 3
    df = np.clip(4 + 6 / np.maximum(kurtosis, 0.06), 2.5, 100.0)  # a t with this df has this kurtosis
    scale = np.sqrt((df - 2) / df)  # and this scale gives it unit variance
    theta = np.stack([np.zeros_like(df), np.log(scale), np.log(df)], axis=1)
    theta = _ascend(_student_t_derivs, z, w, n, theta, np.array([np.inf, np.inf, np.log(MAX_DF)]))
    loc, scale, df = theta[:, 0], np.exp(theta[:, 1]), np.minimum(np.exp(theta[:, 2]), MAX_DF)
    return np.stack([center + spread * loc, spread * scale, df], axis=1)


_ESTIMATORS = {"gaussian": _gaussian, "logistic": _logistic, "laplace": _laplace, "student_t": _student_t}


def logpdf(family: str, x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Log-density of `family` at x (m, s) with parameters (m, k) per row."""
    loc, scale = params[:, 0:1], params[:, 1:2]
    u = (x - loc) / scale
    if family == "gaussian":
        return -0.5 * u * u - np.log(scale) - 0.5 * np.log(2 * np.pi)
    if family == "logistic":
        return -np.abs(u) - 2 * np.log1p(np.exp(-np.abs(u))) - np.log(scale)
    if family == "laplace":
        return -np.abs(u) - np.log(2 * scale)
    nu = params[:, 2:3]
    c = special.gammaln((nu + 1) / 2) - special.gammaln(nu / 2) - 0.5 * np.log(np.pi * nu)
    return c - np.log(scale) - (nu + 1) / 2 * np.log1p(u * u / nu)


def cdf(family: str, x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Distribution function of `family` at x (m, s) with parameters (m, k) per row."""
    u = (x - params[:, 0:1]) / params[:, 1:2]
    if family == "gaussian":
        return special.ndtr(u)
    if family == "logistic":
        return special.expit(u)
    if family == "laplace":
        return np.where(u < 0, 0.5 * np.exp(np.minimum(u, 0)), 1 - 0.5 * np.exp(-np.maximum(u, 0)))
    return special.stdtr(params[:, 2:3], u)


def ks_statistic(family: str, samples: np.ndarray, params: np.ndarray) -> np.ndarray:
    """sup_x |F_n(x) - F(x)| per row (as `scipy.stats.kstest`), nan padding ignored."""
    x = np.sort(np.asarray(samples, np.float64).reshape(len(params), -1), axis=1)  # nan last
    n = np.isfinite(x).sum(axis=1, keepdims=True)
    f = cdf(family, x, params)
    i = np.arange(1, x.shape[1] + 1)[None, :]
    valid = i <= n
    above = np.where(valid, i / n - f, -np.inf).max(axis=1)
    below = np.where(valid, f - (i - 1) / n, -np.inf).max(axis=1)
    return np.maximum(above, below)


def fit(samples: np.ndarray, family: str) -> Fit:
    """Fits `family` by maximum likelihood to each row of `samples` (m, s), nan padding ignored."""
    if family not in _ESTIMATORS:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    x, w, n = _rows(samples)
    spread = np.where(w > 0, x, np.inf).min(axis=1) < np.where(w > 0, x, -np.inf).max(axis=1)
    usable = (n >= MIN_COUNT) & spread
    k = len(PARAMS[family])
    params = np.full((x.shape[0], k), np.nan)
    if usable.any():
        params[usable] = _ESTIMATORS[family](x[usable], w[usable], n[usable])
    ll = np.full(x.shape[0], np.nan)
    ll[usable] = _mean(logpdf(family, x[usable], params[usable]), w[usable], n[usable])
    ks = np.full(x.shape[0], np.nan)
    ks[usable] = ks_statistic(family, np.where(w[usable] > 0, x[usable], np.nan), params[usable])
    total = n * ll
    return Fit(family, params, n, ll, 2 * k - 2 * total, k * np.log(np.maximum(n, 1)) - 2 * total, ks)


BINNED_FAMILIES = ("gaussian", "logistic", "laplace")
_MAX_BINNED_SCALE = 1e3  # standardised units: a binned fit that would go wider has no maximum (below)
_P_FLOOR = 1e-300  # smallest bin probability: a far outlier bin costs at most -690 nats per count
_MIN_INSIDE = 1e-100  # smallest probability of the histogram's range under a fit (see below)
_H = 1e-4  # finite-difference step of the binned fits (standardised units)


def _bin_probabilities(family: str, u: np.ndarray, mu: np.ndarray, s: np.ndarray) -> np.ndarray:
    """P(bin | the histogram's range) between standardised edges u (m, b+1); bins above the centre are
    measured in the upper tail (1 - F(z) = F(-z) for these symmetric families), keeping far bins exact.
    nan where the range holds less than 1e-100 of the distribution (its centre far outside): there
    every bin's mass underflows to the floor, which would make the likelihood a meaningless 0."""
    z = (u - mu[:, None]) / s[:, None]
    unit = np.tile([0.0, 1.0], (len(z), 1))
    below, above = cdf(family, z, unit), cdf(family, -z, unit)
    mass = np.where(z[:, :-1] > 0, above[:, :-1] - above[:, 1:], below[:, 1:] - below[:, :-1])
    inside = np.where(z[:, :1] > 0, above[:, :1] - above[:, -1:], below[:, -1:] - below[:, :1])
    p = np.maximum(mass, _P_FLOOR) / np.maximum(inside, _P_FLOOR)
    return np.where(inside >= _MIN_INSIDE, p, np.nan)


def _binned_derivs(family: str) -> Callable:
    """Mean binned log-likelihood sum_k c_k log P_k / N and its finite-difference gradient and Hessian in
    the natural parameters (loc, scale), for `_ascend`."""

    def loglik(u: np.ndarray, c: np.ndarray, n: np.ndarray, mu: np.ndarray, s: np.ndarray) -> np.ndarray:
        return (c * np.log(_bin_probabilities(family, u, mu, s))).sum(axis=1) / n

    def derivs(u: np.ndarray, c: np.ndarray, n: np.ndarray, theta: np.ndarray):
        mu, s = theta[:, 0], np.exp(theta[:, 1])
        shift = [(0.0, 0.0), (_H, 0.0), (-_H, 0.0), (0.0, _H), (0.0, -_H), (_H, _H), (-_H, -_H)]
        f0, fm1, fm2, fs1, fs2, fb1, fb2 = (loglik(u, c, n, mu + dm, s + ds) for dm, ds in shift)
        g = np.stack([(fm1 - fm2) / (2 * _H), (fs1 - fs2) / (2 * _H)], axis=1)
        h_mm = (fm1 - 2 * f0 + fm2) / _H**2
        h_ss = (fs1 - 2 * f0 + fs2) / _H**2
        h_ms = (fb1 - fm1 - fs1 + 2 * f0 - fm2 - fs2 + fb2) / (2 * _H**2)
        return f0, g, np.stack([np.stack([h_mm, h_ms], -1), np.stack([h_ms, h_ss], -1)], -2)

    return derivs


def fit_histogram(counts: np.ndarray, edges: np.ndarray, family: str) -> Fit:
    """Fits `family` to each row of a histogram (counts (m, b), edges (m, b+1)) by binned maximum
    likelihood, conditioned on the histogram's range: every element of the tensor counts, where a sample
    would hold few of its tail values. `mean_loglik` is per element of the binned likelihood, `ks` the
    largest |empirical - fitted| distribution function over the edges (a lower bound of the continuous
    statistic). Histograms with one occupied bin (e.g. a tensor of values far smaller than 1, whose
    histogram range was widened) have no shape to fit: nan. On a histogram that only falls off from
    one edge (Adam's second moment) the likelihood may keep rising as the centre moves far outside
    the range and the scale grows (on the range a Gaussian's far tail becomes an exponential decay):
    the fit stops where the range would hold less than 1e-100 of the distribution, short of the
    supremum, and is nan if its scale reaches 1000 spreads first."""
    if family not in BINNED_FAMILIES:
        raise ValueError(f"unknown binned family {family!r}: use one of {', '.join(BINNED_FAMILIES)}")
    c, e = np.asarray(counts, np.float64), np.asarray(edges, np.float64)
    n = c.sum(axis=1)
    centers = (e[:, 1:] + e[:, :-1]) / 2
    mean = (c * centers).sum(axis=1) / np.maximum(n, 1)
    spread = np.sqrt((c * (centers - mean[:, None]) ** 2).sum(axis=1) / np.maximum(n, 1))
    usable = (n >= MIN_COUNT) & (spread > 0)
    params = np.full((len(c), 2), np.nan)
    ll = np.full(len(c), np.nan)
    ks = np.full(len(c), np.nan)
    if usable.any():
        u = (e[usable] - mean[usable, None]) / spread[usable, None]
        start = {"gaussian": 1.0, "logistic": np.sqrt(3) / np.pi, "laplace": 1 / np.sqrt(2)}[family]
        theta = np.stack([np.zeros(usable.sum()), np.full(usable.sum(), np.log(start))], axis=1)
        derivs = _binned_derivs(family)
        upper = np.array([np.inf, np.log(_MAX_BINNED_SCALE)])
        theta = _ascend(derivs, u, c[usable], n[usable], theta, upper)
        mu, s = theta[:, 0], np.exp(theta[:, 1])
        params[usable] = np.stack([mean[usable] + spread[usable] * mu, spread[usable] * s], axis=1)
        ll[usable] = derivs(u, c[usable], n[usable], theta)[0]
        p = _bin_probabilities(family, u, mu, s)
        gap = np.cumsum(c[usable], axis=1) / n[usable, None] - np.cumsum(p, axis=1)
        ks[usable] = np.abs(gap).max(axis=1)
        unbounded = np.flatnonzero(usable)[theta[:, 1] >= upper[1]]
        params[unbounded], ll[unbounded], ks[unbounded] = np.nan, np.nan, np.nan
    total = n * ll
    return Fit(family, params, n, ll, 4 - 2 * total, 2 * np.log(np.maximum(n, 1)) - 2 * total, ks)


def hill_tail_index(samples: np.ndarray, k: int | None = None) -> np.ndarray:
    """Hill estimate of the tail index alpha of |x| per row: 1 / (mean(log |x|_(i), i <= k) -
    log |x|_(k+1)) over the k largest |x| (default k = floor(sqrt(n)), at least 2). A Pareto tail
    P(|X| > x) ~ x^-alpha gives about alpha; a Student-t about its df; lighter tails give large values."""
    a = np.asarray(samples, np.float64)
    a = -np.sort(-np.abs(a.reshape(a.shape[0], -1)), axis=1)  # descending, nan last
    n = np.isfinite(a).sum(axis=1)
    top = np.maximum(np.floor(np.sqrt(n)), 2).astype(int) if k is None else np.full(len(a), k)
    ok = top < n
    threshold = np.take_along_axis(a, np.minimum(top, a.shape[1] - 1)[:, None], axis=1)[:, 0]
    ok &= threshold > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.arange(a.shape[1])[None, :] < top[:, None], np.log(a), 0.0)
        excess = logs.sum(axis=1) / top - np.log(threshold)
        return np.where(ok, 1 / excess, np.nan)


def fit_samples(
    samples: np.ndarray, families: tuple[str, ...] = FAMILIES, workers: int = 2, progress: bool = False
) -> pd.DataFrame:
    """Every family fitted to every row of `samples` (m, s): one row per (row, family) with columns row,
    family, n, loc, scale, df (Student-t only), mean_loglik, aic, bic, ks, plus the row's hill tail
    index. Chunks of rows are fitted in `workers` threads (numpy and scipy release the GIL)."""
    samples = np.asarray(samples, np.float32).reshape(len(samples), -1)
    pieces = min(len(samples), max(workers, -(-len(samples) // 256)))  # about 256 rows each
    chunks = np.array_split(np.arange(len(samples)), max(pieces, 1))
    jobs = [(family, rows) for family in families for rows in chunks if rows.size]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = pool.map(lambda job: (job[1], fit(samples[job[1]], job[0])), jobs)
        fits = list(tqdm(done, total=len(jobs), desc="fits", unit="job", disable=not progress))
    hill = hill_tail_index(samples)
    frames = []
    for rows, f in fits:
        names = PARAMS[f.family]
        columns = {"row": rows, "family": f.family, "n": f.n.astype(np.int64)}
        columns |= {name: f.params[:, i] for i, name in enumerate(names)}
        columns |= {"mean_loglik": f.mean_loglik, "aic": f.aic, "bic": f.bic, "ks": f.ks, "hill": hill[rows]}
        frames.append(pd.DataFrame(columns))
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["row", "family"], kind="stable", ignore_index=True)


def fit_captures(
    captures: Captures,
    sites: list[str] | None = None,
    workers: int = 2,
    progress: bool = False,
    families: tuple[str, ...] = FAMILIES,
) -> pd.DataFrame:
    """`fit_samples` on the sampled values of every capture step x site (or of `sites`): the fits table
    with columns step, site, layer, family, n, loc, scale, df, mean_loglik, aic, bic, ks, hill."""
    if "sample" not in captures.arrays:
        raise ValueError("the run captured no samples: add 'sample' to probes.stats")
    sample = captures.arrays["sample"]
    chosen = sample.sites if sites is None else [s for s in sample.sites if s in set(sites)]
    index = [sample.sites.index(s) for s in chosen]
    values = sample.values[:, index]  # (steps, sites, sample_size)
    table = fit_samples(values.reshape(-1, values.shape[-1]), families, workers, progress)
    steps = np.repeat(sample.steps, len(chosen))
    names = np.tile(np.array(chosen, dtype=object), len(sample.steps))
    rows = table.pop("row").to_numpy()
    table.insert(0, "step", steps[rows])
    table.insert(1, "site", names[rows])
    table.insert(2, "layer", [layer_of(s) for s in table["site"]])
    return table


def fit_histograms(captures: Captures) -> pd.DataFrame:
    """`fit_histogram` of every binned family on the linear histogram of every capture step x site: the
    table with columns step, site, layer, family, n, loc, scale, mean_loglik, aic, bic, ks."""
    if "lin_hist" not in captures.arrays:
        raise ValueError("the run captured no linear histograms: add 'lin_hist' to probes.stats")
    counts, edges = captures.arrays["lin_hist"], captures.arrays["lin_edges"]
    c = counts.values.reshape(-1, counts.values.shape[-1])
    e = edges.values.reshape(-1, edges.values.shape[-1])
    steps = np.repeat(counts.steps, len(counts.sites))
    sites = np.tile(np.array(counts.sites, dtype=object), len(counts.steps))
    frames = []
    for family in BINNED_FAMILIES:
        f = fit_histogram(c, e, family)
        columns = {"step": steps, "site": sites, "layer": [layer_of(s) for s in sites], "family": family}
        columns |= {"n": f.n.astype(np.int64), "loc": f.params[:, 0], "scale": f.params[:, 1]}
        columns |= {"mean_loglik": f.mean_loglik, "aic": f.aic, "bic": f.bic, "ks": f.ks}
        frames.append(pd.DataFrame(columns))
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["step", "site", "family"], kind="stable", ignore_index=True)


def best_family(fits: pd.DataFrame, criterion: str = "bic") -> pd.Series:
    """The family with the smallest `criterion` (aic or bic) per (step, site) of a fits table."""
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion={criterion!r}: use aic or bic")
    usable = fits.dropna(subset=[criterion])
    winners = usable.loc[usable.groupby(["step", "site"])[criterion].idxmin()]
    return winners.set_index(["step", "site"])["family"]
