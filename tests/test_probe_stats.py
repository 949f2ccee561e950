"""Tests of `tdyn_jax.probes` statistics (stats, outliers, energy, lowprec) against float64 numpy/scipy
references computed on the same float32 data."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import scipy.stats

from tdyn_jax.probes import energy, lowprec, outliers, stats

# ----------------------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------------------

FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e2m1": ml_dtypes.float4_e2m1fn}
FMT_MAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0, "int8": 127.0}


def ref_moments(x):
    """The documented statistics of `stats.moments`, in float64 (finite values only)."""
    x = np.asarray(x, np.float32).reshape(-1)
    xf = x[np.isfinite(x)].astype(np.float64)
    nz = np.abs(xf[xf != 0])
    return {
        "count": x.size,
        "mean": xf.mean(),
        "std": xf.std(ddof=0),
        "skewness": scipy.stats.skew(xf, bias=True),
        "kurtosis": scipy.stats.kurtosis(xf, fisher=True, bias=True),
        "rms": np.sqrt(np.mean(xf**2)),
        "absmax": np.abs(xf).max(),
        "min": xf.min(),
        "max": xf.max(),
        "min_nonzero": nz.min() if nz.size else np.nan,
        "frac_zero": np.sum(x == 0) / x.size,
        "nonfinite": np.sum(~np.isfinite(x)),
    }


def ref_exp_histogram(x, exp_min, exp_max):
    """Counts per label of `stats.exp_hist_labels`, labels computed with np.frexp in float64."""
    x = np.asarray(x, np.float32).reshape(-1)
    x = x[np.isfinite(x)].astype(np.float64)
    _, e = np.frexp(np.abs(x))
    e = np.clip(e - 1, exp_min - 1, exp_max)  # floor(log2 |x|) for normal nonzero x
    label = np.where(x == 0, 0, np.sign(x) * (e + 1000))
    return np.array([np.sum(label == lab) for lab in stats.exp_hist_labels(exp_min, exp_max)])


def ref_outliers(x, topk, rows=None):
    """Straightforward float64 versions of the formulas in `outliers.outlier_metrics` (the median-based
    ones on the tokens `rows`, default all)."""
    d = x.shape[-1]
    a = np.abs(np.asarray(x, np.float64).reshape(-1, d))
    sampled = a if rows is None else a[rows]
    s = np.sqrt(np.mean(a**2, axis=0))  # RMS of each channel
    order = np.argsort(-a.reshape(-1), kind="stable")[:topk]
    return {
        "rms_kurtosis": np.mean(s**4) / np.mean(s**2) ** 2,
        "max_median_ratio": np.mean(sampled.max(axis=1) / np.median(sampled, axis=1)),
        "int8_outlier_channels": np.sum(100 * np.sum(a >= 6, axis=0) >= 6 * a.shape[0]),  # >= 6%
        "massive_ratio": a.reshape(-1)[order] / np.median(sampled),
        "massive_channel": order % d,
        "massive_token": order // d,
    }


def ref_linear_bins(x, edges):
    """The bin of each x under the rule of `stats.linear_bin` on [edges[0], edges[-1]], in numpy float32
    arithmetic (-1 outside the range or non-finite)."""
    x, lo, hi = np.asarray(x, np.float32), np.float32(edges[0]), np.float32(edges[-1])
    bins = len(edges) - 1
    scale = np.float32(bins) / (hi - lo)
    with np.errstate(invalid="ignore"):
        idx = np.clip(np.floor((x - lo) * scale), 0, bins - 1)
        return np.where((x >= lo) & (x <= hi), idx, -1).astype(np.int64)


def ref_linear_counts(x, edges):
    """Counts of `stats.linear_histogram` with these (stored) edges."""
    idx = ref_linear_bins(np.asarray(x).reshape(-1), edges)
    return np.bincount(idx[idx >= 0], minlength=len(edges) - 1)


def ref_energy_matrix(u, v):
    """E_gij = u_gi v_gj, materialised in float64."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return u[:, :, None] * v[:, None, :]


def ref_scale(x, fmt, scaling, axis):
    """float32 divisor as documented: 1, absmax / fmt_max over all of x, or per slice along `axis`, or
    the slice's L2 norm / fmt_max (er)."""
    x = np.asarray(x, np.float32)
    if scaling == "none":
        return np.float32(1.0)
    if scaling == "er":
        norm = np.sqrt(np.sum(np.float64(x) ** 2, axis=axis, keepdims=True))
        return np.where(norm > 0, norm / FMT_MAX[fmt], 1.0).astype(np.float32)
    amax = np.max(np.abs(x), axis=None if scaling == "tensor" else axis, keepdims=scaling != "tensor")
    return np.where(amax > 0, amax / np.float32(FMT_MAX[fmt]), np.float32(1.0)).astype(np.float32)


def ref_quantize(x, fmt, s):
    """float32 round trip through the format with ml_dtypes (fp8) or np.round (int8)."""
    x, s, top = np.asarray(x, np.float32), np.asarray(s, np.float32), np.float32(FMT_MAX[fmt])
    y = np.clip(x / s, -top, top)
    y = np.round(y) if fmt == "int8" else y.astype(FP8[fmt]).astype(np.float32)
    return (y * s).astype(np.float32)


def ref_overflows(y, fmt):
    """Whether y rounds (nearest, ties to even) beyond the format's largest magnitude: e4m3 saturates
    above 464 (the tie 464 goes to 448), e5m2 at 61440 (the tie goes to 2^16), e2m1 at 7 (the tie
    goes to 8), int8 at 127.5."""
    y = np.abs(np.asarray(y, np.float64))
    return y > 464.0 if fmt == "e4m3" else y >= {"e5m2": 61440.0, "e2m1": 7.0, "int8": 127.5}[fmt]


# block formats as the OCP MX and NVFP4 specifications describe them: element format, block size,
# scale kind, and the exponent of the element format's largest normal
REF_BLOCKS = {
    "mxfp8_e4m3": ("e4m3", 32, "e8m0"),
    "mxfp8_e5m2": ("e5m2", 32, "e8m0"),
    "mxfp4": ("e2m1", 32, "e8m0"),
    "nvfp4": ("e2m1", 16, "e4m3"),
}
REF_EMAX = {"e4m3": 8, "e5m2": 15, "e2m1": 2}


def ref_quantize_blocks(x, fmt, axis, tensor_amax):
    """(q, underflow, overflow, mean block log2 range) of x in a block format, blocks along `axis`,
    in numpy: the scales in float64 (MX: 2^(floor(log2 amax) - emax)) or float32 (NVFP4), the
    elements through ml_dtypes."""
    element, size, kind = REF_BLOCKS[fmt]
    x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    n = x.shape[-1]
    blocks = np.concatenate([x, np.zeros((*x.shape[:-1], -n % size), np.float32)], -1)
    blocks = blocks.reshape(*x.shape[:-1], -1, size)
    amax = np.abs(blocks).max(-1, keepdims=True)
    if kind == "e8m0":
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(amax.astype(np.float64))) - REF_EMAX[element]
        scale = np.where(amax > 0, 2.0 ** np.clip(e, -126, 127), 1.0).astype(np.float32)
    else:
        g = np.float32(tensor_amax) / np.float32(448.0 * 6.0)
        scale = (amax / (np.float32(6.0) * g)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * g
    top = np.float32(FMT_MAX[element])
    y = np.where(scale > 0, blocks / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(y, -top, top).astype(FP8[element]).astype(np.float32) * scale
    q = np.moveaxis(q.reshape(*x.shape[:-1], -1)[..., :n], -1, axis)
    nonzero = x != 0
    under = np.sum(nonzero & (np.moveaxis(q, axis, -1) == 0)) / max(np.sum(nonzero), 1)
    over = np.sum(ref_overflows(y, element)) / x.size
    a = np.abs(blocks.astype(np.float64))
    used = a.max(-1) > 0
    low = np.where(a > 0, a, np.inf).min(-1)
    ranges = np.log2(a.max(-1)[used] / low[used])
    return q, under, over, ranges.mean() if ranges.size else 0.0


def ref_range_loss(x, fmt, s):
    """(underflow, overflow) fractions of `lowprec.range_loss`."""
    x = np.asarray(x, np.float32)
    nonzero = x != 0
    under = np.sum(nonzero & (ref_quantize(x, fmt, s) == 0)) / max(np.sum(nonzero), 1)
    over = np.mean(ref_overflows(x / np.asarray(s, np.float32), fmt))
    return under, over


def matmul64(a, w):
    """a (r, k) times w (k, m), or times w[j] for the j-th of G equal runs of rows for w (G, k, m),
    in float64."""
    a, w = np.asarray(a, np.float64), np.asarray(w, np.float64)
    return a @ w if w.ndim == 2 else np.einsum("rk,rkm->rm", a, np.repeat(w, len(a) // len(w), axis=0))


def rel_err64(approx, exact):
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


def ref_log_code(e, f, bits=8):
    """(E as a `bits`-bit log2 code on 2^-f steps below its largest value, the fraction clamped)."""
    code = np.round(np.log2(e / e.max()) * 2.0**f)
    floor = -(2.0**bits - 1)
    return e.max() * np.exp2(np.maximum(code, floor) / 2.0**f), np.mean(code < floor)


def ref_lowprec_stats(a, w, a_rows, w_rows, formats, scalings, r_bits, e_frac_bits):
    """float64 version of `lowprec.lowprec_stats` built from the ml_dtypes casts: everything on the rows,
    the per-tensor scales of the gemm from the whole operands, those of the stored C from the grid."""
    exact = matmul64(a_rows, w_rows)
    out = {}
    for fmt in formats:
        for scaling in scalings:
            name = f"gemm/{fmt}/{scaling}"
            sa, sw = ref_scale(a, fmt, scaling, -1), ref_scale(w, fmt, scaling, -2)
            if scaling in ("channel", "er"):
                sa, sw = ref_scale(a_rows, fmt, scaling, -1), ref_scale(w_rows, fmt, scaling, -2)
            out[f"{name}/a_underflow"], out[f"{name}/a_overflow"] = ref_range_loss(a_rows, fmt, sa)
            out[f"{name}/w_underflow"], out[f"{name}/w_overflow"] = ref_range_loss(w_rows, fmt, sw)
            approx = matmul64(ref_quantize(a_rows, fmt, sa), ref_quantize(w_rows, fmt, sw))
            out[f"{name}/rel_err"] = rel_err64(approx, exact)
        c = f32(exact)
        for scaling, axis in (("tensor", None), ("row", -1)):
            s = ref_scale(c, fmt, "tensor" if axis is None else "channel", -1)
            name = f"store/{fmt}/{scaling}"
            out[f"{name}/underflow"], out[f"{name}/overflow"] = ref_range_loss(c, fmt, s)
            out[f"{name}/rel_err"] = rel_err64(ref_quantize(c, fmt, s), exact)
    u = np.linalg.norm(np.asarray(a_rows, np.float64), axis=-1)[:, None]
    v = np.linalg.norm(np.asarray(w_rows, np.float64), axis=-2)
    e = u * (v if v.ndim == 1 else np.repeat(v, len(u) // len(v), axis=0))
    r = exact / e
    codes = {"exact": e}
    for f in e_frac_bits:
        codes[f"e{f}"], out[f"store/er/e{f}/e_clamped"] = ref_log_code(e, f)
    for k in r_bits:
        levels = 2.0 ** (k - 1) - 1
        r_max = np.abs(r).max()
        r_codes = {
            f"r{k}": np.round(r * levels) / levels,
            f"r{k}s": np.round(r / r_max * levels) / levels * r_max,
        }
        for e_name, e_q in codes.items():
            for r_name, r_q in r_codes.items():
                out[f"store/er/{e_name}/{r_name}/rel_err"] = rel_err64(e_q * r_q, exact)
    return out


def f32(x):
    return np.asarray(x, np.float32)


def to_np(tree):
    return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------------------------------
# jitted functions under test (one compilation per shape)
# ----------------------------------------------------------------------------------------------------

EXP_MIN, EXP_MAX = -10, 10
LIN_BINS = 16
SAMPLE = 256
TOPK = 3
FORMATS = ("e4m3", "e5m2", "e2m1", "int8")
SCALINGS = ("none", "tensor", "channel", "er")
R_BITS = (4, 8)
E_FRAC_BITS = (0, 3)

moments = jax.jit(stats.moments)
exp_histogram = jax.jit(functools.partial(stats.exp_histogram, exp_min=EXP_MIN, exp_max=EXP_MAX))
linear_histogram = jax.jit(stats.linear_histogram, static_argnums=1)
uniform_sample = jax.jit(stats.uniform_sample, static_argnums=2)


def _outlier_metrics(x, topk, rows):
    """Every outlier metric of x, the median-based ones on the token rows `rows`, as the probed step
    computes them: in place and, on the sampled rows, after the step."""
    metrics, top = outliers.outlier_metrics(x, topk)
    return metrics | outliers.sampled_outlier_metrics(outliers.token_rows(x, rows), top)


outlier_metrics = jax.jit(_outlier_metrics, static_argnums=1)
norms = jax.jit(energy.norms)
correlation = jax.jit(energy.correlation)
energy_stats = jax.jit(energy.energy_stats)
log_split = jax.jit(energy.log_split)
quantize = jax.jit(lambda x, fmt, s: lowprec.quantize(x, fmt, s)[0] * s, static_argnums=1)
range_loss = jax.jit(lambda x, fmt, s: lowprec.quantize(x, fmt, s)[1:], static_argnums=1)
scale = jax.jit(lowprec.scale, static_argnums=(1, 2, 3))
_lowprec_stats = jax.jit(
    functools.partial(
        lowprec.lowprec_stats, formats=FORMATS, scalings=SCALINGS, r_bits=R_BITS, e_frac_bits=E_FRAC_BITS
    )
)


def lowprec_stats(a, w, a_rows, w_cols):
    """`lowprec.lowprec_stats` with the absmax of the whole operands a and w."""
    return _lowprec_stats((np.abs(a).max(), np.abs(w).max()), a_rows, w_cols)


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------

N_MOM = 4096


def heavy_tailed_data(seed=0):
    """Student-t (3 dof) values with exact zeros, nan and +-inf inserted at random places."""
    rng = np.random.default_rng(seed)
    x = f32(rng.standard_t(3, N_MOM) * 2.5 + 0.7)
    idx = rng.permutation(N_MOM)
    x[idx[:7]] = 0.0
    x[idx[7:10]] = np.nan
    x[idx[10:12]] = np.inf
    x[idx[12]] = -np.inf
    return x


# ----------------------------------------------------------------------------------------------------
# stats.moments
# ----------------------------------------------------------------------------------------------------


def test_moments_heavy_tailed_with_zeros_and_nonfinite():
    x = heavy_tailed_data()
    got, ref = to_np(moments(x)), ref_moments(x)
    assert set(got) == set(ref)
    assert all(v.dtype == np.float32 and v.shape == () for v in got.values())
    # counts are exact
    assert got["count"] == N_MOM and got["nonfinite"] == 6 == ref["nonfinite"]
    assert got["frac_zero"] == np.float32(7 / N_MOM)
    # extremes are float32 values of the data: exact
    for key in ("absmax", "min", "max", "min_nonzero"):
        assert got[key] == ref[key], key
    assert ref["min_nonzero"] > 0
    assert ref["kurtosis"] > 3  # the data really are heavy-tailed
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-5)
    np.testing.assert_allclose(got["std"], ref["std"], rtol=1e-5)
    np.testing.assert_allclose(got["rms"], ref["rms"], rtol=1e-5)
    np.testing.assert_allclose(got["skewness"], ref["skewness"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["kurtosis"], ref["kurtosis"], rtol=1e-4)


def test_moments_logistic_excess_kurtosis():
    """A large logistic sample has excess kurtosis near 1.2 and skewness near 0 (same shape: no recompile)."""
    x = f32(np.random.default_rng(1).logistic(-3.0, 0.5, N_MOM))
    got, ref = to_np(moments(x)), ref_moments(x)
    for key in ("mean", "std", "rms"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["skewness"], ref["skewness"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["kurtosis"], ref["kurtosis"], rtol=1e-4)
    assert 0.7 < got["kurtosis"] < 1.7 and abs(got["skewness"]) < 0.3
    assert got["nonfinite"] == 0 and got["frac_zero"] == 0


@pytest.mark.parametrize("magnitude", [1e-21, 1e-12, 1e12, 1e21])
def test_moments_hold_at_any_magnitude(magnitude):
    """Tiny tensors (Adam's second moment is ~1e-21) and huge ones: the powers of x - mean are taken
    after scaling by a power of two, so std, rms, skewness and kurtosis equal float64 scipy, where the
    unscaled 4th power under- or overflows float32 (same shape: no recompile)."""
    rng = np.random.default_rng(4)
    x = f32(np.abs(rng.standard_t(4, N_MOM)) * magnitude)  # one-sided, skewed, heavy-tailed
    got, ref = to_np(moments(x)), ref_moments(x)
    assert np.isfinite(got["kurtosis"]) and np.isfinite(got["skewness"]) and ref["kurtosis"] > 1
    for key in ("mean", "std", "rms"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    for key in ("skewness", "kurtosis"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, err_msg=key)


def test_moments_all_zero():
    got = to_np(moments(np.zeros(N_MOM, np.float32)))
    assert np.isnan(got["min_nonzero"])
    assert got["frac_zero"] == 1.0 and got["count"] == N_MOM and got["nonfinite"] == 0
    for key in ("mean", "std", "rms", "absmax", "min", "max"):
        assert got[key] == 0.0, key


# ----------------------------------------------------------------------------------------------------
# stats.exp_histogram
# ----------------------------------------------------------------------------------------------------


def test_exp_histogram_matches_frexp_reference():
    rng = np.random.default_rng(2)
    mags = np.exp2(rng.uniform(-20, 20, 3000))  # from below 2^EXP_MIN to above 2^EXP_MAX, all normal
    x = mags * rng.choice([-1.0, 1.0], mags.size)
    edges = [2.0**EXP_MIN, 2.0 ** (EXP_MIN - 1), 2.0**EXP_MAX, 2.0 ** (EXP_MAX + 1), 1.0, 0.5, 2.0]
    below = [np.nextafter(np.float32(e), np.float32(0)) for e in edges]  # just under each power of 2
    special = np.array([*edges, *below, 0.0, 0.0, -0.0, np.nan, np.inf, -np.inf, 3e38])
    x = f32(np.concatenate([x, special, -special]))
    got = np.asarray(exp_histogram(x))
    ref = ref_exp_histogram(x, EXP_MIN, EXP_MAX)
    nbins = stats.exp_hist_bins(EXP_MIN, EXP_MAX)
    assert got.shape == (nbins,) == (len(stats.exp_hist_labels(EXP_MIN, EXP_MAX)),)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert got.sum() == x.size - 6  # only nan, +-inf (twice each) are dropped
    labels = stats.exp_hist_labels(EXP_MIN, EXP_MAX)
    assert got[labels == 0][0] == 6  # the zeros
    # both clipped end bins of each sign hold values (x spans beyond 2^EXP_MIN and 2^EXP_MAX)
    for lab in (EXP_MIN - 1 + 1000, EXP_MAX + 1000):
        assert got[labels == lab][0] > 0 and got[labels == -lab][0] > 0


def test_exp_histogram_single_values():
    """Hand-checked bins of a few single values."""
    x = f32([1.0, 1.5, 0.999, -2.0, 0.0, 2.0**EXP_MAX * 1.5, 2.0**-30, np.nan])
    labels = stats.exp_hist_labels(EXP_MIN, EXP_MAX)
    got = np.asarray(exp_histogram(x))
    expected = {1000: 2, 999: 1, -1001: 1, 0: 1, EXP_MAX + 1000: 1, EXP_MIN - 1 + 1000: 1}
    for lab, count in zip(labels, got, strict=True):
        assert count == expected.get(int(lab), 0), lab


# ----------------------------------------------------------------------------------------------------
# stats.linear_histogram
# ----------------------------------------------------------------------------------------------------

N_LIN = 3000


def lin_data(seed=3):
    rng = np.random.default_rng(seed)
    x = f32(rng.standard_normal(N_LIN) * 0.6 + 0.1)
    x[:4] = [np.nan, np.inf, -np.inf, np.nan]
    return x


def test_linear_histogram_default_range():
    x = lin_data()
    counts, edges = to_np(linear_histogram(x, LIN_BINS))
    finite = x[np.isfinite(x)]
    assert counts.shape == (LIN_BINS,) and edges.shape == (LIN_BINS + 1,)
    assert edges[0] == finite.min() and edges[-1] == finite.max()
    np.testing.assert_array_equal(counts, ref_linear_counts(finite, edges))
    assert counts.sum() == finite.size


def test_linear_histogram_values_on_edges():
    """Values on the stored edges and their float32 neighbours go to the bins of the float32 rule, which
    are the nominal bins up to one float32 spacing (the max to the last bin)."""
    x = lin_data(4)
    _, edges = to_np(linear_histogram(x, LIN_BINS))
    inner = edges[1:-1]
    # every edge (including min and max) and the float32 neighbours of the interior edges
    planted = np.concatenate([edges, np.nextafter(inner, -np.inf), np.nextafter(inner, np.inf)])
    x[4 : 4 + planted.size] = planted
    counts, edges2 = to_np(linear_histogram(x, LIN_BINS))
    finite = x[np.isfinite(x)]
    assert edges2[0] == finite.min() and edges2[-1] == finite.max()
    np.testing.assert_array_equal(counts, ref_linear_counts(finite, edges2))
    # each planted value lies in its bin's nominal interval up to one float32 spacing at either end
    k = ref_linear_bins(planted, edges2)
    assert (k >= 0).all()
    assert (np.nextafter(planted, np.inf) >= edges2[k]).all()
    assert (planted <= np.nextafter(edges2[k + 1], np.inf)).all()


def test_linear_histogram_explicit_range():
    x = lin_data(5)
    # exact interior edges (k/8 - 1), the range ends, and values just outside the range
    x[4:12] = [-1.0, 1.0, -0.875, 0.25, 0.5, np.nextafter(np.float32(1), 2), -1.5, 2.0]
    counts, edges = to_np(linear_histogram(x, LIN_BINS, -1.0, 1.0))
    assert edges[0] == -1.0 and edges[-1] == 1.0
    finite = x[np.isfinite(x)]
    np.testing.assert_array_equal(counts, ref_linear_counts(finite, edges))
    inside = np.sum((finite >= -1) & (finite <= 1))
    assert counts.sum() == inside < finite.size  # values outside [-1, 1] are not counted


@pytest.mark.parametrize("value", [3.0, -2.5])
def test_linear_histogram_constant_tensor(value):
    x = np.full(N_LIN, value, np.float32)
    counts, edges = to_np(linear_histogram(x, LIN_BINS))
    assert counts.sum() == N_LIN and np.count_nonzero(counts) == 1
    width = np.float32(max(abs(value), 2.0**-100) * 2.0**-10)  # the documented widening of a zero range
    assert edges[0] == value and edges[-1] == np.float32(value) + width
    np.testing.assert_array_equal(counts, ref_linear_counts(x, edges))


@pytest.mark.parametrize("scale", [1e-11, 0.0])
def test_linear_histogram_of_tiny_values_keeps_their_range(scale):
    x = f32(scale * np.random.default_rng(9).gamma(0.5, size=N_LIN))  # e.g. Adam's nu early on
    counts, edges = to_np(linear_histogram(x, LIN_BINS))
    assert edges[0] == x.min() and np.isfinite(edges).all() and (np.diff(edges) > 0).all()
    if scale:  # a real range is kept as it is
        assert edges[-1] == np.float32(x.max()) and np.count_nonzero(counts) > LIN_BINS // 4
    np.testing.assert_array_equal(counts, ref_linear_counts(x, edges))


def sub_ulp_data(case):
    """Ranges narrower than LIN_BINS float32 spacings: bins thinner than one ulp of the values."""
    if case == "near_one":  # e.g. a norm gain vector one tiny update after its init of 1.0
        return np.repeat(np.float32(1.0) + np.float32(2.0**-23) * f32([0, 1, 2, 3]), N_LIN // 4)
    return np.full(N_LIN, 1e8, np.float32)  # constant with float32 spacing 8: lo + 1 == lo


@pytest.mark.parametrize("case", ["near_one", "constant_1e8"])
def test_linear_histogram_sub_ulp_range(case):
    """Counts follow the float32 rule on the stored range even when a bin is thinner than an ulp."""
    x = sub_ulp_data(case)
    counts, edges = to_np(linear_histogram(x, LIN_BINS))
    assert counts.sum() == N_LIN
    assert edges[0] == x.min()
    np.testing.assert_array_equal(counts, ref_linear_counts(x, edges))


# ----------------------------------------------------------------------------------------------------
# stats.uniform_sample
# ----------------------------------------------------------------------------------------------------


def test_uniform_sample_from_large_tensor():
    x = f32(np.random.default_rng(6).permutation(5000) * 0.25 - 300.0)  # distinct, exact values
    key0, key1 = np.uint32(0), np.uint32(1)
    s0, s0b, s1 = (np.asarray(uniform_sample(x, k, SAMPLE)) for k in (key0, key0, key1))
    assert s0.shape == (SAMPLE,) and s0.dtype == np.float32
    assert np.all(np.isin(s0, x)) and np.all(np.isin(s1, x))
    np.testing.assert_array_equal(s0, s0b)
    assert not np.array_equal(s0, s1)
    assert len(np.unique(s0)) > SAMPLE // 2  # not a constant or degenerate draw


def test_random_indices_are_uniform_and_seeded():
    """The hash-based draws: in range, reproducible, different per seed and stream, and uniform by a
    chi-square test over 100 bins (200000 draws; fails at 1e-4 for a fair draw)."""
    draw = jax.jit(stats.random_indices, static_argnums=(1, 2, 3))
    idx = np.asarray(draw(np.uint32(7), 200_000, 100, 0))
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < 100
    np.testing.assert_array_equal(idx, draw(np.uint32(7), 200_000, 100, 0))
    assert np.mean(idx != np.asarray(draw(np.uint32(8), 200_000, 100, 0))) > 0.98
    assert np.mean(idx != np.asarray(draw(np.uint32(7), 200_000, 100, 1))) > 0.98
    nearby = np.stack([np.asarray(draw(np.uint32(seed), 64, 2**20, 0)) for seed in range(7, 12)])
    assert len(np.unique(nearby)) > nearby.size - 3  # nearby seeds: unrelated draws, not permutations
    counts = np.bincount(idx, minlength=100)
    assert scipy.stats.chisquare(counts).pvalue > 1e-4
    big = np.asarray(draw(np.uint32(3), 4096, 2**31 - 1, 0))  # the full int32 range
    assert big.min() >= 0 and big.max() > 2**30 and len(np.unique(big)) == 4096
    keys = [stats.seed_of(jax.random.key(k)) for k in (0, 1)]
    assert keys[0] != keys[1] and keys[0].dtype == np.uint32


def test_uniform_sample_small_tensor_padded():
    x = f32(np.arange(37).reshape(1, 37) * -1.5)
    s = np.asarray(uniform_sample(x, np.uint32(0), SAMPLE))
    assert s.shape == (SAMPLE,)
    np.testing.assert_array_equal(s[:37], x.reshape(-1))
    assert np.all(np.isnan(s[37:]))


@pytest.mark.parametrize("chunk", [96, 250, 1000])
def test_chunked_passes_equal_one_pass(chunk):
    """A tensor larger than `chunk` is read in chunks along its longest axis after the first (the last
    overlapping the one before when the width does not divide it): every statistic equals its
    one-pass value, the counts exactly, and the float64 references."""
    x = heavy_tailed_data()[:1700].reshape(17, 100)  # with zeros, nan and inf
    assert stats.chunking((17, 100), chunk)[1] > 1
    settings = dict(groups=frozenset({"exp_hist", "lin_hist", "sample"}), exp_range=(EXP_MIN, EXP_MAX))
    settings |= dict(lin_bins=LIN_BINS, sample_size=SAMPLE)
    one = to_np(jax.jit(functools.partial(stats.summary, **settings))(x, np.uint32(0)))
    chunked = to_np(jax.jit(functools.partial(stats.summary, **settings, chunk=chunk))(x, np.uint32(0)))
    for key in ("count", "nonfinite", "frac_zero", "min", "max", "absmax", "min_nonzero"):
        assert chunked[key] == one[key], key
    for key in ("exp_hist", "lin_hist", "lin_edges", "sample"):
        np.testing.assert_array_equal(chunked[key], one[key], err_msg=key)
    ref = ref_moments(x)
    for key in ("mean", "std", "rms", "skewness", "kurtosis"):
        np.testing.assert_allclose(chunked[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(chunked["exp_hist"], ref_exp_histogram(x, EXP_MIN, EXP_MAX))
    np.testing.assert_array_equal(chunked["lin_hist"], ref_linear_counts(x[np.isfinite(x)], one["lin_edges"]))
    assert chunked["nonfinite"] == ref["nonfinite"] and chunked["count"] == x.size


@pytest.mark.parametrize("groups", [frozenset(), frozenset({"exp_hist", "lin_hist"})])
def test_summary_of_finite_data_takes_the_unmasked_passes_exactly(groups):
    """All-finite data (with zeros) take the passes without masks; without the exp histogram the zeros
    are counted, with it they come from its middle bin: every statistic equals the float64 reference
    as the masked passes' do (the same data with one nan added)."""
    x = heavy_tailed_data()
    x[~np.isfinite(x)] = 0.25
    settings = dict(groups=groups, exp_range=(EXP_MIN, EXP_MAX), lin_bins=LIN_BINS, sample_size=SAMPLE)
    run = jax.jit(functools.partial(stats.summary, **settings))
    got, ref = to_np(run(x, np.uint32(0))), ref_moments(x)
    assert got["frac_zero"] == np.float32(7 / N_MOM) and got["nonfinite"] == 0
    for key in ("absmax", "min", "max", "min_nonzero"):
        assert got[key] == ref[key], key
    for key in ("mean", "std", "rms", "skewness", "kurtosis"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    if groups:
        np.testing.assert_array_equal(got["exp_hist"], ref_exp_histogram(x, EXP_MIN, EXP_MAX))
    with_nan = x.copy()
    with_nan[5] = np.nan
    masked, ref = to_np(run(with_nan, np.uint32(0))), ref_moments(with_nan)
    assert masked["nonfinite"] == 1 and masked["frac_zero"] == got["frac_zero"]
    for key in ("mean", "std", "kurtosis"):
        np.testing.assert_allclose(masked[key], ref[key], rtol=1e-4, err_msg=key)


def test_group_rows_fall_in_few_groups_and_are_uniform():
    """A grouped matmul's sampled rows: G equal runs, each in one sampled group, every row uniform over
    all g x n (chi-square of the groups drawn and of the rows within a group, 400 seeds, fails at 1e-4
    for a fair draw), -1 padding the stored rows to their size; all rows in order when they fit."""
    from tdyn_jax.probes.capture import GROUP_RUN, group_rows

    g, n, size = 24, 40, 250
    draw = jax.jit(jax.vmap(lambda seed: group_rows(seed, g, n, size)))
    rows, stored, groups = (np.asarray(t) for t in draw(np.arange(400, dtype=np.uint32)))
    runs = size // GROUP_RUN
    assert rows.shape == (400, runs * GROUP_RUN) and groups.shape == (400, runs)
    assert np.array_equal(stored[:, : rows.shape[1]], rows) and np.all(stored[:, rows.shape[1] :] == -1)
    assert np.array_equal(rows // n, np.repeat(groups, GROUP_RUN, axis=1))
    for counts in (np.bincount(groups.ravel(), minlength=g), np.bincount((rows % n).ravel(), minlength=n)):
        assert scipy.stats.chisquare(counts).pvalue > 1e-4
    rows, stored, groups = group_rows(np.uint32(0), 3, 4, 20)
    assert np.array_equal(rows, np.arange(12)) and np.array_equal(stored[12:], [-1] * 8)
    assert np.array_equal(groups, np.arange(3))


def test_tree_stats_of_a_stack_with_a_nan_mask_only_where_needed():
    """Leaves of one shape are summarised together (vmapped): a nan in one of them is left out of that
    leaf's statistics, and the other leaves of its stack and of other stacks equal float64 numpy."""
    from configs import tiny
    from tdyn_jax.probes.capture import tree_stats
    from tdyn_jax.probes.spec import ProbeSpec

    spec = dataclasses.replace(ProbeSpec.from_config(tiny.get_config().probes), sites=("*",))
    rng = np.random.default_rng(3)
    leaves = {"a": f32(rng.standard_normal((6, 5))), "b": f32(rng.standard_normal((6, 5)) ** 3)}
    leaves |= {"c": f32(rng.logistic(size=(7,)))}
    leaves["b"][2, 3] = np.nan
    blocks = jax.jit(lambda t: tree_stats(spec, t, np.uint32(0)))({"p": leaves})
    got = {
        name: {k: np.asarray(v[j]) for k, v in b.items()}
        for names, b in blocks.items()
        for j, name in enumerate(names)
    }
    for name, x in leaves.items():
        ref = ref_moments(x)
        assert got[f"p/{name}"]["nonfinite"] == ref["nonfinite"], name
        for key in ("mean", "std", "kurtosis", "min", "max"):
            np.testing.assert_allclose(got[f"p/{name}"][key], ref[key], rtol=1e-4, err_msg=(name, key))


def test_summary_of_a_tensor_beyond_int32_traces():
    """A (512, 16, 1024, 1024) score tensor (2^33 elements) traces without an int32 overflow (shapes
    only: nothing of that size is allocated): it is read in chunks of at most 2^31 elements."""
    x = jax.ShapeDtypeStruct((512, 16, 1024, 1024), np.float32)
    summarize = functools.partial(
        stats.summary, groups=frozenset({"exp_hist", "lin_hist", "sample"}), exp_range=(EXP_MIN, EXP_MAX),
        lin_bins=8, sample_size=SAMPLE,
    )  # fmt: skip
    shapes = jax.eval_shape(summarize, x, np.uint32(0))
    assert shapes["exp_hist"].shape == (stats.exp_hist_bins(EXP_MIN, EXP_MAX),)
    assert stats.chunk_axis(x.shape) == 2  # queries: the first of the two longest after the batch
    width, count = stats.chunking(x.shape)
    assert width * 512 * 16 * 1024 < 2**31 and width * count >= 1024


# ----------------------------------------------------------------------------------------------------
# outliers.outlier_metrics
# ----------------------------------------------------------------------------------------------------


def test_outlier_metrics():
    rng = np.random.default_rng(7)
    batch, seq, d = 4, 50, 64
    x = f32(rng.standard_normal((batch * seq, d)) * rng.uniform(0.5, 2.0, d))
    x = np.clip(x, -5.5, 5.5)  # nothing reaches the int8 threshold by chance
    for ch in (5, 17, 40):  # 10% of the tokens
        x[rng.choice(batch * seq, 20, replace=False), ch] = 8.0
    x[rng.choice(batch * seq, 4, replace=False), 50] = -8.0  # 2% of the tokens: not an outlier channel
    x[rng.choice(batch * seq, 11, replace=False), 60] = 6.0  # 5.5%: just below the 6% cut
    x[rng.choice(batch * seq, 12, replace=False), 61] = -6.0  # exactly 6%: counts
    planted = [(3, 7, 1000.0), (150, 33, -800.0), (77, 0, 600.0)]  # (token, channel, value)
    for tok, ch, val in planted:
        x[tok, ch] = val
    got = to_np(outlier_metrics(x.reshape(batch, seq, d), TOPK, np.arange(batch * seq)))
    ref = ref_outliers(x, TOPK)
    assert got["int8_outlier_channels"] == ref["int8_outlier_channels"] == 4
    np.testing.assert_array_equal(got["massive_token"], [t for t, _, _ in planted])
    np.testing.assert_array_equal(got["massive_channel"], [c for _, c, _ in planted])
    np.testing.assert_array_equal(got["massive_token"], ref["massive_token"])
    np.testing.assert_array_equal(got["massive_channel"], ref["massive_channel"])
    np.testing.assert_allclose(got["massive_ratio"], ref["massive_ratio"], rtol=1e-6)
    assert np.all(np.diff(got["massive_ratio"]) < 0)  # largest first
    np.testing.assert_allclose(got["rms_kurtosis"], ref["rms_kurtosis"], rtol=1e-5)
    np.testing.assert_allclose(got["max_median_ratio"], ref["max_median_ratio"], rtol=1e-5)
    assert got["massive_channel"].dtype == np.float32 and got["massive_ratio"].shape == (TOPK,)


def test_outlier_metrics_on_sampled_rows():
    """The median-based metrics use only the tokens `rows` (repeats allowed); the massive activations
    are still the exact top values over every token, wherever they lie."""
    rng = np.random.default_rng(17)
    x = f32(rng.standard_normal((300, 48)) * rng.uniform(0.5, 3.0, 48))
    x[250, 3], x[7, 40], x[123, 3] = 900.0, -700.0, 650.0  # none of them among the sampled rows
    rows = np.concatenate([rng.choice(np.setdiff1d(np.arange(300), [7, 123, 250]), 40), [0, 0]])
    got, ref = to_np(outlier_metrics(x, TOPK, rows)), ref_outliers(x, TOPK, rows)
    np.testing.assert_array_equal(got["massive_token"][:3], [250, 7, 123])
    for key in ("massive_token", "massive_channel"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    for key in ("massive_ratio", "max_median_ratio", "rms_kurtosis"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    full = ref_outliers(x, TOPK)
    assert got["max_median_ratio"] != pytest.approx(full["max_median_ratio"], rel=1e-3)  # really sampled


def test_outlier_metrics_three_int8_channels():
    """3 channels at 8 in 10% of the tokens, one at 8 in only 2%: 3 outlier channels."""
    rng = np.random.default_rng(8)
    x = f32(np.clip(rng.standard_normal((200, 64)), -4, 4))
    for ch in (1, 2, 63):
        x[rng.choice(200, 20, replace=False), ch] = 8.0
    x[rng.choice(200, 4, replace=False), 30] = 8.0
    got = to_np(outlier_metrics(x.reshape(4, 50, 64), TOPK, np.arange(200)))
    assert got["int8_outlier_channels"] == 3
    np.testing.assert_allclose(got["rms_kurtosis"], ref_outliers(x, TOPK)["rms_kurtosis"], rtol=1e-5)


def test_rms_kurtosis_limits():
    """1 when all channels have the same RMS; d when one channel carries everything."""
    x = np.ones((4, 50, 64), np.float32)
    x[..., ::2] = -1.0
    assert abs(float(outlier_metrics(x, TOPK, np.arange(200))["rms_kurtosis"]) - 1.0) < 1e-6
    y = np.zeros((4, 50, 64), np.float32)
    y[..., 9] = 3.0
    np.testing.assert_allclose(outlier_metrics(y, TOPK, np.arange(200))["rms_kurtosis"], 64.0, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# energy
# ----------------------------------------------------------------------------------------------------


def test_norms_and_correlation():
    rng = np.random.default_rng(9)
    g, n, k, m = 3, 16, 32, 24
    a = f32(rng.standard_normal((g, n, k)) * np.array([1.0, 30.0, 0.05])[:, None, None])
    w = f32(rng.standard_normal((g, k, m)))
    w[:, :, 0] = -3.0 * a[:, 0, :]  # column 0 antiparallel to row 0: R = -1
    a[1, 5] = 0.0  # a zero row: E = 0 and R = 0 there
    u, v = to_np(norms(a, w))
    assert u.shape == (g, n) and v.shape == (g, m)
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    np.testing.assert_allclose(u, np.linalg.norm(a64, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(v, np.linalg.norm(w64, axis=-2), rtol=1e-6)
    c = f32(a64 @ w64)
    r = np.asarray(correlation(c, u[:, :, None] * v[:, None, :]))
    # R = C / (u v^T) on the given float32 inputs, and the explicit cosines of a_i and w_j
    e = u.astype(np.float64)[:, :, None] * v.astype(np.float64)[:, None, :]
    np.testing.assert_allclose(r, np.where(e > 0, c / np.where(e > 0, e, 1), 0), rtol=1e-6, atol=1e-7)
    an, wn = np.linalg.norm(a64, axis=-1), np.linalg.norm(w64, axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.nan_to_num(np.einsum("gnk,gkm->gnm", a64, w64) / (an[:, :, None] * wn[:, None, :]))
    np.testing.assert_allclose(r, cos, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(r) <= 1 + 1e-6)
    np.testing.assert_allclose(r[:, 0, 0], -1.0, rtol=1e-6)
    assert np.all(r[1, 5] == 0)


def energy_cases():
    rng = np.random.default_rng(10)
    one_u = f32(np.exp(rng.normal(0, 0.8, (1, 64))))
    one_v = f32(np.exp(rng.normal(1, 0.5, (1, 48))))
    scales = np.array([1.0, 300.0, 0.002])[:, None]
    multi_u = f32(np.exp(rng.normal(0, 0.5, (3, 64))) * scales)
    multi_v = f32(np.exp(rng.normal(0, 0.7, (3, 48))) * scales[::-1])
    multi_u[2, 7] = 0.0  # a zero norm: E min is 0, log2_range uses the smallest nonzero E
    flat_u = f32(1000.0 * (1 + 1e-3 * rng.standard_normal((3, 64))) * [[1.0], [1.001], [0.999]])
    flat_v = f32(30.0 * (1 + 2e-3 * rng.standard_exponential((3, 48))))
    return {"one_group": (one_u, one_v), "three_groups": (multi_u, multi_v), "flat": (flat_u, flat_v)}


@pytest.mark.parametrize("case", ["one_group", "three_groups", "flat"])
def test_energy_stats(case):
    u, v = energy_cases()[case]
    got = to_np(energy_stats(u, v))
    big_e = ref_energy_matrix(u, v).reshape(-1)
    nz = big_e[big_e > 0]
    ref = {
        "mean": big_e.mean(),
        "std": big_e.std(),
        "skewness": scipy.stats.skew(big_e, bias=True),
        "kurtosis": scipy.stats.kurtosis(big_e, fisher=True, bias=True),
        "rms": np.sqrt(np.mean(big_e**2)),
        "min": big_e.min(),
        "max": big_e.max(),
        "log2_range": np.log2(nz.max() / nz.min()),
    }
    assert set(got) == set(ref)
    if case == "flat":
        assert ref["std"] / ref["mean"] < 5e-3  # the regime where raw moments would cancel
    for key in ("mean", "std", "rms", "min", "max"):
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(got["skewness"], ref["skewness"], rtol=1e-4, atol=5e-4)
    np.testing.assert_allclose(got["kurtosis"], ref["kurtosis"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got["log2_range"], ref["log2_range"], rtol=1e-5, atol=1e-5)
    if case == "three_groups":
        assert got["min"] == 0 and ref["log2_range"] > 20


def test_log_split():
    rng = np.random.default_rng(11)
    g, n, k, m = 2, 24, 32, 20
    a = f32(rng.standard_normal((g, n, k)) * np.exp(rng.normal(0, 1.0, (g, n, 1))))
    w = f32(rng.standard_normal((g, k, m)) * np.exp(rng.normal(0, 0.5, (g, 1, m))) * [[[1.0]], [[8.0]]])
    c = f32(np.einsum("gnk,gkm->gnm", a.astype(np.float64), w.astype(np.float64)))
    c[0, :3, 0] = 0.0  # exact zeros are left out
    c[1, 5, 7] = 0.0
    u, v = norms(a, w)
    got = to_np(log_split(c, u[:, :, None] * v[:, None, :]))
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    ok = c != 0
    log_c = np.log2(np.abs(c[ok].astype(np.float64)))
    log_e = np.log2(u64[:, :, None] * v64[:, None, :])[ok]
    log_r = log_c - log_e
    var_c, var_e, var_r = log_c.var(), log_e.var(), log_r.var()
    cov = np.mean((log_e - log_e.mean()) * (log_r - log_r.mean()))
    np.testing.assert_allclose(got["var_log2_c"], var_c, rtol=1e-4)
    np.testing.assert_allclose(got["var_log2_e"], var_e, rtol=1e-4)
    np.testing.assert_allclose(got["var_log2_r"], var_r, rtol=1e-4)
    np.testing.assert_allclose(got["cov_log2_er"], cov, rtol=1e-4, atol=1e-5 * var_c)
    np.testing.assert_allclose(got["share_e"], var_e / var_c, rtol=1e-4)
    np.testing.assert_allclose(got["share_r"], var_r / var_c, rtol=1e-4)
    total = got["share_e"] + got["share_r"] + 2 * got["cov_log2_er"] / got["var_log2_c"]
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    assert 0.2 < got["share_e"] < 0.95  # both factors matter with these scales


# ----------------------------------------------------------------------------------------------------
# lowprec
# ----------------------------------------------------------------------------------------------------


def lowprec_data(seed=12):
    """a (2, 32, 64) with a few very large and very small planted values, w (2, 64, 48) Gaussian."""
    rng = np.random.default_rng(seed)
    a = f32(rng.standard_normal((2, 32, 64)) * rng.uniform(0.3, 3.0, (1, 1, 64)))
    a[0, 3, 5], a[1, 10, 0], a[0, 20, 63] = 1000.0, -70000.0, 500.0  # e4m3 and e5m2 overflow
    a[0, 0, :4] = [1e-4, -2e-6, 3e-8, 1e-5]  # below the fp8 subnormals unscaled
    w = f32(rng.standard_normal((2, 64, 48)) * 0.05)
    return a, w


cast = jax.jit(lowprec.cast, static_argnums=1)


@pytest.mark.parametrize("fmt", list(FP8))
def test_cast_equals_the_ml_dtypes_cast(fmt):
    """The rounding of `cast` (integer operations on the float32 bits) equals ml_dtypes' cast bit for bit
    (-0 included) at every value of the format, every midpoint (the ties), their float32 neighbours,
    float32 subnormals, and random values over 50 binades; beyond the range it saturates; nan stays
    nan."""
    top, beyond = FMT_MAX[fmt], lowprec.FORMATS[fmt][2]
    codes = np.arange(2 ** (4 if fmt == "e2m1" else 8), dtype=np.uint8).view(FP8[fmt]).astype(np.float32)
    values = np.unique(np.abs(codes[np.isfinite(codes)]))
    points = np.concatenate([values, (values[1:] + values[:-1]) / 2])
    points = np.concatenate([points, np.nextafter(points, np.inf), np.nextafter(points, -np.inf)])
    rng = np.random.default_rng(5)
    spread = f32(rng.standard_normal(200_000) * np.exp2(rng.uniform(-30, 20, 200_000)))
    x = f32(np.concatenate([points, -points, spread, [0.0, -0.0, 1e-45, -1e-45, 1e-40, np.inf, -np.inf]]))
    want = np.where(np.abs(x) < beyond, x, np.clip(x, -top, top)).astype(FP8[fmt]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(cast(x, fmt)).view(np.uint32), want.view(np.uint32))
    assert np.isnan(cast(f32([np.nan]), fmt)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize(fmt):
    a, _ = lowprec_data()
    x = a[0]  # (32, 64)
    # the rounding thresholds themselves (scale 1) and their float32 neighbours
    edge = f32(
        [464.0, 61440.0, 127.5, 0.5, 2.0**-10, 2.0**-17, 448.0, 57344.0, 126.5, 2.5, 7.0, 0.25, 0.75, 5.0]
    )
    ulp_up = np.nextafter(edge, np.float32(np.inf))
    x[1, : 3 * edge.size] = np.concatenate([edge, ulp_up, -ulp_up])
    for s in (np.float32(1.0), np.float32(0.37), f32(np.abs(x).max(axis=-1, keepdims=True) / FMT_MAX[fmt])):
        got = np.asarray(quantize(x, fmt, s))
        np.testing.assert_array_equal(got, ref_quantize(x, fmt, s))
    if fmt == "int8":  # the brief formula, written out
        s = np.float32(0.37)
        np.testing.assert_array_equal(quantize(x, fmt, s), np.round(np.clip(x / s, -127, 127)) * s)
    else:
        s = np.float32(0.37)
        top = FMT_MAX[fmt]
        want = np.clip(x / s, -top, top).astype(FP8[fmt]).astype(np.float32) * s
        np.testing.assert_array_equal(quantize(x, fmt, s), want)


def test_scale():
    a, w = lowprec_data()
    for fmt in FORMATS:
        assert float(scale(a, fmt, "none", -1)) == 1.0
        sa, sw = np.asarray(scale(a, fmt, "tensor", -1)), np.asarray(scale(w, fmt, "tensor", -2))
        for got, amax in ((sa, np.float32(70000.0)), (sw, np.abs(w).max())):
            want = amax / np.float32(FMT_MAX[fmt])
            assert got.shape == () and abs(got - want) <= np.spacing(want), fmt
        ca, cw = np.asarray(scale(a, fmt, "channel", -1)), np.asarray(scale(w, fmt, "channel", -2))
        assert ca.shape == (2, 32, 1) and cw.shape == (2, 1, 48)
        # within one float32 ulp: under jit XLA turns the division by the constant fmt_max into a
        # multiplication by its (rounded) reciprocal
        for got, axis, x in ((ca, -1, a), (cw, -2, w)):
            want = np.abs(x).max(axis=axis, keepdims=True) / np.float32(FMT_MAX[fmt])
            assert np.all(np.abs(got - want) <= np.spacing(want)), fmt
    z = a.copy()
    z[1, 4] = 0.0  # an all-zero row scales by 1
    assert np.asarray(scale(z, "e4m3", "channel", -1))[1, 4, 0] == 1.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_range_loss(fmt):
    a, _ = lowprec_data()
    x = a.copy()
    x[1, 0, :6] = [464.0, np.nextafter(np.float32(464), np.float32(1e9)), 61440.0, 61439.0, 127.5, 127.49]
    x[1, 1, :3] = 0.0  # zeros are neither underflow (not counted) nor overflow
    to_zero = f32([2.0**-10, 2.0**-17, 0.25, 0.5])  # the largest |y| that rounds to 0 in each format
    x[1, 2, :16] = np.concatenate(
        [to_zero, np.nextafter(to_zero, np.float32(1)), -to_zero, -np.nextafter(to_zero, np.float32(1))]
    )
    for scaling, axis in (("none", -1), ("tensor", -1), ("channel", -1), ("channel", -2)):
        s = ref_scale(x, fmt, scaling, axis)
        under, over = (float(t) for t in range_loss(x, fmt, s))
        ref_under, ref_over = ref_range_loss(x, fmt, s)
        assert round(under * np.sum(x != 0)) == round(ref_under * np.sum(x != 0)), scaling
        assert round(over * x.size) == round(ref_over * x.size), scaling
        np.testing.assert_allclose([under, over], [ref_under, ref_over], rtol=1e-6)
        if scaling == "none":
            assert over > 0 and under > 0
        else:
            assert over == 0.0
    # scale 1: exactly the planted values beyond the rounding thresholds overflow
    expected = {"e4m3": 6, "e5m2": 2, "int8": 8, "e2m1": np.sum(np.abs(x) >= 7.0)}[fmt]  # e2m1: 8 is next
    assert round(float(range_loss(x, fmt, np.float32(1.0))[1]) * x.size) == expected


def lowprec_rows(grouped):
    """(a, w, sampled rows of a, sampled columns of w): a grid of C = a @ w; grouped, rows in runs of 4
    from groups 1, 0, 1, each run with the columns of its group's w."""
    a, w = lowprec_data()
    cols = np.array([0, 7, 8, 20, 21, 33, 47])
    if not grouped:  # with the planted overflows
        return a, w, np.concatenate([a[0, :16], a[1, 10:11]]), w[0][:, cols]
    groups, rows = np.array([1, 0, 1]), np.array([3, 10, 20, 0, 0, 31, 8, 17, 5, 5, 30, 2])
    return a, w, a[np.repeat(groups, 4), rows], w[groups][:, :, cols]


@pytest.mark.parametrize("grouped", [False, True])
def test_lowprec_stats(grouped):
    a, w, a_rows, w_rows = lowprec_rows(grouped)
    got = to_np(lowprec_stats(a, w, a_rows, w_rows))
    ref = ref_lowprec_stats(a, w, a_rows, w_rows, FORMATS, SCALINGS, R_BITS, E_FRAC_BITS)
    assert set(got) == set(ref)
    for key, want in ref.items():
        if key.endswith(("flow", "clamped")):
            np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=0, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want, rtol=1e-4, err_msg=key)
            assert got[key] > 0, key
    for fmt in FORMATS:
        assert got[f"gemm/{fmt}/none/a_overflow"] > 0
        for scaling in ("tensor", "channel", "er"):
            name = f"gemm/{fmt}/{scaling}"
            assert got[f"{name}/a_overflow"] == 0 and got[f"{name}/w_overflow"] == 0
    # more R bits: smaller error; E in the log domain costs accuracy, less with more fractional bits
    er = lambda e, r: got[f"store/er/{e}/{r}/rel_err"]
    assert er("exact", "r8") < er("exact", "r4") and er("e0", "r8") < er("e0", "r4")
    assert er("e3", "r8") < er("e0", "r8")
    assert er("exact", "r4s") < er("exact", "r4")  # R scaled to its own range uses its levels better


def test_lowprec_stats_without_scalings_or_r_bits():
    """Empty probes.scalings or probes.r_bits drop exactly the plain formats' gemm errors or the E/R
    storage errors; every other statistic keeps its value."""
    a, w, a_rows, w_rows = lowprec_rows(False)
    amaxes = (np.abs(a).max(), np.abs(w).max())
    full = to_np(lowprec_stats(a, w, a_rows, w_rows))
    settings = dict(formats=(*FORMATS, "mxfp4"), scalings=SCALINGS, r_bits=R_BITS, e_frac_bits=E_FRAC_BITS)
    both = to_np(lowprec.lowprec_stats(amaxes, a_rows, w_rows, **settings))
    for empty, dropped in (("scalings", "gemm/(?!mxfp4)"), ("r_bits", "store/er/.*/rel_err")):
        got = to_np(lowprec.lowprec_stats(amaxes, a_rows, w_rows, **settings | {empty: ()}))
        assert set(got) == {k for k in both if not re.match(dropped, k)}, empty
        assert "gemm/mxfp4/block/rel_err" in got and "store/er/e0/e_clamped" in got
        for key, value in got.items():
            np.testing.assert_allclose(value, (full | both)[key], rtol=1e-6, err_msg=key)


quantize_blocks = jax.jit(lowprec.quantize_blocks, static_argnums=(1, 2))


@pytest.mark.parametrize("fmt", list(REF_BLOCKS))
def test_block_formats_match_the_specification(fmt, k=40):  # k = 40: the last block padded
    """MXFP8, MXFP4 and NVFP4 of rows of A (blocks along the last axis) and of columns of W (along the
    second last): every element equals the numpy/ml_dtypes reference (NVFP4 to an ulp of its scale),
    as do the underflow, overflow and block-range statistics; values that saturate in MX count as
    overflow."""
    a, w = lowprec_data()
    a, w = a[:, :, :k], w[:, :k]
    assert lowprec.BLOCK_FORMATS[fmt] == REF_BLOCKS[fmt]
    for x, axis in ((a[0], -1), (w, -2)):
        amax = np.abs(x).max()
        got = [np.asarray(t) for t in quantize_blocks(x, fmt, axis, amax)]
        ref = ref_quantize_blocks(x, fmt, axis, amax)
        if fmt == "nvfp4":  # the same E2M1 values; the float32 tensor scale may differ by an ulp
            np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, err_msg=(fmt, axis))
            np.testing.assert_array_equal(got[0] == 0, ref[0] == 0)
        else:  # powers of two: exact
            np.testing.assert_array_equal(got[0], ref[0], err_msg=(fmt, axis))
        np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-5, err_msg=(fmt, axis))
    if fmt.startswith("mx"):  # 1000 / 2^(9 - emax) lies beyond the element format's range
        assert float(quantize_blocks(a[0], fmt, -1, np.abs(a[0]).max())[2]) > 0


_lowprec_blocks = jax.jit(
    functools.partial(
        lowprec.lowprec_stats,
        formats=tuple(REF_BLOCKS),
        scalings=SCALINGS,
        r_bits=R_BITS,
        e_frac_bits=E_FRAC_BITS,
    )
)


def test_lowprec_stats_of_block_formats():
    """The error of C with both operands in a block format (blocks along k, as hardware) equals the
    float64 product of the reference quantisations; 8-bit MX beats 4-bit, and NVFP4 (blocks of 16,
    E4M3 scales) beats MXFP4 (blocks of 32, powers of two) on Gaussian operands."""
    rng = np.random.default_rng(21)
    a, w = f32(rng.standard_normal((32, 64))), f32(rng.standard_normal((64, 48)) * 0.05)
    got = to_np(_lowprec_blocks((np.abs(a).max(), np.abs(w).max()), a, w))
    exact = matmul64(a, w)
    for fmt in REF_BLOCKS:
        qa = ref_quantize_blocks(a, fmt, -1, np.abs(a).max())[0]
        qw = ref_quantize_blocks(w, fmt, -2, np.abs(w).max())[0]
        want = rel_err64(matmul64(qa, qw), exact)
        np.testing.assert_allclose(got[f"gemm/{fmt}/block/rel_err"], want, rtol=1e-4, err_msg=fmt)
        assert got[f"gemm/{fmt}/block/a_block_range"] > 1  # Gaussian blocks of 16 or 32 span binades
        c = f32(exact)
        q, under, over, blocks = ref_quantize_blocks(c, fmt, -1, np.abs(c).max())  # stored: along rows
        want = {"rel_err": rel_err64(q, exact), "underflow": under, "overflow": over, "block_range": blocks}
        for stat, value in want.items():
            np.testing.assert_allclose(
                got[f"store/{fmt}/block/{stat}"], value, rtol=1e-4, atol=1e-7, err_msg=stat
            )
    for q in ("gemm", "store"):
        err = lambda fmt, q=q: got[f"{q}/{fmt}/block/rel_err"]
        assert err("mxfp8_e4m3") < err("mxfp8_e5m2") < err("mxfp4") and err("nvfp4") < err("mxfp4")


def test_lowprec_sanity_gaussian():
    """Gaussian operands with tensor scaling: e4m3 (3 mantissa bits) beats e5m2 (2); per-channel scaling
    is no worse than per-tensor; errors have the expected magnitude (same shapes: no recompile)."""
    rng = np.random.default_rng(13)
    a = f32(rng.standard_normal((2, 32, 64)))
    w = f32(rng.standard_normal((2, 64, 48)))
    got = to_np(lowprec_stats(a, w, a[0, :16], w[0]))
    ref = ref_lowprec_stats(a, w, a[0, :16], w[0], FORMATS, SCALINGS, R_BITS, E_FRAC_BITS)
    for key in ("e4m3/tensor", "e5m2/tensor", "int8/channel", "int8/er"):
        np.testing.assert_allclose(
            got[f"gemm/{key}/rel_err"], ref[f"gemm/{key}/rel_err"], rtol=1e-4, err_msg=key
        )
    gemm = lambda name: got[f"gemm/{name}/rel_err"]
    assert gemm("e4m3/tensor") < gemm("e5m2/tensor")
    assert 0.005 < gemm("e4m3/tensor") < 0.05 and 0.01 < gemm("e5m2/tensor") < 0.1
    assert gemm("int8/channel") <= gemm("int8/tensor") * 1.01
    assert gemm("int8/channel") < gemm("int8/er")  # a unit direction holds ~1/sqrt(k): fewer levels used
    assert got["store/er/exact/r8/rel_err"] < got["store/er/exact/r4/rel_err"] / 4
