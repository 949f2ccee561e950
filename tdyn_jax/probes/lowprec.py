"""Simulated low precision of one matmul C = A @ W, measured on sampled rows and columns of C as two
questions: computing C from low-precision inputs (gemm/: casts of A and W to FP8 E4M3/E5M2, FP4 E2M1
or INT8 with none, tensor, channel or E/R-split scaling, and the block-scaled MXFP8, MXFP4 and NVFP4
with their blocks along the contraction axis, as hardware lays them out) and storing C in low
precision (store/: C itself in those formats, or as E in a log code and R on k uniform bits)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tdyn_jax.probes.energy import correlation, norms
from tdyn_jax.probes.stats import count

# name -> (mantissa bits and the exponent of the smallest normal, or None for integers; the largest
# finite magnitude, the smallest magnitude that rounds beyond it, the largest that rounds to 0 (half
# the smallest subnormal); to nearest, ties to even: E4M3's 448 has an even mantissa, so 464 stays,
# and a tie with 0 rounds to 0). The bits give the same rounding as a cast to float8_e4m3fn,
# float8_e5m2 and float4_e2m1fn within their range.
FORMATS = {
    "e4m3": ((3, -6), 448.0, float(np.nextafter(np.float32(464.0), np.float32(np.inf))), 2.0**-10),
    "e5m2": ((2, -14), 57344.0, 61440.0, 2.0**-17),
    "e2m1": ((1, 0), 6.0, 7.0, 0.25),
    "int8": (None, 127.0, 127.5, 0.5),
}
SCALINGS = ("none", "tensor", "channel", "er")
E_BITS = 8  # bits of the log-domain code of E when C is stored as E and R
# block-scaled formats, scaling "block": name -> (element format, elements per block along the
# contraction axis, scale: "e8m0" a power of two (OCP MX), "e4m3" an E4M3 number times a float32
# scale of the whole tensor (NVFP4))
BLOCK_FORMATS = {
    "mxfp8_e4m3": ("e4m3", 32, "e8m0"),
    "mxfp8_e5m2": ("e5m2", 32, "e8m0"),
    "mxfp4": ("e2m1", 32, "e8m0"),
    "nvfp4": ("e2m1", 16, "e4m3"),
}
EMAX = {"e4m3": 8, "e5m2": 15, "e2m1": 2}  # the exponent of each element format's largest normal
BITS = {"e4m3": 8, "e5m2": 8, "e2m1": 4, "int8": 8, "mxfp8_e4m3": 8, "mxfp8_e5m2": 8, "mxfp4": 4, "nvfp4": 4}


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
    slice along `axis` (channel: per row of A with axis=-1, per column of W with axis=-2). The
    scaling er (the E/R-split GEMM) divides each slice by its L2 norm / fmt_max instead: see `_scales`."""
    if scaling == "none":
        return jnp.float32(1.0)
    if scaling == "tensor":
        return scale_of(absmax(x), fmt)
    return scale_of(absmax(x, axis, keepdims=True), fmt)


def quantize(x: jax.Array, fmt: str, s: jax.Array, zeros: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """(q, underflow, overflow): q = x / s rounded to the format (nearest, ties to even) and saturated
    to its largest magnitude, the format's codes (q * s approximates x); underflow = the fraction of
    nonzero x with q = 0; overflow = the fraction of all x whose x / s rounds beyond the largest
    magnitude (those saturate). One cast of x; both fractions from |x / s| against the format's
    thresholds (a comparison is cheaper than another cast). `zeros`, the count of x == 0, may be given
    (it is the same for every format and scale). Where s is 0 (a block scale that underflowed), q is 0."""
    y = divide(x, s)
    _, _, beyond, to_zero = FORMATS[fmt]
    zeros = count(x == 0) if zeros is None else zeros
    under = (count(jnp.abs(y) <= to_zero) - zeros) / jnp.maximum(x.size - zeros, 1.0)  # zeros round to 0
    return cast(y, fmt), under, count(~(jnp.abs(y) < beyond)) / jnp.float32(x.size)  # nan: beyond


def divide(x: jax.Array, s: jax.Array) -> jax.Array:
    """x / s in float32, 0 where s is 0 (a block scale that underflowed)."""
    return jnp.where(s > 0, x.astype(jnp.float32) / jnp.where(s > 0, s, 1.0), 0.0)


def cast(y: jax.Array, fmt: str) -> jax.Array:
    """y (float32) rounded to the format (nearest, ties to even) and saturated to its largest magnitude."""
    bits, top, beyond, _ = FORMATS[fmt]
    rounded = jnp.round(y) if bits is None else _round_mantissa(y, *bits)
    return jnp.where(jnp.abs(y) < beyond, rounded, jnp.clip(y, -top, top))  # nan stays nan


def _round_mantissa(y: jax.Array, mantissa: int, min_exp: int) -> jax.Array:
    """Finite float32 y rounded to `mantissa` bits (nearest, ties to even) with subnormals below
    2^min_exp, in a few integer operations (an XLA:CPU cast to an FP8 type is several times slower):
    a normal y by adding half a unit of the kept last bit (less one, plus that bit: ties to even) and
    clearing the dropped bits, a carry moving on to the exponent; a subnormal y on the fixed grid of
    2^(min_exp - mantissa). Exact: every step is an integer or a scaling by a power of two."""
    drop = 23 - mantissa
    word = jax.lax.bitcast_convert_type(y, jnp.uint32)
    half = jnp.uint32((1 << (drop - 1)) - 1) + ((word >> drop) & 1)
    normal = jax.lax.bitcast_convert_type(
        (word + half) & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF), jnp.float32
    )
    step = 2.0 ** (min_exp - mantissa)
    return jnp.where(jnp.abs(y) < 2.0**min_exp, jnp.round(y / step) * step, normal)


def to_blocks(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x with its `axis` (negative) cut into blocks of `size`: (..., n / size, size, ...) after padding
    that axis with zeros to a multiple of size."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -n % size)
    x = jnp.pad(x, pad)
    shape = list(x.shape)
    shape[axis : axis + 1 or None] = [x.shape[axis] // size, size]
    return x.reshape(shape)


def from_blocks(x: jax.Array, axis: int, n: int) -> jax.Array:
    """The inverse of `to_blocks` (axis counts from the end of the unblocked shape)."""
    shape = list(x.shape)
    shape[axis - 1 : axis + 1 or None] = [shape[axis - 1] * shape[axis]]
    return jax.lax.slice_in_dim(x.reshape(shape), 0, n, axis=x.ndim - 1 + axis)


def block_scales(
    blocks: jax.Array, fmt: str, tensor_amax: jax.Array, axis: int
) -> tuple[jax.Array, jax.Array]:
    """(b, g): the scale of each block of `blocks` (blocks along `axis`, see `to_blocks`) is b * g, b
    kept as a size-1 axis, g one float32 number for the tensor.

    e8m0 (OCP MX): b = 2^(floor(log2 amax_block) - emax), emax the exponent of the element format's
    largest normal (values above its largest magnitude then saturate), its exponent clipped to
    [-126, 127]; g = 1. e4m3 (NVFP4): b = E4M3(amax_block / (6 g)) with the tensor scale g =
    amax_tensor / (448 * 6), so the largest block scale fits E4M3; b = 0 where it underflows.
    """
    element, _, kind = BLOCK_FORMATS[fmt]
    amax = absmax(blocks, axis, keepdims=True)
    if kind == "e8m0":
        exponent = jnp.frexp(amax)[1] - 1 - EMAX[element]  # floor(log2 amax) - emax
        b = jnp.where(amax > 0, jnp.ldexp(jnp.float32(1), jnp.clip(exponent, -126, 127)), 1.0)
        return b, jnp.float32(1.0)
    top = FORMATS[element][1]
    g = jnp.where(tensor_amax > 0, tensor_amax / (448.0 * top), 1.0).astype(jnp.float32)
    return (amax / (top * g)).astype(jnp.float8_e4m3fn).astype(jnp.float32), g


def block_range(blocks: jax.Array, axis: int) -> jax.Array:
    """The mean over blocks holding a nonzero value of log2(max |x| / min nonzero |x|) in the block
    (binades: the dynamic range one block scale has to cover)."""
    a = jnp.abs(blocks)
    high = jnp.max(a, axis=axis)
    low = jnp.min(jnp.where(a > 0, a, jnp.inf), axis=axis)
    used = high > 0
    ranges = jnp.where(used, jnp.log2(high / jnp.where(used, low, 1.0)), 0.0)
    return jnp.sum(ranges) / jnp.maximum(count(used), 1.0)


def quantize_blocks(
    x: jax.Array, fmt: str, axis: int, tensor_amax: jax.Array, zeros: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """(q, underflow, overflow, block range) of x in the block format `fmt`, blocks along `axis` (the
    contraction axis: -1 for rows of A, -2 for columns of W); see `quantize` and `block_range`."""
    element, size, _ = BLOCK_FORMATS[fmt]
    blocks = to_blocks(x.astype(jnp.float32), axis, size)
    zeros = (count(x == 0) if zeros is None else zeros) + (blocks.size - x.size)  # with the padding
    b, g = block_scales(blocks, fmt, tensor_amax, axis)
    q, under, over = quantize(blocks, element, b * g, zeros)
    q = q * (b * g)
    return from_blocks(q, axis, x.shape[axis]), under, over * blocks.size / x.size, block_range(blocks, axis)


def _rows_matmul(a: jax.Array, w: jax.Array, codes: bool = False) -> jax.Array:
    """a (r, k) times w: one (k, m) matrix for all rows, or w[j] for the j-th of G equal runs of the
    rows, w (G, k, m); in float32. With `codes` (both hold values of an 8- or 4-bit format of
    FORMATS, exact in bfloat16, whose products are exact in float32), from bfloat16 inputs with
    float32 accumulation: the same sums, at the speed of bfloat16 matmuls."""
    if codes:
        a, w = a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        mm = lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)
    else:
        mm = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
    if w.ndim == 2:
        return mm(a, w)
    return mm(a.reshape(w.shape[0], -1, a.shape[-1]), w).reshape(a.shape[0], -1)


def per_row(v: jax.Array, rows: int) -> jax.Array:
    """Per-column values v (m,) or (G, m) (norms, scales) of the W of each of `rows` rows (see
    `_rows_matmul`): v itself, or its G rows repeated in runs to (rows, m)."""
    return v if v.ndim == 1 else jnp.repeat(v, rows // v.shape[0], axis=0)


def log_quantize(x: jax.Array, frac_bits: int, bits: int) -> tuple[jax.Array, jax.Array]:
    """(q, clamped): x > 0 (0 elsewhere) as a code of `bits` bits in the log domain relative to the
    largest x: log2(x / max x) rounded to steps of 2^-f (f = frac_bits; relative error at most
    2^(2^-(f+1)) - 1) in [-(2^bits - 1) 2^-f, 0]; smaller x are clamped to that floor (`clamped`:
    their fraction of the x > 0). With 8 bits, f = 0 spans 255 binades, f = 3 about 32."""
    steps, floor = 2.0**frac_bits, -(2.0**bits - 1)
    positive = x > 0
    top = jnp.max(jnp.where(positive, x, 0.0))
    code = jnp.round(jnp.log2(jnp.where(positive, x, 1.0) / jnp.where(top > 0, top, 1.0)) * steps)
    clamped = count(positive & (code < floor)) / jnp.maximum(count(positive), 1.0)
    return jnp.where(positive, top * jnp.exp2(jnp.maximum(code, floor) / steps), 0.0), clamped


def rel_error(approx: jax.Array, exact: jax.Array) -> jax.Array:
    """||approx - exact||_F / ||exact||_F."""
    return jnp.sqrt(jnp.sum((approx - exact) ** 2) / jnp.sum(exact * exact))


def _scales(
    amax: jax.Array, norm: jax.Array, part: jax.Array, fmt: str, scalings: tuple[str, ...], axis: int
) -> jax.Array:
    """The scales of `part` (sampled rows of A, axis=-1, or columns of W, axis=-2) for each scaling,
    stacked on a new leading axis: none; tensor from `amax`, the absmax of the whole operand; channel
    from the slices of `part` itself; er from `norm`, the L2 norms of those slices (kept dims): the
    E/R-split GEMM quantises the directions a_i / ||a_i|| and w_j / ||w_j||, each mapped onto the
    format's range, and multiplies by E = ||a_i|| ||w_j||."""
    shape = list(part.shape)
    shape[axis] = 1
    picks = {"tensor": lambda: scale_of(amax, fmt), "er": lambda: scale_of(norm, fmt)}
    pick = lambda sc: picks[sc]() if sc in picks else scale(part, fmt, sc, axis)
    return jnp.stack([jnp.broadcast_to(pick(sc), shape) for sc in scalings])


def _format_stats(
    amaxes: tuple[jax.Array, jax.Array],
    operands: tuple[jax.Array, jax.Array],
    zeros: tuple[jax.Array, jax.Array],
    norms: tuple[jax.Array, jax.Array],
    exact: jax.Array,
    fmt: str,
    scalings: tuple[str, ...],
) -> dict[str, jax.Array]:
    """The range losses and the error of C in format `fmt`, for all `scalings` at once (none for
    no scalings)."""
    if not scalings:
        return {}
    (a_rows, w_cols), (a_zeros, w_zeros) = operands, zeros
    sa = _scales(amaxes[0], norms[0], a_rows, fmt, scalings, -1)
    sw = _scales(amaxes[1], norms[1], w_cols, fmt, scalings, -2)

    def one_scaling(scales: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        qa, a_under, a_over = quantize(a_rows, fmt, scales[0], a_zeros)
        qw, w_under, w_over = quantize(w_cols, fmt, scales[1], w_zeros)
        # the codes' product, then the scales of its rows (A's) and columns (W's, per run of rows)
        col_scales = per_row(scales[1].reshape(-1, w_cols.shape[-1]), a_rows.shape[0])
        approx = _rows_matmul(qa, qw, codes=True) * scales[0] * col_scales
        return a_under, a_over, w_under, w_over, rel_error(approx, exact)

    a_under, a_over, w_under, w_over, errors = jax.lax.map(one_scaling, (sa, sw))
    out = {}
    for i, sc in enumerate(scalings):
        name = f"gemm/{fmt}/{sc}"
        out[f"{name}/a_underflow"], out[f"{name}/a_overflow"] = a_under[i], a_over[i]
        out[f"{name}/w_underflow"], out[f"{name}/w_overflow"] = w_under[i], w_over[i]
        out[f"{name}/rel_err"] = errors[i]
    return out


def _block_format_stats(
    amaxes: tuple[jax.Array, jax.Array],
    operands: tuple[jax.Array, jax.Array],
    zeros: tuple[jax.Array, jax.Array],
    exact: jax.Array,
    fmt: str,
) -> dict[str, jax.Array]:
    """The range losses, block ranges and the error of C in the block format `fmt`."""
    (a_rows, w_cols), name = operands, f"gemm/{fmt}/block"
    qa, a_under, a_over, a_range = quantize_blocks(a_rows, fmt, -1, amaxes[0], zeros[0])
    qw, w_under, w_over, w_range = quantize_blocks(w_cols, fmt, -2, amaxes[1], zeros[1])
    return {
        f"{name}/a_underflow": a_under,
        f"{name}/a_overflow": a_over,
        f"{name}/a_block_range": a_range,
        f"{name}/w_underflow": w_under,
        f"{name}/w_overflow": w_over,
        f"{name}/w_block_range": w_range,
        f"{name}/rel_err": rel_error(_rows_matmul(qa, qw), exact),
    }


def _stored(c: jax.Array, fmt: str, s: jax.Array, zeros: jax.Array) -> tuple[jax.Array, ...]:
    """(underflow, overflow, error) of c stored in `fmt` with scale s."""
    q, under, over = quantize(c, fmt, s, zeros)
    return under, over, rel_error(q * s, c)


def _store_stats(c: jax.Array, formats: tuple[str, ...]) -> dict[str, jax.Array]:
    """Underflow, overflow and error of the grid of C stored in each format: scaled by the grid's
    absmax (tensor) or each row's (row), both at once (vmapped), or in blocks along the rows (block
    formats)."""
    zeros, amax, out = count(c == 0), absmax(c), {}
    row_amax = absmax(c, -1, keepdims=True)
    for fmt in formats:
        if fmt in BLOCK_FORMATS:
            q, under, over, out[f"store/{fmt}/block/block_range"] = quantize_blocks(c, fmt, -1, amax, zeros)
            parts = {"block": (under, over, rel_error(q, c))}
        else:
            tensor = jnp.broadcast_to(scale_of(amax, fmt), row_amax.shape)
            scales = jnp.stack([tensor, scale_of(row_amax, fmt)])
            stats = jax.vmap(lambda s, fmt=fmt: _stored(c, fmt, s, zeros))(scales)
            parts = {sc: tuple(t[i] for t in stats) for i, sc in enumerate(("tensor", "row"))}
        for sc, (under, over, err) in parts.items():
            name = f"store/{fmt}/{sc}"
            out[f"{name}/underflow"], out[f"{name}/overflow"], out[f"{name}/rel_err"] = under, over, err
    return out


def _store_er_stats(
    c: jax.Array, e: jax.Array, r_bits: tuple[int, ...], e_frac_bits: tuple[int, ...]
) -> dict[str, jax.Array]:
    """The error of the grid of C stored as E and R (see `lowprec_stats`), every pair of E and R codes
    in one stacked product (none without R codes: `r_bits` empty)."""
    out, e_codes = {}, {"exact": e}
    for f in e_frac_bits:
        e_codes[f"e{f}"], out[f"store/er/e{f}/e_clamped"] = log_quantize(e, f, E_BITS)
    if not r_bits:
        return out
    r = correlation(c, e)
    r_max = jnp.maximum(absmax(r), jnp.finfo(jnp.float32).tiny)
    r_codes = {}
    for k in r_bits:
        levels = 2.0 ** (k - 1) - 1
        r_codes[f"r{k}"] = jnp.round(r * levels) / levels  # uniform on [-1, 1]
        r_codes[f"r{k}s"] = jnp.round(r / r_max * levels) / levels * r_max  # on [-max |R|, max |R|]
    approx = jnp.stack(list(e_codes.values()))[:, None] * jnp.stack(list(r_codes.values()))[None]
    errors = jnp.sqrt(jnp.sum((approx - c) ** 2, axis=(2, 3)) / jnp.sum(c * c))
    for i, e_name in enumerate(e_codes):
        for j, r_name in enumerate(r_codes):
            out[f"store/er/{e_name}/{r_name}/rel_err"] = errors[i, j]
    return out


@functools.partial(jax.jit, static_argnames=("formats", "scalings", "r_bits", "e_frac_bits"))
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
    of C, as two questions named apart: computing C from low-precision inputs (gemm/...) and storing
    C in low precision (store/...). Every rel_err is ||C^ - C|| / ||C|| (Frobenius, over the grid).

    `amaxes` are absmax(A) and absmax(W) over the whole operands (for the per-tensor scales); a_rows
    (r, k) are the sampled rows of A and w_cols the sampled columns of W: (k, c), or (G, k, c) when
    the rows come in G equal runs, each with its own W (a grouped matmul).

    gemm/F/S/: C^ = Q(A) Q(W) for each format F and scaling S (see `scale`: none, tensor, channel =
    per row of A and column of W by absmax, er = the E/R-split GEMM, by their L2 norms):
    a_underflow, a_overflow of a_rows, w_underflow, w_overflow of w_cols, rel_err. A block format F
    (BLOCK_FORMATS) has the one scaling "block" (blocks along the contraction axis k) and also
    a_block_range and w_block_range (see `block_range`); NVFP4's tensor scales come from `amaxes`.
    The scalings of one format run one after the other in a loop, so one quantized copy is alive.

    store/F/S/: the grid of C itself in F, scaled per tensor (the grid's absmax) or per row, or in
    blocks along its rows: underflow, overflow, rel_err (block: block_range). store/er/E/R/rel_err:
    C stored as E_ij * R_ij with E exact (E = exact: only the n + m norms) or as an E_BITS-bit log
    code on 2^-f steps below the largest E (E = e{f} for f in e_frac_bits; store/er/e{f}/e_clamped is
    the fraction of E below its range), and R on k uniform bits for k in r_bits: on [-1, 1] (R =
    r{k}: round(R L) / L, L = 2^(k-1) - 1) or scaled to R's own absmax on the grid (R = r{k}s).
    """
    a_rows, w_cols = a_rows.astype(jnp.float32), w_cols.astype(jnp.float32)
    exact = _rows_matmul(a_rows, w_cols)
    zeros = (count(a_rows == 0), count(w_cols == 0))
    u, v = norms(a_rows, w_cols)  # (r,), (c,) or (G, c)
    kept = (u[:, None], jnp.expand_dims(v, -2))  # as the slices of a_rows and w_cols they measure
    out = {}
    for fmt in formats:
        if fmt in BLOCK_FORMATS:
            out |= _block_format_stats(amaxes, (a_rows, w_cols), zeros, exact, fmt)
        else:
            out |= _format_stats(amaxes, (a_rows, w_cols), zeros, kept, exact, fmt, scalings)
    out |= _store_stats(exact, formats)
    return out | _store_er_stats(exact, u[:, None] * per_row(v, a_rows.shape[0]), r_bits, e_frac_bits)
