"""The train step: loss, optimizers, schedule, learning on synthetic data, sharded vs one device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tdyn_jax import data as data_lib
from tdyn_jax import sharding
from tdyn_jax.metrics import truncate_jsonl
from tdyn_jax.optim import schedule
from tdyn_jax.train import build, cross_entropy


def _batches(cfg, n):
    tokens = data_lib.encode(data_lib.synthetic_documents(cfg.data.synthetic_size))
    it = data_lib.Batches(tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.seed)
    return [next(it) for _ in range(n)]


def _run(cfg, devices, n_steps):
    cfg.probes.enabled = False  # the plain step only (the probed step is tested in test_probes.py)
    mesh = sharding.make_mesh(cfg, devices)
    program = build(cfg, mesh)
    state = program.init()
    losses = []
    for batch in _batches(cfg, n_steps):
        state, metrics = program.train_step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_cross_entropy_matches_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    loss, parts = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), z_loss=0.1)
    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x).sum(-1))
    ce = np.mean(log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(float(parts["ce"]), ce, rtol=1e-6)
    np.testing.assert_allclose(float(loss), ce + 0.1 * np.mean(log_z**2), rtol=1e-6)


def test_schedule_warmup_then_cosine_to_min_ratio():
    cfg = tiny.get_config()
    o = cfg.optim
    o.schedule = "cosine"
    lr = schedule(o, 100)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(o.warmup_steps // 2 + 1)), o.lr * (o.warmup_steps // 2 + 1) / 5)
    np.testing.assert_allclose(float(lr(o.warmup_steps)), o.lr, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), o.lr * o.min_lr_ratio, rtol=1e-5)
    o.schedule = "constant"
    np.testing.assert_allclose(float(schedule(o, 100)(80)), o.lr, rtol=1e-6)


def test_loss_falls_on_synthetic_data():
    cfg = tiny.get_config()
    cfg.train.num_steps = 60
    _, losses = _run(cfg, jax.devices()[:1], 60)
    assert losses[0] > 5.0  # about log(257) at init
    assert np.mean(losses[-10:]) < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["adam", "sgd", "lion", "adafactor"])
def test_every_optimizer_trains(name):
    cfg = tiny.get_config()
    cfg.optim.name = name
    cfg.optim.lr = {"sgd": 0.1, "adafactor": 0.3}.get(name, cfg.optim.lr)  # adafactor: relative steps
    _, losses = _run(cfg, jax.devices()[:1], 15)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 0.3


def test_sharded_data_fsdp_step_matches_one_device():
    cfg = tiny.get_config()
    one, losses_one = _run(cfg, jax.devices()[:1], 3)
    cfg.mesh.fsdp = 2  # 4 (data) x 2 (fsdp)
    eight, losses_eight = _run(cfg, jax.devices()[:8], 3)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(eight.params)]
    assert any("fsdp" in spec for spec in specs), "no parameter is sharded over fsdp"
    assert len(eight.params["embed"].sharding.device_set) == 8
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_fsdp_spec_shards_largest_divisible_axis():
    assert sharding.fsdp_spec((64, 256), 4, 0) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((6, 10), 4, 0) == jax.sharding.PartitionSpec()
    assert sharding.fsdp_spec((64, 256), 4, 10**6) == jax.sharding.PartitionSpec()
    assert sharding.fsdp_spec((64, 256), 1, 0) == jax.sharding.PartitionSpec()


def test_truncate_jsonl_keeps_steps_up_to_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (5, 10, 15, 20)))
    truncate_jsonl(path, 10)
    assert [line for line in path.read_text().splitlines()] == [
        '{"step": 5, "loss": 1.0}',
        '{"step": 10, "loss": 1.0}',
    ]


def test_truncate_jsonl_drops_junk_lines_with_one_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    junk = [
        b"\xff\xfe not utf-8",
        b"[1, 2]",
        b'"a string"',
        b'{"loss": 1.0}',
        b'{"step": "5"}',
        b'{"step": 7',
    ]
    good = [b'{"step": 5, "loss": 1.0}', b'{"step": 10, "loss": null}']
    path.write_bytes(b"\n".join([good[0], *junk, good[1], b"", b'{"step": 15, "loss": 2.0}']) + b"\n")
    with caplog.at_level("WARNING"):
        truncate_jsonl(path, 10)
    assert path.read_bytes().splitlines() == good
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "dropped 6 unreadable line(s)" in warning.getMessage()


def test_metrics_writer_writes_non_finite_values_as_null(tmp_path):
    from tdyn_jax.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, 0, tensorboard=False, echo=lambda line: None)
    writer.write(5, {"loss": np.float32("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) == {
        "step": 5, "loss": None, "grad_norm": None, "lr": 1e-3,
    }  # fmt: skip


def test_metrics_writer_writes_jsonl_echo_and_tensorboard(tmp_path):
    from tdyn_jax.metrics import MetricsWriter

    lines = []
    writer = MetricsWriter(tmp_path, 0, tensorboard=True, echo=lines.append)
    writer.write(5, {"loss": np.float32(2.5), "lr": 1e-3})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 5, "loss": 2.5, "lr": 0.001}\n'
    assert lines == ["step 5: loss=2.5 lr=0.001"]
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert ("loss", 5, 2.5) in _tensorboard_scalars(events)


def _tensorboard_scalars(path):
    """(tag, step, value) of every scalar in a TFRecord event file."""
    import struct

    from tensorboardX.proto import event_pb2

    raw, out, pos = path.read_bytes(), [], 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        pos += 12 + length + 4
    return out


def test_pod_config_lowers_with_fsdp_sharding_on_eight_devices():
    """The 350M-parameter pod config lays out and lowers (no compile, no allocation) on an fsdp mesh."""
    from configs import tpu_v5e_64

    cfg = tpu_v5e_64.get_config()
    cfg.mesh.fsdp, cfg.data.batch_size = 8, 8
    mesh = sharding.make_mesh(cfg, jax.devices()[:8])
    program = build(cfg, mesh)
    params = program.abstract_state.params
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) > 3e8
    assert params["layers"]["mlp"]["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "fsdp"
    )
    batch = {
        k: jax.ShapeDtypeStruct((8, cfg.data.seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
        for k in ("inputs", "targets")
    }
    text = program.train_step.lower(program.abstract_state, batch).as_text()
    assert '<["data"=1, "fsdp"=8]>' in text
    assert text.count("tf.aliasing_output") >= len(jax.tree.leaves(program.abstract_state))  # donated


def test_interval_carries_its_losses_through_a_restart_null_for_non_finite():
    from tdyn_jax.train import Interval

    first = Interval(0, 1)
    for done, loss in ((1, 2.0), (2, float("nan")), (3, 4.0)):
        first.add(done, {"loss": jnp.float32(loss), "skipped": jnp.float32(np.isnan(loss))})
    carried = json.loads(json.dumps(first.carry(), allow_nan=False))  # what the checkpoint holds
    assert carried == [
        {"loss": 2.0, "skipped": 0.0},
        {"loss": None, "skipped": 1.0},
        {"loss": 4.0, "skipped": 0.0},
    ]
    again = Interval(3, 1, carried)
    assert again.carry() == carried  # a second stop before the next log line
    again.add(4, {"loss": jnp.float32(6.0), "skipped": jnp.float32(0.0)})
    row = again.close()
    assert row["loss_avg"] == 4.0 and row["skipped"] == 1.0 and row["loss"] == 6.0
