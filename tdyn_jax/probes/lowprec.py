"""Simulated low-precision matmuls: FP8 E4M3, FP8 E5M2 and INT8 casts of A and W, and the E/R format
(E in the log domain with f fractional bits, R with k uniform bits), each measured by the relative error
of C = A @ W on sampled rows and columns of C."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tdyn_jax.probes.stats import count

# name -> (dtype of the cast or None for integers, largest finite magnitude)
FORMATS = {"e4m3": (jnp.float8_e4m3fn, 448.0), "e5m2": (jnp.float8_e5m2, 57344.0), "int8": (None, 127.0)}
SCALINGS = ("none", "tensor", "channel")


def absmax(x: jax.Array, axis: int | None = None, keepdims: bool = False) -> jax.Array:
    """max |x| (along `axis`), as float32: max(max x, -min x), two reductions of x itself and no |x|
    copy; exact (the max of x's own dtype)."""
    top = jnp.maximum(jnp.max(x, axis=axis, keepdims=keepdims), -jnp.min(x, axis=axis, keepdims=keepdims))
    return top.astype(jnp.float32)


def scale_of(amax: jax.Array, fmt: str) -> jax.Array:
    """The divisor that maps values of largest magnitude `amax` onto the format's: amax / fmt_max
    (1 where amax is 0)."""
    return jnp.where(amax > 0, amax / FORMATS[fmt][1], 1.0)


def scale(x: jax.Array, fmt: str, scaling: str, axis: int) -> jax.Array:
    """The divisor that maps x onto the format: 1 (none), absmax(x) / fmt_max (tensor), or that per
    slice along `axis` (channel: per row of A with axis=-1, per column of W with axis=-2)."""
    if scaling == "none":
        return jnp.float32(1.0)
    if scaling == "tensor":
        return scale_of(absmax(x), fmt)
    return scale_of(absmax(x, axis, keepdims=True), fmt)


def quantize(x: jax.Array, fmt: str, s: jax.Array, zeros: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """(q, underflow, overflow): q = x / s rounded to the format (nearest, ties to even), saturated to
    its largest magnitude, times s; underflow = the fraction of nonzero x with q = 0; overflow = the
    fraction of all x whose x / s rounds beyond the largest magnitude (those saturate). One cast of x;
    `zeros`, the count of x == 0, may be given (it is the same for every format and scale)."""
    dtype, top = FORMATS[fmt]
    y = x.astype(jnp.float32) / s
    rounded = jnp.round(y) if dtype is None else y.astype(dtype).astype(jnp.float32)
    within = jnp.abs(rounded) <= top  # an fp8 cast beyond the range gives nan or inf
    q = jnp.where(within, rounded, jnp.clip(y, -top, top)) * s
    zeros = count(x == 0) if zeros is None else zeros
    under = (count(rounded == 0) - zeros) / jnp.maximum(x.size - zeros, 1.0)  # zeros round to 0
    return q, under, count(~within) / jnp.float32(x.size)


def _rows_matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """a (r, k) times w: one (k, m) matrix for all rows, or w[j] for the j-th of G equal runs of the
    rows, w (G, k, m)."""
    if w.ndim == 2:
        return jnp.matmul(a, w, precision=jax.lax.Precision.HIGHEST)
    runs = a.reshape(w.shape[0], -1, a.shape[-1])
    return jnp.matmul(runs, w, precision=jax.lax.Precision.HIGHEST).reshape(a.shape[0], -1)


def per_row(v: jax.Array, rows: int) -> jax.Array:
    """Column norms v (m,) or (G, m) of the W of each of `rows` rows (see `_rows_matmul`)."""
    return v if v.ndim == 1 else jnp.repeat(v, rows // v.shape[0], axis=0)


def log_quantize(x: jax.Array, frac_bits: int) -> jax.Array:
    """2^(round(log2(x) 2^f) / 2^f) for x > 0 (0 elsewhere): x rounded in the log domain to f fractional
    bits of its exponent; f = 0 gives the nearest power of two (relative error at most 2^(2^-(f+1)) - 1)."""
    steps = 2.0**frac_bits
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, jnp.exp2(jnp.round(jnp.log2(safe) * steps) / steps), 0.0)


def rel_error(approx: jax.Array, exact: jax.Array) -> jax.Array:
    """||approx - exact||_F / ||exact||_F."""
    return jnp.sqrt(jnp.sum((approx - exact) ** 2) / jnp.sum(exact * exact))


def _scales(amax: jax.Array, part: jax.Array, fmt: str, scalings: tuple[str, ...], axis: int) -> jax.Array:
    """The scales of `part` (sampled rows of A, axis=-1, or columns of W, axis=-2) for each scaling,
    stacked on a new leading axis: none; tensor from `amax`, the absmax of the whole operand; channel
    from the slices of `part` itself."""
    shape = list(part.shape)
    shape[axis] = 1
    pick = lambda sc: scale_of(amax, fmt) if sc == "tensor" else scale(part, fmt, sc, axis)
    return jnp.stack([jnp.broadcast_to(pick(sc), shape) for sc in scalings])


def _format_stats(
    amaxes: tuple[jax.Array, jax.Array],
    operands: tuple[jax.Array, jax.Array],
    zeros: tuple[jax.Array, jax.Array],
    exact: jax.Array,
    fmt: str,
    scalings: tuple[str, ...],
) -> dict[str, jax.Array]:
    """The range losses and the error of C in format `fmt`, for all `scalings` at once."""
    (a_rows, w_cols), (a_zeros, w_zeros) = operands, zeros
    sa = _scales(amaxes[0], a_rows, fmt, scalings, -1)
    sw = _scales(amaxes[1], w_cols, fmt, scalings, -2)

    def one_scaling(scales: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        qa, a_under, a_over = quantize(a_rows, fmt, scales[0], a_zeros)
        qw, w_under, w_over = quantize(w_cols, fmt, scales[1], w_zeros)
        return a_under, a_over, w_under, w_over, rel_error(_rows_matmul(qa, qw), exact)

    a_under, a_over, w_under, w_over, errors = jax.lax.map(one_scaling, (sa, sw))
    out = {}
    for i, sc in enumerate(scalings):
        name = f"{fmt}/{sc}"
        out[f"{name}/a_underflow"], out[f"{name}/a_overflow"] = a_under[i], a_over[i]
        out[f"{name}/w_underflow"], out[f"{name}/w_overflow"] = w_under[i], w_over[i]
        out[f"{name}/rel_err"] = errors[i]
    return out


def lowprec_stats(
    amaxes: tuple[jax.Array, jax.Array],
    a_rows: jax.Array,
    w_cols: jax.Array,
    *,
    formats: tuple[str, ...],
    scalings: tuple[str, ...],
    r_bits: tuple[int, ...],
    e_frac_bits: tuple[int, ...],
) -> dict[str, jax.Array]:
    """Low-precision errors of one matmul C = A @ W, measured on a grid of sampled rows and columns
    of C.

    `amaxes` are absmax(A) and absmax(W) over the whole operands (for the per-tensor scales); a_rows
    (r, k) are the sampled rows of A and w_cols the sampled columns of W: (k, c), or (G, k, c) when
    the rows come in G equal runs, each with its own W (a grouped matmul). For each format F and scaling S
    (F/S/...): a_underflow, a_overflow of a_rows, w_underflow, w_overflow of w_cols, and rel_err =
    ||Q(A) Q(W) - A W|| / ||A W|| (Frobenius, over the grid). Channel scaling scales A per row (token)
    and W per column (output channel). The scalings of one format run one after the other in a loop,
    so one quantized copy is alive at a time.
    For each k in r_bits, with Q_k(R) = round(R L) / L, L = 2^(k-1) - 1 (k uniform bits on [-1, 1]):
    r{k}/rel_err rebuilds C as E_ij * Q_k(R_ij) (E exact: it is only the n + m norms), and for each f
    in e_frac_bits er/e{f}/r{k}/rel_err as log_quantize(E_ij, f) * Q_k(R_ij) (E in the log domain).
    """
    a_rows, w_cols = a_rows.astype(jnp.float32), w_cols.astype(jnp.float32)
    exact = _rows_matmul(a_rows, w_cols)
    zeros = (count(a_rows == 0), count(w_cols == 0))
    out = {}
    for fmt in formats:
        out |= _format_stats(amaxes, (a_rows, w_cols), zeros, exact, fmt, scalings)
    u = jnp.sqrt(jnp.sum(a_rows * a_rows, axis=-1))[:, None]
    v = jnp.sqrt(jnp.sum(w_cols * w_cols, axis=-2))
    e = u * per_row(v, a_rows.shape[0])
    r = jnp.where(e > 0, exact / jnp.where(e > 0, e, 1.0), 0.0)
    e_logs = {f: log_quantize(e, f) for f in e_frac_bits}
    for k in r_bits:
        levels = 2.0 ** (k - 1) - 1
        r_q = jnp.round(r * levels) / levels
        out[f"r{k}/rel_err"] = rel_error(e * r_q, exact)
        for f, e_log in e_logs.items():
            out[f"er/e{f}/r{k}/rel_err"] = rel_error(e_log * r_q, exact)
    return out
