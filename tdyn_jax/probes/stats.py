"""Fixed-shape float32 statistics of one tensor: moments, extremes, histograms and a raw sample.

Every function here is pure `jax.numpy`, traceable inside a jitted step, and returns arrays whose
shapes depend only on the settings, never on the data. Non-finite values (nan, +-inf) are counted in
`nonfinite` and left out of every other statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def moments(x: jax.Array) -> dict[str, jax.Array]:
    """Moments and extremes of all elements of `x` (finite values only).

    With n finite values and d = x - mean:
      mean = sum(x) / n;  std = sqrt(m2);  skewness = m3 / m2^1.5;  kurtosis = m4 / m2^2 - 3 (excess,
      0 for a Gaussian, 1.2 for a logistic), where m_k = sum(d^k) / n (population moments, the
      `scipy.stats` defaults);  rms = sqrt(sum(x^2) / n);  absmax = max |x|;  min;  max;
      min_nonzero = smallest nonzero |x| (nan if there is none);  frac_zero = #(x == 0) / count;
      count = number of elements;  nonfinite = #(x is nan or inf).
    """
    x = x.astype(jnp.float32).reshape(-1)
    finite = jnp.isfinite(x)
    xf = jnp.where(finite, x, 0.0)
    absx = jnp.abs(xf)
    n = jnp.sum(finite, dtype=jnp.int32).astype(jnp.float32)
    mean = jnp.sum(xf) / n
    d = jnp.where(finite, x - mean, 0.0)
    d2 = d * d
    m2, m3, m4 = jnp.sum(d2) / n, jnp.sum(d2 * d) / n, jnp.sum(d2 * d2) / n
    low, high = jnp.min(jnp.where(finite, x, jnp.inf)), jnp.max(jnp.where(finite, x, -jnp.inf))
    min_nonzero = jnp.min(jnp.where(absx > 0, absx, jnp.inf))
    return {
        "count": jnp.float32(x.size),
        "mean": mean,
        "std": jnp.sqrt(m2),
        "skewness": m3 / m2**1.5,
        "kurtosis": m4 / (m2 * m2) - 3.0,
        "rms": jnp.sqrt(jnp.sum(xf * xf) / n),
        "absmax": jnp.maximum(jnp.abs(low), jnp.abs(high)),
        "min": low,
        "max": high,
        "min_nonzero": jnp.where(jnp.isinf(min_nonzero), jnp.nan, min_nonzero),
        "frac_zero": jnp.sum(x == 0, dtype=jnp.int32).astype(jnp.float32) / x.size,
        "nonfinite": jnp.float32(x.size) - n,
    }


def exp_hist_bins(exp_min: int, exp_max: int) -> int:
    """Number of bins of `exp_histogram`: per sign, exponents exp_min-1 .. exp_max, plus one zero bin."""
    return 2 * (exp_max - exp_min + 2) + 1


def exp_hist_labels(exp_min: int, exp_max: int) -> np.ndarray:
    """Signed exponent of each bin of `exp_histogram`: -(e + 1000) for negative x, 0 for zero, e + 1000
    for positive x, where bin e holds 2^e <= |x| < 2^(e+1) (e = exp_min-1 also holds smaller |x|, e =
    exp_max also larger). The 1000 offset keeps the sign of e = 0 apart from the zero bin."""
    exps = np.arange(exp_min - 1, exp_max + 1)
    return np.concatenate([-(exps[::-1] + 1000), [0], exps + 1000])


def exp_histogram(x: jax.Array, exp_min: int, exp_max: int) -> jax.Array:
    """Signed log2 histogram with edges fixed for the whole run (see `exp_hist_labels` for the bins).

    A finite nonzero x falls in the bin of its sign and of e = clip(floor(log2 |x|), exp_min-1,
    exp_max); x == 0 in the middle bin; non-finite values nowhere. Counts are exact (int32) as float32.
    """
    x = x.astype(jnp.float32).reshape(-1)
    per_sign = exp_max - exp_min + 2
    e = jnp.clip(jnp.frexp(x)[1] - 1, exp_min - 1, exp_max) - (exp_min - 1)  # 0 .. per_sign-1
    idx = jnp.where(x > 0, per_sign + 1 + e, per_sign - 1 - e)
    idx = jnp.where(x == 0, per_sign, idx)
    nbins = exp_hist_bins(exp_min, exp_max)
    idx = jnp.where(jnp.isfinite(x), idx, nbins)  # out of range: dropped
    counts = jnp.zeros((nbins,), jnp.int32).at[idx].add(1, mode="drop")
    return counts.astype(jnp.float32)


def linear_histogram(
    x: jax.Array, bins: int, lo: jax.Array | float | None = None, hi: jax.Array | float | None = None
) -> tuple[jax.Array, jax.Array]:
    """(counts, edges): `bins` equal bins on [lo, hi] (default: the finite min and max of x).

    Same rule as `numpy.histogram(x, bins=edges)`: bin k holds edges[k] <= x < edges[k+1], the last bin
    also holds x == edges[-1]; values outside [lo, hi] and non-finite values are not counted. A range
    narrower than max(|lo|, |hi|, 2^-100) * 2^-10 (a constant or nearly constant tensor) is widened to
    that width above lo, so that the edges are distinct float32 numbers; the width is relative, so a
    tensor of tiny values (Adam's second moment, say) keeps a histogram of its own range.
    """
    x = x.astype(jnp.float32).reshape(-1)
    finite = jnp.isfinite(x)
    lo = jnp.min(jnp.where(finite, x, jnp.inf)) if lo is None else jnp.float32(lo)
    hi = jnp.max(jnp.where(finite, x, -jnp.inf)) if hi is None else jnp.float32(hi)
    lo, hi = jnp.where(finite.any(), lo, 0.0), jnp.where(finite.any(), hi, 1.0)
    min_width = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), 2.0**-100) * 2.0**-10
    hi = jnp.where(hi - lo >= min_width, hi, lo + min_width)
    edges = jnp.linspace(lo, hi, bins + 1, dtype=jnp.float32)
    idx = jnp.clip(jnp.floor((x - lo) * (bins / (hi - lo))), 0, bins - 1).astype(jnp.int32)
    # exact against the stored edges, as numpy does: move one bin down or up where rounding missed
    idx = jnp.where(x < edges[idx], idx - 1, idx)
    idx = jnp.where((x >= edges[idx + 1]) & (idx < bins - 1), idx + 1, idx)
    inside = finite & (x >= edges[0]) & (x <= edges[-1])
    idx = jnp.where(inside, idx, bins)
    counts = jnp.zeros((bins,), jnp.int32).at[idx].add(1, mode="drop")
    return counts.astype(jnp.float32), edges


def uniform_sample(x: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """`size` raw values of x drawn uniformly with replacement; when x has at most `size` elements,
    all of them in order, padded with nan."""
    x = x.astype(jnp.float32).reshape(-1)
    if x.size <= size:
        return jnp.concatenate([x, jnp.full((size - x.size,), jnp.nan, jnp.float32)])
    return x[jax.random.randint(key, (size,), 0, x.size)]


def summary(
    x: jax.Array,
    key: jax.Array,
    *,
    groups: frozenset[str],
    exp_range: tuple[int, int],
    lin_bins: int,
    sample_size: int,
    lin_range: tuple[float, float] | None = None,
) -> dict[str, jax.Array]:
    """`moments(x)` plus the groups asked for: exp_hist, lin_hist (+ lin_edges), sample."""
    out = moments(x)
    if "exp_hist" in groups:
        out["exp_hist"] = exp_histogram(x, *exp_range)
    if "lin_hist" in groups:
        lo, hi = lin_range or (out["min"], out["max"])  # the finite range, from the moments pass
        out["lin_hist"], out["lin_edges"] = linear_histogram(x, lin_bins, lo, hi)
    if "sample" in groups:
        out["sample"] = uniform_sample(x, key, sample_size)
    return out
