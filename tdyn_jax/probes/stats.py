"""Fixed-shape float32 statistics of one tensor: moments, extremes, histograms and a raw sample.

Every function here is pure `jax.numpy`, traceable inside a jitted step, and returns arrays whose
shapes depend only on the settings, never on the data. Non-finite values (nan, +-inf) are counted in
`nonfinite` and left out of every other statistic.

A tensor of more than `chunk` elements (`CHUNK` on a CPU, `ACCELERATOR_CHUNK` elsewhere) is read in
chunks (slices along its longest axis after the first), in a loop: on a CPU, where every reduction
of an expression first writes the expression out, each pass keeps its temporaries to one chunk, so
the statistics of a tokens x vocabulary tensor need no copy of it; everywhere a chunk (at most 2^31
elements) is counted exactly in int32. The tensor is neither reshaped nor converted as a whole (on a
TPU either would copy it), and the first axis, the batch that may be split over devices, is never cut.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 2**22  # elements per chunk of a large tensor's pass on a CPU (16 MiB of float32)
ACCELERATOR_CHUNK = 2**30  # on a GPU or TPU, whose fusions reduce a tensor without copying it, chunks
# only keep the int32 counts exact: a loop over chunks would make the compiler copy its operand
Sums = dict[str, jax.Array]
_MIN, _MAX = ("min", "min_nonzero"), ("max",)  # the partial results not combined by addition


def chunk_axis(shape: tuple[int, ...]) -> int:
    """The axis a large tensor is cut along: the longest after the first (the first is the batch, which
    may be split over devices), or 0 for a vector."""
    return 0 if len(shape) < 2 else 1 + int(np.argmax(shape[1:]))


def chunking(shape: tuple[int, ...], chunk: int = CHUNK) -> tuple[int, int]:
    """(width, count): the slices along `chunk_axis` per chunk and the number of chunks."""
    size = int(np.prod(shape, dtype=np.int64))
    if size <= chunk:
        return (shape[chunk_axis(shape)] if shape else 1), 1
    length = shape[chunk_axis(shape)]
    width = min(length, max(1, chunk // (size // length)))
    return width, -(-length // width)


def over_chunks(x: jax.Array, part: Callable[[jax.Array], Sums], chunk: int = CHUNK) -> Sums:
    """`part(piece)` over the chunks of x along `chunk_axis`, combined: min, max and min_nonzero by min
    and max, everything else by addition. The full-width chunks run in a loop, a narrower remainder
    after it, so every slice is read exactly once. x is sliced as it is, in its own dtype and shape: no
    reshaped or converted copy of it."""
    x = x.reshape(1) if x.ndim == 0 else x
    axis = chunk_axis(x.shape)
    width, count = chunking(x.shape, chunk)
    if count == 1:
        return part(x)
    length = x.shape[axis]
    full = length // width

    def combine(acc: Sums, new: Sums) -> Sums:
        pick = lambda k: jnp.minimum if k in _MIN else jnp.maximum if k in _MAX else jnp.add
        return {k: pick(k)(acc[k], new[k]) for k in acc}

    def body(i: jax.Array, acc: Sums) -> Sums:
        return combine(acc, part(jax.lax.dynamic_slice_in_dim(x, i * width, width, axis=axis)))

    acc = jax.lax.fori_loop(1, full, body, part(jax.lax.slice_in_dim(x, 0, width, axis=axis)))
    if length > full * width:
        acc = combine(acc, part(jax.lax.slice_in_dim(x, full * width, length, axis=axis)))
    return acc


def count(mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """The number of True entries of `mask` (along `axis`; at most 2^31 - 1 of them), exact, as
    float32: summed in float32 up to 2^24 entries (every partial sum is then an exact integer; XLA:CPU
    sums int32 several times slower, and a select of 1.0 or 0.0 is cheaper there than a bool -> float
    conversion), in int32 beyond."""
    axes = range(mask.ndim) if axis is None else np.atleast_1d(axis)
    if np.prod([mask.shape[a] for a in axes], dtype=np.int64) <= 2**24:
        return jnp.sum(jnp.where(mask, jnp.float32(1), jnp.float32(0)), axis=axis)
    return jnp.sum(mask, axis=axis, dtype=jnp.int32).astype(jnp.float32)


def bincount(idx: jax.Array, length: int) -> jax.Array:
    """Counts of the values 0 .. length-1 in the integer array `idx` (at most 2^31 - 1 elements; other
    values are dropped), exact in int32, as float32."""
    idx = jnp.where((idx >= 0) & (idx < length), idx, length)
    return jnp.zeros((length,), jnp.int32).at[idx.reshape(-1)].add(1, mode="drop").astype(jnp.float32)


def _first_pass(x: jax.Array, finite: bool, zeros: bool = True) -> Sums:
    """Sums and extremes of a chunk's finite values (`finite`: it holds no other, so nothing is
    masked); with `zeros`, the count of zeros too (else the caller takes it from the exp histogram)."""
    x = x.astype(jnp.float32)
    if finite:
        sums = {"sum": jnp.sum(x), "n": jnp.float32(x.size), "min": jnp.min(x), "max": jnp.max(x)}
        nonzero = x != 0
    else:
        keep = jnp.isfinite(x)
        sums = {
            "sum": jnp.sum(jnp.where(keep, x, 0.0)),
            "n": count(keep),
            "min": jnp.min(jnp.where(keep, x, jnp.inf)),
            "max": jnp.max(jnp.where(keep, x, -jnp.inf)),
        }
        nonzero = keep & (x != 0)
    sums["min_nonzero"] = jnp.min(jnp.where(nonzero, jnp.abs(x), jnp.inf))  # one fused expression
    return sums | ({"zeros": count(x == 0)} if zeros else {})


def _central_sums(x: jax.Array, mean: jax.Array, scale: jax.Array, finite: bool) -> Sums:
    """sum(d^k), k = 2, 3, 4, with d = (x - mean) * scale over a chunk's finite values (see
    `_first_pass` and `_standard_scale`); each power is its own expression of x (on a CPU, twice as
    fast as reusing a written-out d and d^2)."""
    x = x.astype(jnp.float32)
    d = lambda: (x - mean) * scale if finite else jnp.where(jnp.isfinite(x), (x - mean) * scale, 0.0)
    return {"d2": jnp.sum(d() ** 2), "d3": jnp.sum(d() ** 3), "d4": jnp.sum(d() ** 4)}


def _standard_scale(first: Sums) -> jax.Array:
    """2^-e, where 2^e is the power of two just above max |x - mean| (1 for a constant tensor or no
    finite value): d = (x - mean) * 2^-e lies in (-1, 1), exactly scaled, so that d^4 neither
    underflows nor overflows float32 at any magnitude of x (Adam's second moment is ~1e-21: its d^4,
    unscaled, is 0)."""
    mean = first["sum"] / first["n"]
    spread = jnp.maximum(first["max"] - mean, mean - first["min"])
    e = jnp.clip(jnp.frexp(spread)[1], -125, 126)  # 2^-e stays a normal float32
    usable = jnp.isfinite(spread) & (spread > 0)
    return jnp.where(usable, jnp.ldexp(jnp.float32(1), -e), jnp.float32(1))


def _moments(first: Sums, central: Sums, scale: jax.Array, size: int) -> dict[str, jax.Array]:
    """The statistics of `moments` from the two passes' sums (central sums of d = (x - mean) * scale:
    skewness and kurtosis do not depend on the scale, std is divided by it)."""
    n = first["n"]
    mean = first["sum"] / n
    m2, m3, m4 = (central[k] / n for k in ("d2", "d3", "d4"))
    std = jnp.sqrt(m2) / scale
    big = jnp.maximum(std, jnp.abs(mean))  # rms = sqrt(std^2 + mean^2), without squaring either
    rms = big * jnp.sqrt((std / big) ** 2 + (mean / big) ** 2)
    low, high, min_nonzero = first["min"], first["max"], first["min_nonzero"]
    return {
        "count": jnp.float32(size),
        "mean": mean,
        "std": std,
        "skewness": m3 / m2**1.5,
        "kurtosis": m4 / (m2 * m2) - 3.0,
        "rms": jnp.where(big > 0, rms, 0.0),
        "absmax": jnp.maximum(jnp.abs(low), jnp.abs(high)),
        "min": low,
        "max": high,
        "min_nonzero": jnp.where(jnp.isinf(min_nonzero), jnp.nan, min_nonzero),
        "frac_zero": first["zeros"] / jnp.float32(size),
        "nonfinite": jnp.float32(size) - n,
    }


def moments(x: jax.Array, chunk: int = CHUNK) -> dict[str, jax.Array]:
    """Moments and extremes of all elements of `x` (finite values only), in two passes.

    With n finite values and d = x - mean:
      mean = sum(x) / n;  std = sqrt(m2);  skewness = m3 / m2^1.5;  kurtosis = m4 / m2^2 - 3 (excess,
      0 for a Gaussian, 1.2 for a logistic), where m_k = sum(d^k) / n (population moments, the
      `scipy.stats` defaults), with d scaled by a power of two into (-1, 1) before its powers are
      taken, so that they hold at any magnitude of x (1e-21 to 1e+21);  rms = sqrt(m2 + mean^2);
      absmax = max |x|;  min;  max;  min_nonzero = smallest nonzero |x| (nan if there is none);
      frac_zero = #(x == 0) / count;  count = number of elements;  nonfinite = #(x is nan or inf).
      Counts are exact int32 per chunk, added in float32 (exact below 2^24, correctly rounded above).
    """
    return _passes(x, None, None, chunk)


Finite = bool | None  # True: x is all finite (no masks); False: mask nan and inf; None: find out


def _passes(
    x: jax.Array,
    exp_range: tuple[int, int] | None,
    lin: tuple[int, tuple | None] | None,
    chunk: int,
    finite: Finite = None,
) -> dict[str, jax.Array]:
    """`moments` and the histograms asked for (exp_range; lin = (bins, range or None for the finite
    min and max)) in two passes over x, chunked (see `over_chunks`): sums and extremes, then the
    central sums with the histograms. On a CPU each nan/inf mask is one more write of every chunk, so
    with `finite` None the first pass runs without masks and, only if its sum is not finite (x holds
    a nan or an inf, or its finite values overflow), again with them, in a `lax.cond`; the second pass
    takes the same branch. With the exp histogram, its middle bin counts the zeros."""
    zeros = exp_range is None
    first_pass = lambda f: over_chunks(x, lambda c: _first_pass(c, f, zeros), chunk)
    if finite is None:
        first = first_pass(True)
        all_finite = jnp.isfinite(first["sum"])
        first = jax.lax.cond(all_finite, lambda: first, lambda: first_pass(False))
    else:
        first = first_pass(finite)
    mean, scale = first["sum"] / first["n"], _standard_scale(first)
    edges = None
    if lin is not None:
        lo, hi = linear_range(*(lin[1] or (first["min"], first["max"])))
        edges = (lo, hi, lin[0])

    def second_pass(f: bool) -> Sums:
        hists = lambda c: _hist_part(c, exp_range, edges) if exp_range or edges else {}
        return over_chunks(x, lambda c: _central_sums(c, mean, scale, f) | hists(c), chunk)

    if finite is None:
        sums = jax.lax.cond(all_finite, lambda: second_pass(True), lambda: second_pass(False))
    else:
        sums = second_pass(finite)
    if not zeros:
        first["zeros"] = sums["exp_hist"][exp_hist_bins(*exp_range) // 2]
    out = _moments(first, sums, scale, x.size)
    out |= {k: sums[k] for k in ("exp_hist", "lin_hist") if k in sums}
    if edges:
        out["lin_edges"] = jnp.linspace(edges[0], edges[1], lin[0] + 1, dtype=jnp.float32)
    return out


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
    """The `exp_histogram` bin of each element of x (float32); `exp_hist_bins` for non-finite x.

    A finite nonzero x falls in the bin of its sign and of e = clip(floor(log2 |x|), exp_min-1,
    exp_max); x == 0 in the middle bin. e is read from the exponent bits (subnormals, whose exponent
    bits are 0, go to the lowest bin) unless exp_min reaches into the subnormal range.
    """
    per_sign = exp_max - exp_min + 2
    biased = (jax.lax.bitcast_convert_type(x, jnp.int32) >> 23) & 0xFF
    e = jnp.frexp(x)[1] - 1 if exp_min - 1 < -126 else biased - 127
    e = jnp.clip(e, exp_min - 1, exp_max) - (exp_min - 1)  # 0 .. per_sign-1
    idx = jnp.where(x > 0, per_sign + 1 + e, per_sign - 1 - e)
    idx = jnp.where(x == 0, per_sign, idx)
    return jnp.where(biased == 0xFF, exp_hist_bins(exp_min, exp_max), idx)  # nan and inf: dropped


def exp_histogram(x: jax.Array, exp_min: int, exp_max: int, chunk: int = CHUNK) -> jax.Array:
    """Signed log2 histogram with edges fixed for the whole run (see `exp_hist_labels` and `exp_bin`);
    non-finite values are not counted. Counts are exact (see `moments`) as float32."""
    return _histograms(x, (exp_min, exp_max), None, chunk)["exp_hist"]


def linear_range(lo: jax.Array | float, hi: jax.Array | float) -> tuple[jax.Array, jax.Array]:
    """The range [lo, hi] of `linear_histogram`: [0, 1] where lo or hi is not finite (no finite value).

    A range narrower than max(|lo|, |hi|, 2^-100) * 2^-10 (a constant or nearly constant tensor) is
    widened to that width above lo, so that the bins are distinct float32 intervals; the width is
    relative, so a tensor of tiny values (Adam's second moment, say) keeps a histogram of its own range.
    """
    lo, hi = jnp.float32(lo), jnp.float32(hi)
    lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 1.0)
    min_width = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), 2.0**-100) * 2.0**-10
    return lo, jnp.where(hi - lo >= min_width, hi, lo + min_width)


def linear_bin(x: jax.Array, lo: jax.Array, hi: jax.Array, bins: int) -> jax.Array:
    """The bin of each element of x (float32) among `bins` equal bins on [lo, hi]: x in [lo, hi]
    goes to min(floor((x - lo) * s), bins - 1) with s = bins / (hi - lo), computed in float32 (each
    operation rounded, as numpy's float32 arithmetic does); `bins` (dropped) for x outside [lo, hi]
    or non-finite. The bins are intervals that begin at the nominal edges lo + k (hi - lo) / bins up to
    float32 rounding, and one index per element needs no look-up of the edges."""
    scale = jnp.float32(bins) / (hi - lo)
    idx = jnp.clip(jnp.floor((x - lo) * scale), 0, bins - 1).astype(jnp.int32)
    return jnp.where((x >= lo) & (x <= hi), idx, bins)  # false for nan


def linear_histogram(
    x: jax.Array,
    bins: int,
    lo: jax.Array | float | None = None,
    hi: jax.Array | float | None = None,
    chunk: int = CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """(counts, edges): `bins` equal bins on [lo, hi] (default: the finite min and max of x; see
    `linear_range` and `linear_bin`) and their nominal edges; values outside [lo, hi] and non-finite
    values are not counted."""
    if lo is None or hi is None:
        first = over_chunks(x, lambda c: _first_pass(c, finite=False), chunk)
        lo, hi = first["min"] if lo is None else lo, first["max"] if hi is None else hi
    lo, hi = linear_range(lo, hi)
    counts = _histograms(x, None, (lo, hi, bins), chunk)["lin_hist"]
    return counts, jnp.linspace(lo, hi, bins + 1, dtype=jnp.float32)


Linear = tuple[jax.Array, jax.Array, int]  # lo, hi, bins


def _hist_part(x: jax.Array, exp_range: tuple[int, int] | None, lin: Linear | None) -> Sums:
    """The histogram counts of one chunk. With both histograms: one index per element, exp_bin *
    (bins + 1) + lin_bin, and one scatter into the joint counts, whose margins they are."""
    x = x.astype(jnp.float32)
    if exp_range is None:
        return {"lin_hist": bincount(linear_bin(x, *lin), lin[2])}
    exp_bins = exp_hist_bins(*exp_range)
    idx = exp_bin(x, *exp_range)
    if lin is None:
        return {"exp_hist": bincount(idx, exp_bins)}
    bins = lin[2]
    joint = bincount(idx * (bins + 1) + linear_bin(x, *lin), (exp_bins + 1) * (bins + 1))
    joint = joint.reshape(exp_bins + 1, bins + 1)
    return {"exp_hist": jnp.sum(joint[:exp_bins], axis=1), "lin_hist": jnp.sum(joint[:, :bins], axis=0)}


def _histograms(x: jax.Array, exp_range: tuple[int, int] | None, lin: Linear | None, chunk: int) -> Sums:
    return over_chunks(x, lambda c: _hist_part(c, exp_range, lin), chunk)


def seed_of(key: jax.Array) -> jax.Array:
    """A uint32 seed from a JAX PRNG key (its key data folded into one word)."""
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    return jnp.bitwise_xor.reduce(
        data * jnp.arange(1, data.size + 1, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    )


def _mix(h: jax.Array) -> jax.Array:
    """The 32-bit finaliser of MurmurHash3: every input bit flips each output bit with probability ~1/2."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def random_indices(seed: jax.Array, size: int, n: int, stream: int = 0) -> jax.Array:
    """`size` int32 indices in [0, n) (n < 2^31), drawn with replacement: a counter-based hash of (seed,
    stream, i) taken modulo n (no index is favoured by more than n / 2^32). The key k = mix(seed ^
    stream constant) enters twice, mix(mix(i ^ k) + mix(k + c)), so that nearby seeds (seed + 1, ...)
    give unrelated draws. A handful of integer ops, where a threefry draw would add hundreds to the
    compiled step."""
    key = _mix(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32((stream * 0x632BE5AB) & 0xFFFFFFFF))
    i = jnp.arange(size, dtype=jnp.uint32)
    h = _mix(_mix(i ^ key) + _mix(key + jnp.uint32(0x27D4EB2F)))
    return (h % jnp.uint32(n)).astype(jnp.int32)


def uniform_sample(x: jax.Array, seed: jax.Array, size: int) -> jax.Array:
    """`size` raw values of x drawn uniformly with replacement (one index per axis, so no index exceeds
    int32 and x is not reshaped) from the uint32 `seed`; when x has at most `size` elements, all of
    them in order, padded with nan."""
    if x.size <= size:
        flat = x.astype(jnp.float32).reshape(-1)
        return jnp.concatenate([flat, jnp.full((size - x.size,), jnp.nan, jnp.float32)])
    index = tuple(random_indices(seed, size, n, stream=1 + axis) for axis, n in enumerate(x.shape))
    return x[index].astype(jnp.float32)


_SETTINGS = ("groups", "exp_range", "lin_bins", "sample_size", "lin_range", "chunk", "finite")


@functools.partial(jax.jit, static_argnames=_SETTINGS)
def summary(
    x: jax.Array,
    seed: jax.Array,
    *,
    groups: frozenset[str],
    exp_range: tuple[int, int],
    lin_bins: int,
    sample_size: int,
    lin_range: tuple[float, float] | None = None,
    chunk: int = CHUNK,
    finite: Finite = None,
) -> dict[str, jax.Array]:
    """`moments(x)` plus the groups asked for: exp_hist, lin_hist (+ lin_edges), sample; in two passes
    over x (see `_passes`, also for `finite`; the linear histogram's range is the finite min and max
    of x, or `lin_range`)."""
    exp = exp_range if "exp_hist" in groups else None
    out = _passes(x, exp, (lin_bins, lin_range) if "lin_hist" in groups else None, chunk, finite)
    if "sample" in groups:
        out["sample"] = uniform_sample(x, seed, sample_size)
    return out
