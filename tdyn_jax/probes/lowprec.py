"""Simulated low-precision matmuls: FP8 E4M3, FP8 E5M2 and INT8 casts of A and W, and the E/R format
(E in the log domain with f fractional bits, R with k uniform bits), each measured by the relative error
of C = A @ W."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# name -> (dtype of the cast or None for integers, largest finite magnitude)
FORMATS = {"e4m3": (jnp.float8_e4m3fn, 448.0), "e5m2": (jnp.float8_e5m2, 57344.0), "int8": (None, 127.0)}
SCALINGS = ("none", "tensor", "channel")


def scale(x: jax.Array, fmt: str, scaling: str, axis: int) -> jax.Array:
    """The divisor that maps x onto the format: 1 (none), absmax(x) / fmt_max (tensor), or that per
    slice along `axis` (channel: per row of A with axis=-1, per column of W with axis=-2)."""
    top = FORMATS[fmt][1]
    if scaling == "none":
        return jnp.float32(1.0)
    amax = jnp.max(jnp.abs(x), axis=None if scaling == "tensor" else axis, keepdims=scaling != "tensor")
    amax = amax.astype(jnp.float32)  # the max of x's own dtype is exact: no float32 copy of x
    return jnp.where(amax > 0, amax / top, 1.0)


def quantize(x: jax.Array, fmt: str, s: jax.Array) -> jax.Array:
    """x / s saturated to the format's range, rounded to the format (nearest, ties to even), times s."""
    dtype, top = FORMATS[fmt]
    y = jnp.clip(x / s, -top, top)
    y = jnp.round(y) if dtype is None else y.astype(dtype).astype(jnp.float32)
    return y * s


def range_loss(x: jax.Array, fmt: str, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(underflow, overflow) as fractions: nonzero x that quantize to 0, over the nonzero count; and x
    whose rounded x / s lies beyond the format's largest magnitude (saturated), over all elements."""
    dtype, top = FORMATS[fmt]
    nonzero = x != 0
    under = jnp.sum(nonzero & (quantize(x, fmt, s) == 0)) / jnp.maximum(jnp.sum(nonzero), 1)
    y = x / s
    rounded = jnp.round(y) if dtype is None else y.astype(dtype).astype(jnp.float32)
    over = jnp.mean(~(jnp.abs(rounded) <= top))  # the fp8 cast of an overflow is nan or inf
    return under.astype(jnp.float32), over.astype(jnp.float32)


def _rows_matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """a (r, k) times w: one (k, m) matrix for all rows, or one (r, k, m) per row."""
    if w.ndim == 2:
        return jnp.matmul(a, w, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("rk,rkm->rm", a, w, precision=jax.lax.Precision.HIGHEST)


def log_quantize(x: jax.Array, frac_bits: int) -> jax.Array:
    """2^(round(log2(x) 2^f) / 2^f) for x > 0 (0 elsewhere): x rounded in the log domain to f fractional
    bits of its exponent; f = 0 gives the nearest power of two (relative error at most 2^(2^-(f+1)) - 1)."""
    steps = 2.0**frac_bits
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, jnp.exp2(jnp.round(jnp.log2(safe) * steps) / steps), 0.0)


def rel_error(approx: jax.Array, exact: jax.Array) -> jax.Array:
    """||approx - exact||_F / ||exact||_F."""
    return jnp.sqrt(jnp.sum((approx - exact) ** 2) / jnp.sum(exact * exact))


def _row_scales(
    whole: jax.Array, rows: jax.Array, fmt: str, scalings: tuple[str, ...], axis: int
) -> jax.Array:
    """The scales of `rows` for each scaling, stacked on a new leading axis: none and tensor from the
    whole operand, channel from the rows themselves (the slices along `axis`)."""
    shape = list(rows.shape)
    shape[axis] = 1
    pick = lambda sc: scale(rows if sc == "channel" else whole, fmt, sc, axis)
    return jnp.stack([jnp.broadcast_to(pick(sc), shape) for sc in scalings])


def _format_stats(
    a: jax.Array,
    w: jax.Array,
    a_rows: jax.Array,
    w_rows: jax.Array,
    exact: jax.Array,
    fmt: str,
    scalings: tuple[str, ...],
) -> dict[str, jax.Array]:
    """The range losses and the error of C in format `fmt`, for all `scalings` at once."""
    sa, sw = _row_scales(a, a_rows, fmt, scalings, -1), _row_scales(w, w_rows, fmt, scalings, -2)

    def one_scaling(scales: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        s_a, s_w = scales
        quantized = _rows_matmul(quantize(a_rows, fmt, s_a), quantize(w_rows, fmt, s_w))
        return *range_loss(a_rows, fmt, s_a), *range_loss(w_rows, fmt, s_w), rel_error(quantized, exact)

    a_under, a_over, w_under, w_over, errors = jax.lax.map(one_scaling, (sa, sw))
    out = {}
    for i, sc in enumerate(scalings):
        name = f"{fmt}/{sc}"
        out[f"{name}/a_underflow"], out[f"{name}/a_overflow"] = a_under[i], a_over[i]
        out[f"{name}/w_underflow"], out[f"{name}/w_overflow"] = w_under[i], w_over[i]
        out[f"{name}/rel_err"] = errors[i]
    return out


def lowprec_stats(
    a: jax.Array,
    w: jax.Array,
    a_rows: jax.Array,
    w_rows: jax.Array,
    *,
    formats: tuple[str, ...],
    scalings: tuple[str, ...],
    r_bits: tuple[int, ...],
    e_frac_bits: tuple[int, ...],
) -> dict[str, jax.Array]:
    """Low-precision errors of one matmul, measured on a subset of its rows.

    a (g, n, k) and w (g, k, m) are the whole operands, used only for the per-tensor scales; every
    statistic is measured on the rows a_rows (r, k) with their w_rows ((k, m), or (r, k, m) when each
    row has its own group). For each format F and scaling S (F/S/...): a_underflow, a_overflow of
    a_rows, w_underflow, w_overflow of w_rows, and rel_err = ||Q(A) Q(W) - A W|| / ||A W|| (Frobenius,
    over the rows). Channel scaling scales A per row (token) and W per column (output channel). The
    scalings of one format run one after the other in a loop, so one quantized copy is alive at a time.
    For each k in r_bits, with Q_k(R) = round(R L) / L, L = 2^(k-1) - 1 (k uniform bits on [-1, 1]):
    r{k}/rel_err rebuilds C as E_ij * Q_k(R_ij) (E exact: it is only the n + m norms), and for each f
    in e_frac_bits er/e{f}/r{k}/rel_err as log_quantize(E_ij, f) * Q_k(R_ij) (E in the log domain).
    """
    a_rows, w_rows = a_rows.astype(jnp.float32), w_rows.astype(jnp.float32)
    exact = _rows_matmul(a_rows, w_rows)
    out = {}
    for fmt in formats:
        out |= _format_stats(a, w, a_rows, w_rows, exact, fmt, scalings)
    u = jnp.sqrt(jnp.sum(a_rows * a_rows, axis=-1))[:, None]
    v = jnp.sqrt(jnp.sum(w_rows * w_rows, axis=-2))
    e = u * v
    r = jnp.where(e > 0, exact / jnp.where(e > 0, e, 1.0), 0.0)
    e_logs = {f: log_quantize(e, f) for f in e_frac_bits}
    for k in r_bits:
        levels = 2.0 ** (k - 1) - 1
        r_q = jnp.round(r * levels) / levels
        out[f"r{k}/rel_err"] = rel_error(e * r_q, exact)
        for f, e_log in e_logs.items():
            out[f"er/e{f}/r{k}/rel_err"] = rel_error(e_log * r_q, exact)
    return out
