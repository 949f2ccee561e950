"""The probed step: same parameters as the plain step, site coverage, sharded == one device, and the
in-step statistics of a real dumped tensor against float64 numpy/scipy."""

import dataclasses
import functools

import jax
import ml_dtypes
import numpy as np
import pytest
import scipy.stats

from configs import tiny
from tdyn_jax import data as data_lib
from tdyn_jax import sharding
from tdyn_jax.analysis import load
from tdyn_jax.dumps import read_dump
from tdyn_jax.model import Transformer
from tdyn_jax.probes import capture
from tdyn_jax.probes import stats as stats_lib
from tdyn_jax.probes.spec import ProbeSpec
from tdyn_jax.train import build, cross_entropy, second_moment
from tests.test_probe_stats import ref_linear_counts

EXP_MIN, EXP_MAX = tiny.get_config().probes.exp_min, tiny.get_config().probes.exp_max


def _batch(cfg):
    tokens = data_lib.encode(data_lib.synthetic_documents(cfg.data.synthetic_size))
    return next(data_lib.Batches(tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.seed))


def _step_both(cfg, devices):
    """(plain new state, probed new state, {statistic: (sites, ...)}, index, the state before) from the
    same state."""
    mesh = sharding.make_mesh(cfg, devices)
    program = build(cfg, mesh)
    batch = sharding.global_batch(_batch(cfg), mesh)
    plain, _ = program.train_step(program.init(), batch)
    probed, _, captured, _ = program.probe_step(program.init(), batch)
    return plain, probed, jax.device_get(captured), program.probe_index, jax.device_get(program.init())


CASES = {"scan": (True, "none", "adamw"), "loop_remat_sgd": (False, "full", "sgd")}  # scan, remat, optim


def _case_config(case: str):
    cfg = tiny.get_config()
    cfg.model.scan_layers, cfg.model.remat, cfg.optim.name = CASES[case]
    return cfg


@functools.cache
def _stepped(case: str):
    """`_step_both` of tiny in one of the CASES on one device, computed once per session."""
    return _step_both(_case_config(case), jax.devices()[:1])


@pytest.mark.parametrize("case", CASES)
def test_probed_step_gives_the_same_parameters_as_the_plain_step(case):
    optim = CASES[case][2]
    cfg = _case_config(case)
    plain, probed, captured, index, _ = _stepped(case)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(probed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    sites = set(index["mean"])
    for layer in ("layer_00", "layer_01"):  # every layer, forward, gradient and parameter sites
        assert {f"{layer}/resid/mid", f"{layer}/resid/out/grad", f"{layer}/attn/scores/R"} <= sites
        assert {f"{layer}/mlp/up/E", f"{layer}/mlp/up/out/grad", f"params/{layer}/attn/q/kernel"} <= sites
    assert ("nu/layer_00/attn/q/kernel" in sites) == (optim == "adamw")  # sgd keeps no second moment
    assert "layer_00/mlp/down/in" not in sites  # not among tiny's probes.sites
    for stat, value in captured.items():
        assert value.shape[0] == len(index[stat])
        if stat not in ("sample", "min_nonzero", "skewness", "kurtosis"):
            assert np.isfinite(value).all(), stat
    i = index["count"].index("layer_01/resid/out")
    assert captured["count"][i] == cfg.data.batch_size * cfg.data.seq_len * cfg.model.d_model
    assert captured["exp_hist"][i].sum() == captured["count"][i]


def test_statistics_computed_in_place_equal_the_deferred_ones(monkeypatch):
    """On an accelerator the sampled grids' statistics run in place, in the forward pass (no
    `deferred` tap): the same statistics, the same sites, the same new state."""
    _, probed, captured, index, _ = _stepped("scan")
    in_place = lambda spec, platform: dataclasses.replace(spec, chunk=stats_lib.CHUNK, defer=False)
    monkeypatch.setattr(ProbeSpec, "for_platform", in_place)
    _, probed_here, captured_here, index_here, _ = _step_both(_case_config("scan"), jax.devices()[:1])
    assert index_here == index and any(s.endswith("/lowprec") for s in index["gemm/e4m3/er/rel_err"])
    for a, b in zip(jax.tree.leaves(probed), jax.tree.leaves(probed_here), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for stat, value in captured.items():
        np.testing.assert_allclose(captured_here[stat], value, rtol=1e-6, atol=1e-7, err_msg=stat)


@pytest.mark.parametrize("case", CASES)
def test_parameter_statistics_equal_float64_of_every_leaf(case):
    """params (as they entered the step), grads (the raw gradients, recomputed here by jax.grad of the
    same loss), updates (new - old) and Adam's nu (after the update; its values are ~1e-8 to 1e-12)
    of every leaf and layer: the captured moments equal float64 numpy (same configs as above: the
    compiles are cache hits)."""
    cfg, optim = _case_config(case), CASES[case][2]
    plain, _, captured, index, before = _stepped(case)
    batch = _batch(cfg)
    model = Transformer(cfg.model)
    z_loss, targets = cfg.optim.z_loss, batch["targets"]
    loss = lambda p: cross_entropy(model.apply({"params": p}, batch["inputs"]), targets, z_loss)[0]
    assert cfg.optim.grad_clip > 0  # the captured grads are those before clipping
    trees = {"params": before.params, "grads": jax.jit(jax.grad(loss))(before.params)}
    trees["updates"] = jax.tree.map(
        lambda new, old: np.float64(new) - np.float64(old), plain.params, before.params
    )
    nu = second_moment(plain.opt_state)
    assert (nu is None) == (optim == "sgd")
    trees |= {} if nu is None else {"nu": nu}
    tensors = {}  # site -> float64 array, a scanned stack split into its layers
    for prefix, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [prefix, *(str(getattr(p, "key", p)) for p in path)]
            stack = enumerate(np.asarray(leaf, np.float64)) if "layers" in names else [(None, leaf)]
            for i, x in stack:
                site = "/".join(f"layer_{i:02d}" if n == "layers" else n for n in names)
                tensors[site] = np.asarray(x, np.float64)
    sites = [s for s in index["mean"] if s.split("/")[0] in trees]
    assert {s.split("/")[0] for s in sites} == set(trees) and set(sites) <= set(tensors)
    for site in sites:
        x = tensors[site]
        value = lambda stat, site=site: captured[stat][index[stat].index(site)]
        rtol = 1e-3 if site.startswith("updates/") else 1e-4  # new - old rounds the update in float32
        want = {"mean": x.mean(), "std": x.std(), "absmax": np.abs(x).max(), "count": x.size}
        if x.std() > 1e-6 * np.abs(x).max():  # not constant (norm gains at init): shape defined
            want |= {
                "kurtosis": scipy.stats.kurtosis(x, axis=None),
                "skewness": scipy.stats.skew(x, axis=None),
            }
        for stat, ref in want.items():
            np.testing.assert_allclose(value(stat), ref, rtol=rtol, atol=1e-6 * x.std(), err_msg=(site, stat))


def test_gradient_tap_statistics_equal_those_of_dl_dx(monkeypatch):
    """At every tapped site, dL/dx computed independently, as the gradient with respect to a zero
    perturbation added there (Flax's `perturb` in place of the tap), has the captured statistics."""
    cfg = _case_config("loop_remat_sgd")
    _, _, captured, index, before = _stepped("loop_remat_sgd")
    batch, rngs = _batch(cfg), {"probe": jax.random.key(0)}  # the probe key draws samples only
    model = Transformer(cfg.model).clone(probe=ProbeSpec.from_config(cfg.probes))
    monkeypatch.setattr(capture, "grad_tap", lambda module, name, x: module.perturb(name, x))
    monkeypatch.setattr(capture, "deferred", lambda module, name, fn, grid, x: (x, fn(grid)))  # in place
    mutable = ["intermediates", "dumps"]
    apply = lambda: model.apply(
        {"params": before.params}, batch["inputs"], rngs=rngs, mutable=["perturbations", *mutable]
    )
    zeros = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), jax.eval_shape(apply)[1]["perturbations"])

    def loss(perturbations):
        variables = {"params": before.params, "perturbations": perturbations}
        logits, _ = model.apply(variables, batch["inputs"], rngs=rngs, mutable=mutable)
        return cross_entropy(logits, batch["targets"], cfg.optim.z_loss)[0]

    flat = jax.tree_util.tree_flatten_with_path(jax.jit(jax.grad(loss))(zeros))[0]
    grads = {"/".join(str(p.key) for p in path): np.asarray(g, np.float64) for path, g in flat}
    tapped = {s for s in index["mean"] if s.endswith("/grad")}
    assert tapped == set(grads) and len(tapped) >= 8  # four kinds in each of two layers
    for site, g in grads.items():
        value = lambda stat, site=site: captured[stat][index[stat].index(site)]
        want = {"mean": g.mean(), "std": g.std(), "absmax": np.abs(g).max(), "count": g.size}
        want |= {"kurtosis": scipy.stats.kurtosis(g, axis=None), "rms": np.sqrt(np.mean(g**2))}
        for stat, ref in want.items():
            np.testing.assert_allclose(value(stat), ref, rtol=2e-4, atol=1e-6 * g.std(), err_msg=(site, stat))


def test_sharded_capture_matches_one_device():
    cfg = _case_config("scan")
    _, _, captured_one, index, _ = _stepped("scan")
    cfg.mesh.fsdp = 2  # 4 (data) x 2 (fsdp): statistics must be global, not per shard
    _, _, captured_eight, index_eight, _ = _step_both(cfg, jax.devices()[:8])
    assert index == index_eight
    for stat, a in captured_one.items():
        b = captured_eight[stat]
        if stat in ("exp_hist", "lin_hist"):  # a value on a bin edge may move by one bin
            assert np.array_equal(a.sum(-1), b.sum(-1))
            assert np.abs(a - b).sum(-1).max() <= 0.01 * a.sum(-1).max(), stat
        elif stat not in ("massive_channel", "massive_token"):  # ties among the top values may swap
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6, err_msg=stat)


@pytest.fixture(scope="module")
def dumped_run(tiny_run):
    """The session's tiny run: full statistics at step 2, where two sites were also dumped."""
    workdir, _ = tiny_run
    return tiny.get_config(), workdir, load(workdir)


def _read(workdir, site, tensor):
    return read_dump(workdir, 2, site, tensor)


def _scalar(captures, site, stat):
    t = captures.table
    rows = t[(t.step == 2) & (t.site == site) & (t.stat == stat)]
    assert len(rows) == 1, (site, stat)
    return float(rows.value.iloc[0])


def _array(captures, stat, site):
    """The value of an array statistic of `site` at step 2."""
    return captures.arrays[stat].site(site)[list(captures.arrays[stat].steps).index(2)]


def _rows(captures, site, n, size, stat="rows"):
    """The rows (or "cols") sampled at `site` (step 2): `size` indices into its n rows, not all the
    same."""
    rows = _array(captures, stat, site).astype(np.int64)
    assert rows.shape == (size,) and size < n and (rows >= 0).all() and (rows < n).all()
    assert len(np.unique(rows)) > size // 2
    return rows


def _check_summary(captures, site, x, lin_range=None, shape_atol=1e-7):
    x64 = x.astype(np.float64).reshape(-1)
    expected = {
        "mean": x64.mean(), "std": x64.std(), "skewness": scipy.stats.skew(x64),
        "kurtosis": scipy.stats.kurtosis(x64), "rms": np.sqrt(np.mean(x64**2)), "absmax": np.abs(x64).max(),
        "min": x64.min(), "max": x64.max(), "count": x64.size, "frac_zero": np.mean(x64 == 0),
    }  # fmt: skip
    for stat, value in expected.items():
        atol = shape_atol if stat in ("skewness", "kurtosis") else 1e-7
        np.testing.assert_allclose(_scalar(captures, site, stat), value, rtol=2e-4, atol=atol, err_msg=stat)
    exps = np.clip(np.frexp(x.reshape(-1))[1] - 1, EXP_MIN - 1, EXP_MAX)
    labels = np.where(x.reshape(-1) > 0, exps + 1000, -(exps + 1000))
    expected_exp = [np.sum(labels == lab) for lab in stats_lib.exp_hist_labels(EXP_MIN, EXP_MAX)]
    assert np.array_equal(_array(captures, "exp_hist", site), expected_exp)
    if site not in captures.arrays["lin_hist"].sites:  # the norm vectors: moments and exp_hist only
        return
    edges = _array(captures, "lin_edges", site)
    if lin_range:
        assert (edges[0], edges[-1]) == lin_range
    assert np.array_equal(_array(captures, "lin_hist", site), ref_linear_counts(x, edges))
    sample = _array(captures, "sample", site)
    assert np.isin(sample, x).all()


def test_in_step_statistics_of_a_dumped_activation(dumped_run):
    cfg, workdir, captures = dumped_run
    assert list(captures.steps) == [0, 2, 5, 10, 15]
    x = _read(workdir, "layer_01/resid/out", "x")
    assert x.shape == (cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model)
    _check_summary(captures, "layer_01/resid/out", x)
    a = np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64))
    rms = np.sqrt(np.mean(a**2, axis=0))
    np.testing.assert_allclose(
        _scalar(captures, "layer_01/resid/out", "rms_kurtosis"),
        np.mean(rms**4) / np.mean(rms**2) ** 2,
        rtol=1e-4,
    )
    rows = _rows(captures, "layer_01/resid/out", a.shape[0], cfg.probes.rows)
    mmr = np.mean(a[rows].max(axis=1) / np.median(a[rows], axis=1))
    np.testing.assert_allclose(_scalar(captures, "layer_01/resid/out", "max_median_ratio"), mmr, rtol=1e-4)
    top = np.sort(a.reshape(-1))[::-1][: cfg.probes.topk] / np.median(a[rows])
    np.testing.assert_allclose(_array(captures, "massive_ratio", "layer_01/resid/out"), top, rtol=1e-5)


def test_in_step_energy_correlation_and_low_precision_of_a_dumped_matmul(dumped_run):
    cfg, workdir, captures = dumped_run
    site = "layer_00/mlp/up"
    a, w, c = (_read(workdir, site, t).astype(np.float64) for t in ("A", "W", "C"))
    e, r = _read(workdir, site, "E"), _read(workdir, site, "R")
    assert a.shape == (cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model)  # as in the model
    assert w.shape == (cfg.model.d_model, cfg.model.d_ff)
    np.testing.assert_allclose(c, a @ w, rtol=1e-4, atol=1e-5)
    u, v = np.linalg.norm(a, axis=-1), np.linalg.norm(w, axis=-2)
    e64 = u[..., None] * v
    np.testing.assert_allclose(e, e64, rtol=1e-5)
    np.testing.assert_allclose(r, c / e64, rtol=1e-4, atol=1e-6)
    assert f"{site}/in" not in captures.arrays["sample"].sites  # the input is an activation site
    assert "layer_00/attn/scores/in" in captures.arrays["sample"].sites  # q after rope is not
    _check_summary(captures, f"{site}/out", _read(workdir, site, "C"))
    tokens = cfg.data.batch_size * cfg.data.seq_len
    rows = _rows(captures, f"{site}/R", tokens, cfg.probes.rows)
    cols = _rows(captures, f"{site}/R", cfg.model.d_ff, cfg.probes.cols, stat="cols")
    for stat, same in (("rows", rows), ("cols", cols)):  # the same grid
        assert np.array_equal(_array(captures, stat, f"{site}/lowprec"), same)
    r_rows, c_rows, e_rows = (t.reshape(tokens, -1)[rows][:, cols] for t in (r, c, e64))
    _check_summary(captures, f"{site}/R", r_rows, lin_range=(-1.0, 1.0))
    # the token norms are nearly equal (rms-normed input): their skewness and kurtosis depend on the
    # last bits of each norm, which float32 (in the step) and float64 (here) round differently
    _check_summary(captures, f"{site}/a_norm", u.astype(np.float32), shape_atol=2e-3)
    assert f"{site}/a_norm" not in captures.arrays["sample"].sites
    flat = e64.reshape(-1)
    energy = {
        "mean": flat.mean(),
        "std": flat.std(),
        "skewness": scipy.stats.skew(flat),
        "kurtosis": scipy.stats.kurtosis(flat),
        "log2_range": np.log2(flat.max() / flat.min()),
    }
    for stat, value in energy.items():
        np.testing.assert_allclose(_scalar(captures, f"{site}/E", stat), value, rtol=1e-4, err_msg=stat)
    log_c, log_e = np.log2(np.abs(c_rows)), np.log2(e_rows)
    np.testing.assert_allclose(_scalar(captures, f"{site}/R", "var_log2_c"), log_c.var(), rtol=1e-4)
    np.testing.assert_allclose(_scalar(captures, f"{site}/R", "var_log2_e"), log_e.var(), rtol=1e-4)
    # low precision: underflow and overflow of the rows of A and the columns of W (per-tensor scales
    # from the whole operands), as the float8 casts of ml_dtypes see them
    a32, w_all = _read(workdir, site, "A").reshape(tokens, -1), _read(workdir, site, "W")
    w32 = w_all[:, cols]
    for fmt, dtype, top in (
        ("e4m3", ml_dtypes.float8_e4m3fn, 448.0),
        ("e5m2", ml_dtypes.float8_e5m2, 57344.0),
    ):
        s = np.float32(np.abs(w_all).max() / top)
        q = np.clip(w32 / s, -top, top).astype(dtype).astype(np.float32) * s
        under = np.sum((w32 != 0) & (q == 0)) / np.sum(w32 != 0)
        assert _scalar(captures, f"{site}/lowprec", f"gemm/{fmt}/tensor/w_underflow") == pytest.approx(under)
        raw = a32[rows].astype(dtype).astype(np.float32)
        assert _scalar(captures, f"{site}/lowprec", f"gemm/{fmt}/none/a_overflow") == pytest.approx(
            np.mean(~(np.abs(raw) <= top))
        )
        # the error of C on the sampled rows, A per row and W per column scaled to the format
        qa = a32[rows] / (np.abs(a32[rows]).max(axis=1, keepdims=True) / np.float32(top))
        qw = w32 / (np.abs(w32).max(axis=0, keepdims=True) / np.float32(top))
        approx = (
            qa.astype(dtype).astype(np.float64) * (np.abs(a32[rows]).max(axis=1, keepdims=True) / top)
        ) @ (qw.astype(dtype).astype(np.float64) * (np.abs(w32).max(axis=0, keepdims=True) / top))
        exact = a32[rows].astype(np.float64) @ w32.astype(np.float64)
        want = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
        got = _scalar(captures, f"{site}/lowprec", f"gemm/{fmt}/channel/rel_err")
        np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=fmt)
        # storing that grid of C itself, each row scaled to the format
        row_scale = (np.abs(exact).max(axis=1, keepdims=True) / top).astype(np.float32)
        stored = (exact.astype(np.float32) / row_scale).astype(dtype).astype(np.float64) * row_scale
        want = np.linalg.norm(stored - exact) / np.linalg.norm(exact)
        got = _scalar(captures, f"{site}/lowprec", f"store/{fmt}/row/rel_err")
        np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=fmt)
    t = captures.table
    sampled = t[t.step == 2].set_index(["site", "stat"])["sampled"]
    assert sampled[(f"{site}/R", "std")] and sampled[(f"{site}/lowprec", "gemm/e4m3/channel/rel_err")]
    assert not sampled[(f"{site}/E", "std")] and not sampled[(f"{site}/out", "kurtosis")]
    assert sampled[("layer_01/resid/out", "max_median_ratio")]
    assert not sampled[("layer_01/resid/out", "rms_kurtosis")]
    for k in cfg.probes.r_bits:  # E in the log domain costs precision, less with more fractional bits
        err = {
            e: _scalar(captures, f"{site}/lowprec", f"store/er/{e}/r{k}/rel_err")
            for e in ("e0", "e3", "exact")
        }
        assert 0 < err["exact"] < err["e0"] < 1 and err["e3"] < err["e0"]


def test_disabled_probes_leave_only_the_plain_step():
    cfg = tiny.get_config()
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    cfg.probes.enabled = False
    off = build(cfg, mesh)
    assert off.probe_step is None and off.dump_step is None and off.probe_index == {}
    cfg.probes.enabled = True
    on = build(cfg, mesh)
    tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), np.int32)
    batch = {"inputs": tokens, "targets": tokens}
    lowered = [p.train_step.lower(p.abstract_state, batch).as_text() for p in (off, on)]
    assert lowered[0] == lowered[1]  # the plain step does not change when capture is on
