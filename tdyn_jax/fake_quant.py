"""Training in simulated low precision: a weight matmul C = A @ W computed from operands quantised in
a format of `tdyn_jax.probes.lowprec` (fake quantisation), with straight-through gradients.

Each operand is quantised along the product's contraction axis: A per row (token), W per column
(output channel), blocks running along the contraction axis as hardware lays them out. A quantised
operand is q * o, with q exactly representable in bfloat16 (a format's elements, times a power-of-two
or E4M3 block scale) and o its outer factor (1, the tensor's scale, a row's or column's scale, NVFP4's
tensor scale), so the product is computed as o_A (q_A @ q_W) o_W, float32 accumulation, exact on any
backend. The backward products dL/dA = G W^T (dgrad) and dL/dW = A^T G (wgrad) use the forward's
quantised operands and the exact G (straight through), or, with a gradient format, are themselves
computed from quantised operands: G in the gradient format and the forward operand re-quantised in
the forward format, each along that product's own contraction axis.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from tdyn_jax.probes.lowprec import (
    BLOCK_FORMATS,
    FORMATS,
    SCALINGS,
    absmax,
    block_scales,
    cast,
    divide,
    from_blocks,
    scale,
    scale_of,
    to_blocks,
)

# the weight matmuls of the model, named without their layer (the sites `model.matmul_sites` picks)
WEIGHT_MATMULS = ("attn/q", "attn/k", "attn/v", "attn/out", "mlp/up", "mlp/gate", "mlp/down", "unembed")


@dataclass(frozen=True)
class Format:
    """A number format and its scaling: an element format of FORMATS with a scaling of SCALINGS
    (none, tensor, channel, er), or a block format of BLOCK_FORMATS with the scaling "block"."""

    name: str
    scaling: str

    def __str__(self) -> str:
        return self.name if self.scaling == "block" else f"{self.name}/{self.scaling}"


def parse(spec: str) -> Format | None:
    """'e4m3/tensor' -> Format('e4m3', 'tensor'); 'mxfp4' -> Format('mxfp4', 'block'); 'none' -> None.
    Raises ValueError naming the choices."""
    if spec == "none":
        return None
    if spec in BLOCK_FORMATS:
        return Format(spec, "block")
    name, _, scaling = spec.partition("/")
    if name in FORMATS and scaling in SCALINGS:
        return Format(name, scaling)
    raise ValueError(
        f"{spec!r} is not a format: use none, F/S with F one of {', '.join(FORMATS)} and S one of "
        f"{', '.join(SCALINGS)} (e.g. e4m3/tensor), or one of {', '.join(BLOCK_FORMATS)}"
    )


def quantize_operand(x: jax.Array, fmt: Format, axis: int) -> tuple[jax.Array, jax.Array]:
    """(q, o): x (2-D) quantised as q * o along its contraction `axis` (-1: per row, -2: per column);
    q is exact in bfloat16, o broadcasts against x (a scalar or a size-1 axis at `axis`)."""
    x = x.astype(jnp.float32)
    if fmt.scaling == "block":
        element, size, _ = BLOCK_FORMATS[fmt.name]
        blocks = to_blocks(x, axis, size)
        b, g = block_scales(blocks, fmt.name, absmax(x), axis)
        q = cast(divide(blocks, b * g), element) * b
        return from_blocks(q, axis, x.shape[axis]), g
    if fmt.scaling == "er":  # the E/R-split GEMM: the directions x / ||x||, mapped onto the format's range
        s = scale_of(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)), fmt.name)
    else:
        s = scale(x, fmt.name, fmt.scaling, axis)
    return cast(divide(x, s), fmt.name), s


def product(x: jax.Array, y: jax.Array, fx: Format, fy: Format, dtype: jnp.dtype) -> jax.Array:
    """x (..., k) @ y (k, m) in float32 from x quantised per row in `fx` and y per column in `fy`; the
    quantised elements enter the matmul in `dtype`."""
    qx, ox = quantize_operand(x, fx, -1)
    qy, oy = quantize_operand(y, fy, -2)
    return ox * _dot(qx, qy, dtype) * oy


def _dot(x: jax.Array, y: jax.Array, dtype: jnp.dtype, spec: str = "...i,io->...o") -> jax.Array:
    """The einsum `spec` of x and y with inputs in `dtype`, accumulated in float32 (the model's form)."""
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def quantized_matmul(
    a: jax.Array, w: jax.Array, fwd: Format, grad: Format | None, dtype: jnp.dtype
) -> jax.Array:
    """a (..., k) @ w (k, m) -> (..., m) float32 from operands quantised in `fwd`; the backward
    products straight through (grad None) or from G quantised in `grad` (see the module docstring).
    a and w are in `dtype`."""
    return product(a, w, fwd, fwd, dtype)


def _forward(a, w, fwd, grad, dtype):
    if grad is not None:
        return product(a, w, fwd, fwd, dtype), (a, w)
    qa, oa = quantize_operand(a, fwd, -1)
    qw, ow = quantize_operand(w, fwd, -2)
    return oa * _dot(qa, qw, dtype) * ow, (qa, oa, qw, ow)


def _backward(fwd, grad, dtype, saved, g):
    if grad is None:  # G (qW oW)^T and (oA qA)^T G, the outer factors moved onto G
        qa, oa, qw, ow = saved
        da = _dot(g * ow, qw, dtype, "...o,io->...i")
        dw = _dot(oa * g, qa, dtype, "...o,...i->oi").T  # the operand order of JAX's own transpose
    else:  # each operand along the product's contraction axis: m for dA, the tokens for dW
        a, w = saved
        qg, og = quantize_operand(g, grad, -1)
        qw, ow = quantize_operand(w, fwd, -1)
        da = og * _dot(qg, qw, dtype, "...o,io->...i") * jnp.ravel(ow)
        tokens = lambda x, fmt: quantize_operand(x.reshape(-1, x.shape[-1]), fmt, -2)
        (qa, oa), (qg, og) = tokens(a, fwd), tokens(g, grad)
        qa, qg = qa.reshape(a.shape), qg.reshape(g.shape)
        dw = (_dot(qg, qa, dtype, "...o,...i->oi") * jnp.ravel(og)[:, None]).T * jnp.ravel(oa)[:, None]
    return da.astype(dtype), dw.astype(dtype)


quantized_matmul.defvjp(_forward, _backward)


@dataclass(frozen=True)
class MatmulPrecision:
    """The simulated precision of the model's weight matmuls: `forward` for the forward product,
    `grad` (or None: straight through) for dL/dC in the backward products, at the weight matmuls
    whose layer-free name matches one of `sites`."""

    forward: Format
    grad: Format | None
    sites: tuple[str, ...]

    def applies(self, site: str) -> bool:
        """Whether the weight matmul `site` (e.g. 'attn/q', no layer) is computed in low precision."""
        return any(fnmatch.fnmatchcase(site, p) for p in self.sites)

    def matmul(self, a: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """a (..., k) @ w (k, m) -> (..., m) float32, inputs cast to `dtype`, then quantised."""
        return quantized_matmul(a.astype(dtype), w.astype(dtype), self.forward, self.grad, dtype)


def from_config(model: object) -> MatmulPrecision | None:
    """The MatmulPrecision of a model config (matmul_format, matmul_grad_format, matmul_sites), or None
    when matmul_format is none (every matmul in the compute dtype)."""
    forward = parse(model.matmul_format)
    if forward is None:
        return None
    return MatmulPrecision(forward, parse(model.matmul_grad_format), tuple(model.matmul_sites))
