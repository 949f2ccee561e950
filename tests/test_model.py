"""Tests of `tdyn_jax.model`: causality across variants, scan == loop, Linear, rope, parameter layout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tdyn_jax.model import Linear, Transformer, _linear_factory
from tdyn_jax.model import rope as rope_eager

BATCH, SEQ = 2, 16
rope = jax.jit(rope_eager, static_argnums=1)  # one compilation per shape instead of op by op

# name -> overrides of the tiny model config (d_model 32, 2 layers, 2 heads, d_ff 64, max_len 32).
# Features are combined so that every choice is covered with few compilations; `*_loop` variants
# are the Python-loop twins of scanned ones for the scan == loop test.
VARIANTS = {
    "default": {},  # rmsnorm, pre, gelu, rope, tied, no bias, scan, remat none, float32
    "loop": {"scan_layers": False},
    "full": {  # everything that adds parameters
        "norm": "layernorm",
        "mlp": "swiglu",
        "positions": "learned",
        "qk_norm": True,
        "tie_embeddings": False,
        "use_bias": True,
    },
    "full_loop": {},  # "full" with scan_layers=False, filled in below
    "post_relu_loop": {"norm_placement": "post", "mlp": "relu", "scan_layers": False},
    "post_layernorm_untied": {"norm_placement": "post", "norm": "layernorm", "tie_embeddings": False},
    "remat_full": {"remat": "full"},
    "remat_full_loop": {"remat": "full", "scan_layers": False},
    "bf16_compute_no_norm": {"compute_dtype": "bfloat16", "norm": "none"},
    "bf16_params_loop": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16", "scan_layers": False},
}
VARIANTS["full_loop"] = {**VARIANTS["full"], "scan_layers": False}
# Scanned variant -> its loop twin.
SCAN_LOOP_PAIRS = [("default", "loop"), ("full", "full_loop"), ("remat_full", "remat_full_loop")]


def model_cfg(**overrides):
    cfg = tiny.get_config().model
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tokens_for(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (BATCH, SEQ), 0, 257, dtype=jnp.int32)


def param_shapes(model: Transformer):
    """The parameter tree of `model` as ShapeDtypeStructs (traced, not compiled: fast)."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens_for())["params"]


def random_params(model: Transformer, seed: int = 0):
    """Parameters with O(0.1) random values everywhere (norm scales around 1, nonzero biases).

    Larger than the init so that a change of one token visibly reaches later positions even in
    bfloat16, and without compiling `model.init`.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        value = rng.normal(0.0, 0.1, size=leaf.shape)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            value += 1.0
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(model))


@functools.cache
def built(name: str):
    """(model, params, jitted apply) of a variant; cached so each variant compiles once per session."""
    model = Transformer(model_cfg(**VARIANTS[name]))
    return model, random_params(model), jax.jit(model.apply)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal_masking(name):
    model, params, apply = built(name)
    tokens = tokens_for()
    logits = apply({"params": params}, tokens)
    assert logits.shape == (BATCH, SEQ, model.cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Deterministic: the same input gives bitwise the same logits.
    np.testing.assert_array_equal(np.asarray(apply({"params": params}, tokens)), np.asarray(logits))
    exact_later = model.cfg.compute_dtype == "float32"
    for t in (0, 5, 11, SEQ - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 1 + 37 * t) % 257)
        new = np.asarray(apply({"params": params}, changed))
        old = np.asarray(logits)
        # Positions before t never see token t: exactly equal.
        np.testing.assert_array_equal(new[:, :t], old[:, :t])
        # Position t sees it, and so (through attention) do later positions.
        diff = np.abs(new - old).max(axis=-1)  # (batch, seq)
        assert np.all(diff[:, t] > 0), f"{name}: logits at the changed position {t} did not change"
        if t < SEQ - 1:
            later = diff[:, t + 1 :]
            if exact_later:
                assert np.all(later > 0), f"{name}: a position after {t} ignored the change: {later}"
            else:  # bfloat16 may round a tiny attention change away at some positions
                assert np.all(later.max(axis=1) > 0), f"{name}: no position after {t} changed"


def _tree_shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def _loop_to_scan(params, num_layers):
    """Stacks `layer_00`, `layer_01`, ... into the `layers` tree of the scanned model."""
    per_layer = [params[f"layer_{i:02d}"] for i in range(num_layers)]
    scanned = {k: v for k, v in params.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: np.stack(xs, axis=0), *per_layer)
    return scanned


@pytest.mark.parametrize(("scan_name", "loop_name"), SCAN_LOOP_PAIRS)
def test_scan_matches_loop_with_mapped_params(scan_name, loop_name):
    _, loop_params, loop_apply = built(loop_name)
    scan_model, _, scan_apply = built(scan_name)
    num_layers = scan_model.cfg.num_layers
    mapped = _loop_to_scan(loop_params, num_layers)
    # The mapping produces exactly the scanned model's parameter layout.
    assert _tree_shapes(mapped) == _tree_shapes(param_shapes(scan_model))
    assert mapped["layers"]["attn"]["q"]["kernel"].shape == (num_layers, 32, 32)
    tokens = tokens_for(3)
    want = np.asarray(loop_apply({"params": loop_params}, tokens))
    got = np.asarray(scan_apply({"params": mapped}, tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The layers really differ (the test would be vacuous if both layers were identical) ...
    q = mapped["layers"]["attn"]["q"]["kernel"]
    assert not np.array_equal(q[0], q[1])
    # ... and their order matters: swapping them changes the logits.
    swapped = jax.tree.map(lambda x: x[::-1], mapped["layers"])
    other = np.asarray(scan_apply({"params": {**mapped, "layers": swapped}}, tokens))
    assert np.abs(other - want).max() > 1e-3


def test_loop_layer_names_and_scan_leading_axis():
    _, loop_params, _ = built("loop")
    assert {"layer_00", "layer_01"} <= set(loop_params)
    assert "layers" not in loop_params
    _, scan_params, _ = built("default")
    assert "layers" in scan_params and "layer_00" not in scan_params
    assert scan_params["layers"]["mlp"]["up"]["kernel"].shape == (2, 32, 64)
    assert scan_params["layers"]["mlp"]["down"]["kernel"].shape == (2, 64, 32)


def test_untied_embeddings_create_unembed_kernel():
    _, untied, _ = built("full")
    _, tied, _ = built("default")
    assert untied["unembed"]["kernel"].shape == (32, 257)
    assert set(untied["unembed"]) == {"kernel"}  # no bias on the unembedding even with use_bias
    assert untied["layers"]["attn"]["q"]["bias"].shape == (2, 32)
    assert "unembed" not in tied
    assert tied["embed"].shape == untied["embed"].shape == (257, 32)
    # The same holds for the loop layout.
    assert "unembed" not in built("loop")[1]
    assert built("full_loop")[1]["unembed"]["kernel"].shape == (32, 257)


def _unused_token(tokens: jax.Array) -> int:
    return int(np.setdiff1d(np.arange(257), np.asarray(tokens))[0])


def test_tied_unembedding_reads_the_embedding_table():
    _, params, apply = built("default")
    tokens = tokens_for()
    v = _unused_token(tokens)
    before = np.asarray(apply({"params": params}, tokens))
    embed = params["embed"].at[v].add(1.0)  # a row no input token reads
    after = np.asarray(apply({"params": {**params, "embed": embed}}, tokens))
    # Only the logit of token v moves: the unembedding is the transposed embedding.
    assert np.all(after[..., v] != before[..., v])
    np.testing.assert_array_equal(np.delete(after, v, axis=-1), np.delete(before, v, axis=-1))


def test_untied_unembedding_ignores_the_embedding_table():
    _, params, apply = built("full")
    tokens = tokens_for()
    v = _unused_token(tokens)
    before = np.asarray(apply({"params": params}, tokens))
    embed = params["embed"].at[v].add(1.0)
    after = np.asarray(apply({"params": {**params, "embed": embed}}, tokens))
    np.testing.assert_array_equal(after, before)
    kernel = params["unembed"]["kernel"].at[:, v].add(1.0)
    after = np.asarray(apply({"params": {**params, "unembed": {"kernel": kernel}}}, tokens))
    assert np.all(after[..., v] != before[..., v])
    np.testing.assert_array_equal(np.delete(after, v, axis=-1), np.delete(before, v, axis=-1))


def test_logits_dtype_sets_the_unembedding_inputs():
    """With bfloat16 compute, the logits are the final hidden state times the embedding: the float32
    embedding (logits_dtype float32) or the embedding rounded to bfloat16 (compute), against float64."""
    tokens, references, errors = tokens_for(), {}, {}
    for logits_dtype in ("float32", "compute"):
        model = Transformer(model_cfg(compute_dtype="bfloat16", logits_dtype=logits_dtype))
        params = random_params(model)
        logits, sown = jax.jit(lambda p, t, m=model: m.apply(p, t, capture_intermediates=True))(
            {"params": params}, tokens
        )
        hidden = np.asarray(sown["intermediates"]["final_norm"]["__call__"][0], np.float64)
        embed = {"float32": params["embed"], "compute": params["embed"].astype(jnp.bfloat16)}
        references = {k: hidden @ np.asarray(e, np.float64).T for k, e in embed.items()}
        errors[logits_dtype] = {k: np.abs(np.asarray(logits) - r).max() for k, r in references.items()}
        np.testing.assert_allclose(logits, references[logits_dtype], rtol=1e-5, atol=1e-5)
    assert errors["float32"]["compute"] > 100 * errors["float32"]["float32"]  # the two differ
    assert errors["compute"]["float32"] > 100 * errors["compute"]["compute"]


def test_learned_position_p_is_added_at_position_p():
    _, params, apply = built("full")  # positions=learned, max_len 32 > SEQ
    assert params["pos_embed"].shape == (32, 32)
    tokens = tokens_for()
    before = np.asarray(apply({"params": params}, tokens))
    moved = np.asarray(apply({"params": {**params, "pos_embed": params["pos_embed"].at[5].add(1.0)}}, tokens))
    np.testing.assert_array_equal(moved[:, :5], before[:, :5])
    assert np.all(np.abs(moved[:, 5] - before[:, 5]).max(axis=-1) > 0)
    # Rows past the sequence length are never read.
    unused = params["pos_embed"].at[SEQ:].add(1.0)
    np.testing.assert_array_equal(
        np.asarray(apply({"params": {**params, "pos_embed": unused}}, tokens)), before
    )


def test_param_dtypes_follow_config():
    dtypes = lambda name: {x.dtype for x in jax.tree.leaves(built(name)[1])}
    assert dtypes("bf16_params_loop") == {jnp.dtype(jnp.bfloat16)}
    assert dtypes("bf16_compute_no_norm") == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_matches_numpy(use_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 7))
    layer = Linear(5, use_bias, jnp.float32, jnp.float32, 0.02)
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))["params"]
    assert set(params) == ({"kernel", "bias"} if use_bias else {"kernel"})
    assert params["kernel"].shape == (7, 5)
    w = rng.normal(size=(7, 5))
    b = rng.normal(size=(5,))
    params = {"kernel": jnp.asarray(w, jnp.float32)}
    if use_bias:
        params["bias"] = jnp.asarray(b, jnp.float32)
    y = layer.apply({"params": params}, jnp.asarray(x, jnp.float32))
    assert y.shape == (3, 4, 5) and y.dtype == jnp.float32
    want = x.astype(np.float32).astype(np.float64) @ w.astype(np.float32).astype(np.float64)
    if use_bias:
        want = want + b.astype(np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=1e-5)


def test_linear_init_and_residual_scaling():
    layer = Linear(64, True, jnp.float32, jnp.float32, 0.05)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64)))["params"]
    np.testing.assert_allclose(np.std(params["kernel"]), 0.05, rtol=0.1)
    np.testing.assert_array_equal(params["bias"], 0)
    # Residual-stream outputs (attention out, MLP down) get the GPT-2 init_std / sqrt(2 * num_layers).
    cfg = model_cfg(num_layers=8)
    assert _linear_factory(cfg, None)(4, name="up").init_std == cfg.init_std
    assert _linear_factory(cfg, None, residual_out=True)(4, name="down").init_std == pytest.approx(
        cfg.init_std / 4
    )


def test_linear_with_call_time_kernel_has_no_own_kernel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    layer = Linear(3, False, jnp.float32, jnp.float32, 0.02)
    variables = layer.init(jax.random.PRNGKey(0), x, kernel)
    assert not jax.tree.leaves(variables)
    y = layer.apply(variables, x, kernel)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x, np.float64) @ np.asarray(kernel, np.float64), atol=1e-5
    )


def test_linear_bf16_compute_with_float32_output():
    x = jnp.ones((2, 8), jnp.float32) / 3
    layer = Linear(4, False, jnp.bfloat16, jnp.float32, 0.02, out_dtype=jnp.float32)
    params = {"kernel": jnp.full((8, 4), 1 / 3, jnp.float32)}
    y = layer.apply({"params": params}, x)
    assert y.dtype == jnp.float32
    third = float(jnp.asarray(1 / 3, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(y), 8 * third * third, rtol=1e-6)
    assert Linear(4, False, jnp.bfloat16, jnp.float32, 0.02).apply({"params": params}, x).dtype == (
        jnp.bfloat16
    )


# ---------------------------------------------------------------------------------------------------
# rope


def test_rope_preserves_pair_norms_and_is_identity_at_position_zero():
    d_head = 8
    x = np.random.default_rng(0).normal(size=(2, 10, 3, d_head)).astype(np.float32)
    y = np.asarray(rope(jnp.asarray(x), 10000.0))
    assert y.shape == x.shape and y.dtype == np.float32
    half = d_head // 2
    pair_norm = lambda a: np.hypot(a[..., :half], a[..., half:])
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    assert not np.allclose(y[:, 1], x[:, 1])


def test_rope_matches_numpy_rotation_and_is_relative():
    d_head, base, seq = 6, 100.0, 7
    x = np.random.default_rng(1).normal(size=(1, seq, 2, d_head))
    y = np.asarray(rope(jnp.asarray(x, jnp.float32), base), np.float64)
    half = d_head // 2
    freqs = base ** (-np.arange(half) * 2.0 / d_head)
    angles = np.arange(seq)[:, None] * freqs[None, :]  # (seq, half)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    want = np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    np.testing.assert_allclose(y, want, atol=1e-5)
    # The same query/key vector at every position: q_m . k_n depends only on m - n.
    q = np.broadcast_to(x[:, :1, :1], (1, seq, 1, d_head))
    rq = np.asarray(rope(jnp.asarray(q, jnp.float32), base), np.float64)[0, :, 0]
    dots = rq @ rq.T
    for shift in range(1, 3):
        diag = np.diagonal(dots, offset=shift)
        np.testing.assert_allclose(diag, diag[0], atol=1e-5)


def test_rope_keeps_bfloat16():
    x = jnp.ones((1, 3, 1, 4), jnp.bfloat16)
    assert rope(x, 10000.0).dtype == jnp.bfloat16
