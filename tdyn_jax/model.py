"""Decoder-only transformer in Flax Linen; every matmul goes through `Linear` or `attention_scores`."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tdyn_jax.fake_quant import MatmulPrecision, from_config
from tdyn_jax.probes import capture
from tdyn_jax.probes.naming import SCANNED, layer_free, layer_name
from tdyn_jax.probes.spec import ProbeSpec

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

    A `kernel` passed at call time (tied unembedding) replaces the module's own parameter. With a
    `precision` that applies to this matmul, the product is computed in simulated low precision.
    """

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float
    out_dtype: jnp.dtype | None = None  # None: the compute dtype
    probe: ProbeSpec | None = None
    precision: MatmulPrecision | None = None

    @nn.compact
    def __call__(self, x: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        if kernel is None:
            init = nn.initializers.normal(self.init_std)
            kernel = self.param("kernel", init, (x.shape[-1], self.features), self.param_dtype)
        if self.precision is not None and self.precision.applies(layer_free(self.path)):
            y = self.precision.matmul(x, kernel, self.dtype)
        else:
            y = matmul(x, kernel, self.dtype)
        if self.probe is not None:
            y = capture.matmul(self, x.astype(self.dtype), kernel.astype(self.dtype), y)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return y.astype(self.out_dtype or self.dtype)


def attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """The score matmul Q K^T (unscaled): q, k (batch, seq, heads, d_head) -> (b, h, q, k) float32."""
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def probe_scores(module: nn.Module, q: jax.Array, k: jax.Array, s: jax.Array) -> jax.Array:
    """Captures the score matmul as a grouped matmul over (batch, head): A = q, W = k^T, C = s."""
    b, t, h, d = q.shape
    a = q.transpose(0, 2, 1, 3).reshape(b * h, t, d)
    w = k.transpose(0, 2, 3, 1).reshape(b * h, d, t)
    scores = capture.matmul(module, a, w, s.reshape(b * h, t, t), name="scores", with_input=True)
    return scores.reshape(s.shape)


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
    probe: ProbeSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "layernorm":
            return capture.activation(self, "out", nn.LayerNorm(**kw, name="ln")(x))
        if self.kind == "rmsnorm":
            return capture.activation(self, "out", nn.RMSNorm(**kw, name="rms")(x))
        return x


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    cfg: ml_collections.ConfigDict
    probe: ProbeSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        heads, d_head = c.num_heads, c.d_model // c.num_heads
        lin = _linear_factory(c, self.probe)
        b, t, _ = x.shape
        q = lin(c.d_model, name="q")(x).reshape(b, t, heads, d_head)
        k = lin(c.d_model, name="k")(x).reshape(b, t, heads, d_head)
        v = lin(c.d_model, name="v")(x).reshape(b, t, heads, d_head)
        if c.qk_norm:
            q, k = _norm(c, "q_norm", "rmsnorm", self.probe)(q), _norm(c, "k_norm", "rmsnorm", self.probe)(k)
        if c.positions == "rope":
            q, k = rope(q, c.rope_base), rope(k, c.rope_base)
        scores = attention_scores(q, k)
        if self.probe is not None:
            scores = probe_scores(self, q, k, scores)
        scores = scores * (1.0 / math.sqrt(d_head))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        capture.attention_probs(self, "probs", probs)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, t, c.d_model)
        out = capture.activation(self, "mix", out)
        return _linear_factory(c, self.probe, residual_out=True)(c.d_model, name="out")(out)


class Mlp(nn.Module):
    """Position-wise MLP: gelu/relu (up, act, down) or swiglu (silu(gate) * up, down)."""

    cfg: ml_collections.ConfigDict
    probe: ProbeSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        lin = _linear_factory(c, self.probe)
        up = lin(c.d_ff, name="up")(x)
        if c.mlp == "swiglu":
            hidden = nn.silu(lin(c.d_ff, name="gate")(x)) * up
        elif c.mlp == "gelu":
            hidden = nn.gelu(up)
        else:
            hidden = nn.relu(up)
        hidden = capture.activation(self, "hidden", hidden)
        return _linear_factory(c, self.probe, residual_out=True)(c.d_model, name="down")(hidden)


def _linear_factory(
    c: ml_collections.ConfigDict, probe: ProbeSpec | None, residual_out: bool = False
) -> Callable:
    """Linear constructor with the model's dtypes; residual outputs get the GPT-2 1/sqrt(2L) init."""
    std = c.init_std / math.sqrt(2 * c.num_layers) if residual_out else c.init_std
    dtype, pdtype = DTYPES[c.compute_dtype], DTYPES[c.param_dtype]

    def make(features: int, name: str) -> Linear:
        return Linear(
            features, c.use_bias, dtype, pdtype, std, probe=probe, precision=from_config(c), name=name
        )

    return make


def _norm(
    c: ml_collections.ConfigDict, name: str, kind: str | None = None, probe: ProbeSpec | None = None
) -> Norm:
    """A `Norm` of the configured kind (or `kind`) with the model's epsilon and dtypes."""
    dtype, pdtype = DTYPES[c.compute_dtype], DTYPES[c.param_dtype]
    return Norm(kind or c.norm, c.norm_eps, dtype, pdtype, probe, name=name)


class Block(nn.Module):
    """One transformer block, pre-norm or post-norm; resid/mid and resid/out are the residual stream
    after the attention and the MLP sub-block."""

    cfg: ml_collections.ConfigDict
    probe: ProbeSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        c, p = self.cfg, self.probe
        norm = lambda name: _norm(c, name, probe=p)
        if c.norm_placement == "pre":
            x = x + Attention(c, p, name="attn")(norm("attn_norm")(x))
            x = capture.activation(self, "resid/mid", x)
            x = x + Mlp(c, p, name="mlp")(norm("mlp_norm")(x))
        else:
            x = norm("attn_norm")(x + Attention(c, p, name="attn")(x))
            x = capture.activation(self, "resid/mid", x)
            x = norm("mlp_norm")(x + Mlp(c, p, name="mlp")(x))
        return capture.activation(self, "resid/out", x), None


class Transformer(nn.Module):
    """Decoder-only language model: tokens (batch, seq) int32 -> logits (batch, seq, vocab) float32.

    With a `probe` spec, every site it wants sows statistics (see `tdyn_jax.probes.capture`); the
    parameters and the logits are the same as without one.
    """

    cfg: ml_collections.ConfigDict
    probe: ProbeSpec | None = None

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
        x = capture.activation(self, "embed", x)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0, "grad_taps": 0, "dumps": 0},
                split_rngs={"params": True, "probe": True},
                length=c.num_layers,
                unroll=c.num_layers if c.scan_unroll else 1,
            )
            x, _ = stack(c, self.probe, name=SCANNED)(x, None)
        else:
            for i in range(c.num_layers):
                x, _ = block(c, self.probe, name=layer_name(i))(x, None)
        if c.norm_placement == "pre":
            x = _norm(c, "final_norm", probe=self.probe)(x)
        kernel = embed.T if c.tie_embeddings else None
        unembed = Linear(
            c.vocab_size,
            False,
            jnp.float32 if c.logits_dtype == "float32" else dtype,
            pdtype,
            c.init_std,
            jnp.float32,
            self.probe,
            from_config(c),
            name="unembed",
        )
        logits = unembed(x, kernel)
        capture.log_partition(self, "logits", logits)
        return logits
