"""Training in simulated low precision: the quantised product and its gradients against float64 numpy
built from the ml_dtypes references, and the model's plumbing against the plain step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tdyn_jax import fake_quant, sharding
from tdyn_jax.config import ConfigError, validate
from tdyn_jax.fake_quant import Format, parse, quantized_matmul
from tdyn_jax.model import Transformer
from tests.test_probe_stats import ref_quantize, ref_quantize_blocks, ref_scale
from tests.test_train import _batches

FORMATS = [
    "e4m3/tensor", "e5m2/channel", "int8/tensor", "e2m1/er", "e4m3/er", "e4m3/none",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp4", "nvfp4",
]  # fmt: skip


def ref_operand(x, spec, axis):
    """x quantised in `spec` along the contraction `axis`, in numpy (ml_dtypes casts), as float64."""
    f = parse(spec)
    if f.scaling == "block":
        return ref_quantize_blocks(x, f.name, axis, np.abs(x).max())[0].astype(np.float64)
    return ref_quantize(x, f.name, ref_scale(x, f.name, f.scaling, axis)).astype(np.float64)


def operands(seed=0, n=48, k=40, m=24):
    """A with a few outlier tokens and channels (so that scalings differ) and Gaussian W; k is not a
    multiple of the block sizes (the last block is padded)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, k)).astype(np.float32)
    a[3] *= 40.0
    a[:, 5] *= 25.0
    w = (rng.normal(size=(k, m)) * 0.05).astype(np.float32)
    return a, w


def test_parse():
    assert parse("none") is None
    assert parse("e4m3/tensor") == Format("e4m3", "tensor") and str(parse("e2m1/er")) == "e2m1/er"
    assert parse("nvfp4") == Format("nvfp4", "block") and str(parse("nvfp4")) == "nvfp4"
    for bad in ("e4m3", "fp8/tensor", "mxfp4/block", "e4m3/row"):
        with pytest.raises(ValueError, match="is not a format"):
            parse(bad)


@pytest.mark.parametrize("spec", FORMATS)
def test_quantized_operands_and_product_match_numpy(spec):
    a, w = operands()
    f = parse(spec)
    qa, oa = jax.jit(fake_quant.quantize_operand, static_argnums=(1, 2))(a, f, -1)
    np.testing.assert_allclose(np.asarray(qa * oa, np.float64), ref_operand(a, spec, -1), rtol=1e-6, atol=0)
    qa = np.asarray(qa)
    assert np.array_equal(qa, qa.astype(jnp.bfloat16).astype(np.float32))  # exact in bfloat16
    c = jax.jit(quantized_matmul, static_argnums=(2, 3, 4))(a, w, f, None, jnp.float32)
    expected = ref_operand(a, spec, -1) @ ref_operand(w, spec, -2)
    np.testing.assert_allclose(np.asarray(c), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    exact = a.astype(np.float64) @ w
    assert np.linalg.norm(c - exact) > 0  # the format does lose something on these operands


def loss_grads(spec, grad_spec, a, w, g):
    """dL/dA, dL/dW of L = sum(C * g) with C the quantised product."""
    f, fg = parse(spec), parse(grad_spec)
    loss = lambda a, w: jnp.sum(quantized_matmul(a, w, f, fg, jnp.float32) * g)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(a, w)


@pytest.mark.parametrize("spec", ["e4m3/tensor", "e2m1/er", "mxfp4", "nvfp4"])
def test_straight_through_gradients(spec):
    """Without a gradient format: dA = G Q(W)^T and dW = Q(A)^T G with the exact G."""
    a, w = operands(1)
    g = np.random.default_rng(2).normal(size=(a.shape[0], w.shape[1])).astype(np.float32)
    da, dw = loss_grads(spec, "none", a, w, g)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da, g.astype(np.float64) @ ref_operand(w, spec, -2).T, **tol)
    np.testing.assert_allclose(dw, ref_operand(a, spec, -1).T @ g.astype(np.float64), **tol)


@pytest.mark.parametrize(
    "spec, grad_spec",
    [
        ("e4m3/tensor", "e5m2/tensor"),
        ("e4m3/er", "e5m2/er"),
        ("mxfp8_e4m3", "mxfp8_e5m2"),
        ("nvfp4", "nvfp4"),
    ],
)
def test_backward_products_from_quantised_operands(spec, grad_spec):
    """With a gradient format: dA = Qg(G) Qf(W^T) and dW = Qf(A^T) Qg(G), each operand quantised along
    that product's contraction axis."""
    a, w = operands(3)
    g = (np.random.default_rng(4).normal(size=(a.shape[0], w.shape[1])) * 1e-3).astype(np.float32)
    g[7] *= 30.0
    da, dw = loss_grads(spec, grad_spec, a, w, g)
    ref_da = ref_operand(g, grad_spec, -1) @ ref_operand(w.T, spec, -2)
    ref_dw = ref_operand(a.T, spec, -1) @ ref_operand(g, grad_spec, -2)
    for got, ref in ((da, ref_da), (dw, ref_dw)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    straight = loss_grads(spec, "none", a, w, g)
    assert not np.allclose(dw, straight[1], rtol=1e-3)  # the gradient format is used


def _steps(cfg, n=2):
    cfg.probes.enabled = False
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    from tdyn_jax.train import build

    program = build(cfg, mesh)
    state = program.init()
    for batch in _batches(cfg, n):
        state, metrics = program.train_step(state, sharding.global_batch(batch, mesh))
    return jax.device_get(state.params), float(metrics["loss"])


@functools.cache
def _plain_steps():
    return _steps(tiny.get_config())


@pytest.mark.parametrize("grad_spec", ["none", "e5m2/tensor"])
def test_identity_quantiser_gives_the_plain_step_bit_for_bit(monkeypatch, grad_spec):
    """The fake-quantised path with the quantiser made the identity equals the plain step bit for bit:
    what the path adds to training is the quantiser and nothing else (matmul_format=none is the plain
    step's own code)."""
    plain, plain_loss = _plain_steps()
    monkeypatch.setattr(fake_quant, "quantize_operand", lambda x, f, axis: (x.astype(jnp.float32), 1.0))
    cfg = tiny.get_config()
    cfg.model.matmul_format, cfg.model.matmul_grad_format = "e4m3/tensor", grad_spec
    same, same_loss = _steps(cfg)
    assert plain_loss == same_loss
    jax.tree.map(np.testing.assert_array_equal, plain, same)


TOKENS = jnp.zeros((2, 8), jnp.int32).at[:, 1::2].set(7)


@functools.cache
def _plain_model():
    """(params, logits) of the plain tiny model, compiled once."""
    model = Transformer(tiny.get_config().model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS)
    return params, jax.jit(model.apply)(params, TOKENS)


@pytest.mark.parametrize(
    "sites, per_layer, unembed", [(("*",), 6, 1), (("mlp/*",), 2, 0), (("unembed", "attn/q"), 1, 1)]
)
def test_matmul_sites_choose_the_quantised_matmuls(sites, per_layer, unembed):
    """tiny (gelu MLP, tied unembedding) has 4 attention and 2 MLP matmuls per layer and the
    unembedding; the model with MXFP4 at `sites` has as many quantised products as they match, and its
    logits differ from the plain model's."""
    params, plain = _plain_model()
    cfg = tiny.get_config().model
    cfg.matmul_format, cfg.matmul_sites = "mxfp4", sites
    model = Transformer(cfg)
    jaxpr = str(jax.make_jaxpr(model.apply)(params, TOKENS))
    assert jaxpr.count("custom_vjp_call") == cfg.num_layers * per_layer + unembed
    assert not np.allclose(jax.jit(model.apply)(params, TOKENS), plain, rtol=1e-3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("matmul_format", "fp8", "model.matmul_format='fp8' is not a format: use none, F/S"),
        ("matmul_grad_format", "e5m2", "model.matmul_grad_format='e5m2' is not a format"),
        ("matmul_sites", ("attn/qq",), "model.matmul_sites entry 'attn/qq' matches no weight matmul"),
    ],
)
def test_bad_matmul_precision_is_one_clear_error(field, value, message):
    cfg = tiny.get_config()
    cfg.model.matmul_format = "e4m3/tensor"
    cfg.model[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(cfg)
    cfg = tiny.get_config()
    cfg.model.matmul_grad_format = "e5m2/tensor"
    with pytest.raises(ConfigError, match=r"needs a model\.matmul_format"):
        validate(cfg)
