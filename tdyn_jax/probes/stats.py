"""Fixed-shape float32 statistics of one tensor: moments, extremes, histograms and a raw sample.

Every function here is pure `jax.numpy`, traceable inside a jitted step, and returns arrays whose
shapes depend only on the settings, never on the data. Non-finite values (nan, +-inf) are counted in
`nonfinite` and left out of every other statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INT32_LIMIT = 2**31 - 1


def pieces(x: jax.Array, limit: int = INT32_LIMIT) -> jax.Array:
    """x flattened and reshaped to (p, size / p), with p the smallest divisor of its size that leaves
    at most `limit` elements per piece: an int32 count over one piece cannot overflow."""
    size = x.size
    p = next(p for p in range(-(-size // limit), size + 1) if size % p == 0) if size > limit else 1
    return x.reshape(p, size // p)


def count(mask: jax.Array, limit: int = INT32_LIMIT) -> jax.Array:
    """The number of True entries of `mask` as float32: exact int32 counts per piece of at most `limit`
    elements, added in float32 (exact below 2^24, correctly rounded above)."""
    per_piece = jnp.sum(pieces(mask, limit), axis=1, dtype=jnp.int32)
    return jnp.sum(per_piece.astype(jnp.float32))


def bincount(idx: jax.Array, length: int, limit: int = INT32_LIMIT) -> jax.Array:
    """Counts of the values 0 .. length-1 in the integer array `idx` (others are dropped), as float32:
    one scatter of int32 counts per piece of at most `limit` elements, added in float32."""
    idx = jnp.where((idx >= 0) & (idx < length), idx, length)  # out of range (negative too): dropped
    counts = jax.vmap(lambda i: jnp.zeros((length,), jnp.int32).at[i].add(1, mode="drop"))(pieces(idx, limit))
    return jnp.sum(counts.astype(jnp.float32), axis=0)


def moments(x: jax.Array) -> dict[str, jax.Array]:
    """Moments and extremes of all elements of `x` (finite values only).

    With n finite values and d = x - mean:
      mean = sum(x) / n;  std = sqrt(m2);  skewness = m3 / m2^1.5;  kurtosis = m4 / m2^2 - 3 (excess,
      0 for a Gaussian, 1.2 for a logistic), where m_k = sum(d^k) / n (population moments, the
      `scipy.stats` defaults);  rms = sqrt(sum(x^2) / n);  absmax = max |x|;  min;  max;
      min_nonzero = smallest nonzero |x| (nan if there is none);  frac_zero = #(x == 0) / count;
      count = number of elements;  nonfinite = #(x is nan or inf). Counts hold beyond 2^31 elements
      (see `count`).
    """
    x = x.astype(jnp.float32).reshape(-1)
    finite = jnp.isfinite(x)
    xf = jnp.where(finite, x, 0.0)
    absx = jnp.abs(xf)
    n = count(finite)
    mean = jnp.sum(xf) / n
    d = jnp.where(finite, x - mean, 0.0)
    d2 = d * d
    m2, m3, m4 = jnp.sum(d2) / n, jnp.sum(d2 * d) / n, jnp.sum(d2 * d2) / n
    low, high = jnp.min(jnp.where(finite, x, jnp.inf)), jnp.max(jnp.where(finite, x, -jnp.inf))
    min_nonzero = jnp.min(jnp.where(absx > 0, absx, jnp.inf))
    size = jnp.float32(x.size)
    return {
        "count": size,
        "mean": mean,
        "std": jnp.sqrt(m2),
        "skewness": m3 / m2**1.5,
        "kurtosis": m4 / (m2 * m2) - 3.0,
        "rms": jnp.sqrt(jnp.sum(xf * xf) / n),
        "absmax": jnp.maximum(jnp.abs(low), jnp.abs(high)),
        "min": low,
        "max": high,
        "min_nonzero": jnp.where(jnp.isinf(min_nonzero), jnp.nan, min_nonzero),
        "frac_zero": count(x == 0) / size,
        "nonfinite": size - n,
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


def exp_bin(x: jax.Array, exp_min: int, exp_max: int) -> jax.Array:
    """The `exp_histogram` bin of each element of x (float32, flat); `exp_hist_bins` for non-finite x.

    A finite nonzero x falls in the bin of its sign and of e = clip(floor(log2 |x|), exp_min-1,
    exp_max); x == 0 in the middle bin.
    """
    per_sign = exp_max - exp_min + 2
    e = jnp.clip(jnp.frexp(x)[1] - 1, exp_min - 1, exp_max) - (exp_min - 1)  # 0 .. per_sign-1
    idx = jnp.where(x > 0, per_sign + 1 + e, per_sign - 1 - e)
    idx = jnp.where(x == 0, per_sign, idx)
    return jnp.where(jnp.isfinite(x), idx, exp_hist_bins(exp_min, exp_max))


def exp_histogram(x: jax.Array, exp_min: int, exp_max: int) -> jax.Array:
    """Signed log2 histogram with edges fixed for the whole run (see `exp_hist_labels` and `exp_bin`);
    non-finite values are not counted. Counts are exact (see `bincount`) as float32."""
    x = x.astype(jnp.float32).reshape(-1)
    return bincount(exp_bin(x, exp_min, exp_max), exp_hist_bins(exp_min, exp_max))


def linear_edges(
    x: jax.Array, bins: int, lo: jax.Array | float | None = None, hi: jax.Array | float | None = None
) -> jax.Array:
    """The `bins` + 1 edges of `linear_histogram` on [lo, hi] (default: the finite min and max of x).

    A range narrower than max(|lo|, |hi|, 2^-100) * 2^-10 (a constant or nearly constant tensor) is
    widened to that width above lo, so that the edges are distinct float32 numbers; the width is
    relative, so a tensor of tiny values (Adam's second moment, say) keeps a histogram of its own range.
    """
    finite = jnp.isfinite(x)
    lo = jnp.min(jnp.where(finite, x, jnp.inf)) if lo is None else jnp.float32(lo)
    hi = jnp.max(jnp.where(finite, x, -jnp.inf)) if hi is None else jnp.float32(hi)
    lo, hi = jnp.where(finite.any(), lo, 0.0), jnp.where(finite.any(), hi, 1.0)
    min_width = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), 2.0**-100) * 2.0**-10
    hi = jnp.where(hi - lo >= min_width, hi, lo + min_width)
    return jnp.linspace(lo, hi, bins + 1, dtype=jnp.float32)


def linear_bin(x: jax.Array, edges: jax.Array) -> jax.Array:
    """The bin of each element of x (float32, flat) among `edges`, by the rule of
    `numpy.histogram(x, bins=edges)`: bin k holds edges[k] <= x < edges[k+1], the last bin also
    x == edges[-1]; len(edges) - 1 (one past the last bin) for x outside [lo, hi] or non-finite."""
    bins = edges.shape[0] - 1
    lo, hi = edges[0], edges[-1]
    idx = jnp.clip(jnp.floor((x - lo) * (bins / (hi - lo))), 0, bins - 1).astype(jnp.int32)
    # exact against the stored edges, as numpy does: move one bin down or up where rounding missed
    idx = jnp.where(x < edges[idx], idx - 1, idx)
    idx = jnp.where((x >= edges[idx + 1]) & (idx < bins - 1), idx + 1, idx)
    inside = jnp.isfinite(x) & (x >= lo) & (x <= hi)
    return jnp.where(inside, idx, bins)


def linear_histogram(
    x: jax.Array, bins: int, lo: jax.Array | float | None = None, hi: jax.Array | float | None = None
) -> tuple[jax.Array, jax.Array]:
    """(counts, edges): `bins` equal bins on [lo, hi] (see `linear_edges` and `linear_bin`); values
    outside [lo, hi] and non-finite values are not counted."""
    x = x.astype(jnp.float32).reshape(-1)
    edges = linear_edges(x, bins, lo, hi)
    return bincount(linear_bin(x, edges), bins), edges


def uniform_sample(x: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """`size` raw values of x drawn uniformly with replacement; when x has at most `size` elements,
    all of them in order, padded with nan."""
    x = x.astype(jnp.float32).reshape(-1)
    if x.size <= size:
        return jnp.concatenate([x, jnp.full((size - x.size,), jnp.nan, jnp.float32)])
    parts = pieces(x)  # int32 indices: a piece of the tensor, then an element of that piece
    if parts.shape[0] == 1:
        return x[jax.random.randint(key, (size,), 0, x.size)]
    which, where = jax.random.split(key)
    rows = jax.random.randint(which, (size,), 0, parts.shape[0])
    return parts[rows, jax.random.randint(where, (size,), 0, parts.shape[1])]


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
    """`moments(x)` plus the groups asked for: exp_hist, lin_hist (+ lin_edges), sample.

    Both histograms come from one integer index per element, exp_bin * (lin_bins + 1) + lin_bin, and
    one scatter into their joint counts, whose margins they are.
    """
    out = moments(x)
    flat = x.astype(jnp.float32).reshape(-1)
    exp_bins = exp_hist_bins(*exp_range)
    if "lin_hist" in groups:
        lo, hi = lin_range or (out["min"], out["max"])  # the finite range, from the moments pass
        out["lin_edges"] = linear_edges(flat, lin_bins, lo, hi)
        lin_idx = linear_bin(flat, out["lin_edges"])
        if "exp_hist" in groups:
            joint = bincount(
                exp_bin(flat, *exp_range) * (lin_bins + 1) + lin_idx, (exp_bins + 1) * (lin_bins + 1)
            )
            joint = joint.reshape(exp_bins + 1, lin_bins + 1)
            out["exp_hist"] = jnp.sum(joint[:exp_bins], axis=1)
            out["lin_hist"] = jnp.sum(joint[:, :lin_bins], axis=0)
        else:
            out["lin_hist"] = bincount(lin_idx, lin_bins)
    elif "exp_hist" in groups:
        out["exp_hist"] = bincount(exp_bin(flat, *exp_range), exp_bins)
    if "sample" in groups:
        out["sample"] = uniform_sample(x, key, sample_size)
    return out
