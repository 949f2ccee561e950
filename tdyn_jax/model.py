"""Decoder-only transformer in Flax Linen; every matmul goes through `Linear` or `attention_scores`."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def matmul(a: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`a @ w` over the last axis of `a`, inputs cast to `dtype`, accumulated in float32."""
    return jnp.einsum("...i,io->...o", a.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class Linear(nn.Module):
    """y = x @ W (+ b): the one module through which every weight matmul of the model runs.

    A `kernel` passed at call time (tied unembedding) replaces the module's own parameter.
    """

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float
    out_dtype: jnp.dtype | None = None  # None: the compute dtype

    @nn.compact
    def __call__(self, x: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        if kernel is None:
            init = nn.initializers.normal(self.init_std)
            kernel = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
        y = matmul(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return y.astype(self.out_dtype or self.dtype)


def attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """The score matmul S = Q K^T / sqrt(d_head): q, k (batch, seq, heads, d_head) -> (b, h, q, k)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    return s * scale


def rope(x: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of x (batch, seq, heads, d_head), rotating channel pairs (i, i+d/2)."""
    seq, d_head = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, d_head // 2, dtype=jnp.float32) * 2.0 / d_head)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Norm(nn.Module):
    """LayerNorm, RMSNorm or identity, chosen by `kind`."""

    kind: str
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "layernorm":
            return nn.LayerNorm(**kw, name="ln")(x)
        if self.kind == "rmsnorm":
            return nn.RMSNorm(**kw, name="rms")(x)
        return x


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        heads, d_head = c.num_heads, c.d_model // c.num_heads
        lin = _linear_factory(c)
        b, t, _ = x.shape
        q = lin(c.d_model, name="q")(x).reshape(b, t, heads, d_head)
        k = lin(c.d_model, name="k")(x).reshape(b, t, heads, d_head)
        v = lin(c.d_model, name="v")(x).reshape(b, t, heads, d_head)
        if c.qk_norm:
            q, k = _norm(c, "q_norm", "rmsnorm")(q), _norm(c, "k_norm", "rmsnorm")(k)
        if c.positions == "rope":
            q, k = rope(q, c.rope_base), rope(k, c.rope_base)
        scores = attention_scores(q, k)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, t, c.d_model)
        return _linear_factory(c, residual_out=True)(c.d_model, name="out")(out)


class Mlp(nn.Module):
    """Position-wise MLP: gelu/relu (up, act, down) or swiglu (silu(gate) * up, down)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        lin = _linear_factory(c)
        up = lin(c.d_ff, name="up")(x)
        if c.mlp == "swiglu":
            hidden = nn.silu(lin(c.d_ff, name="gate")(x)) * up
        elif c.mlp == "gelu":
            hidden = nn.gelu(up)
        else:
            hidden = nn.relu(up)
        return _linear_factory(c, residual_out=True)(c.d_model, name="down")(hidden)


def _linear_factory(c: ml_collections.ConfigDict, residual_out: bool = False) -> Callable:
    """Linear constructor with the model's dtypes; residual outputs get the GPT-2 1/sqrt(2L) init."""
    std = c.init_std / math.sqrt(2 * c.num_layers) if residual_out else c.init_std
    dtype, pdtype = DTYPES[c.compute_dtype], DTYPES[c.param_dtype]

    def make(features: int, name: str) -> Linear:
        return Linear(features, c.use_bias, dtype, pdtype, std, name=name)

    return make


def _norm(c: ml_collections.ConfigDict, name: str, kind: str | None = None) -> Norm:
    """A `Norm` of the configured kind (or `kind`) with the model's epsilon and dtypes."""
    return Norm(kind or c.norm, c.norm_eps, DTYPES[c.compute_dtype], DTYPES[c.param_dtype], name=name)


class Block(nn.Module):
    """One transformer block, pre-norm or post-norm."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        c = self.cfg
        norm = lambda name: _norm(c, name)
        if c.norm_placement == "pre":
            x = x + Attention(c, name="attn")(norm("attn_norm")(x))
            x = x + Mlp(c, name="mlp")(norm("mlp_norm")(x))
        else:
            x = norm("attn_norm")(x + Attention(c, name="attn")(x))
            x = norm("mlp_norm")(x + Mlp(c, name="mlp")(x))
        return x, None


class Transformer(nn.Module):
    """Decoder-only language model: tokens (batch, seq) int32 -> logits (batch, seq, vocab) float32."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.cfg
        dtype, pdtype = DTYPES[c.compute_dtype], DTYPES[c.param_dtype]
        init = nn.initializers.normal(c.init_std)
        embed = self.param("embed", init, (c.vocab_size, c.d_model), pdtype)
        x = jnp.take(embed, tokens, axis=0).astype(dtype)
        if c.positions == "learned":
            pos = self.param("pos_embed", init, (c.max_len, c.d_model), pdtype)
            x = x + pos[: tokens.shape[1]].astype(dtype)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                length=c.num_layers,
            )
            x, _ = stack(c, name="layers")(x, None)
        else:
            for i in range(c.num_layers):
                x, _ = block(c, name=f"layer_{i:02d}")(x, None)
        if c.norm_placement == "pre":
            x = _norm(c, "final_norm")(x)
        kernel = embed.T if c.tie_embeddings else None
        unembed = Linear(c.vocab_size, False, dtype, pdtype, c.init_std, jnp.float32, name="unembed")
        return unembed(x, kernel)
