"""Captures in TensorBoard, read back with TensorBoard's own event reader."""

import shutil

import numpy as np
import pytest
from conftest import DUMP_STEP, run_tiny
from tensorboard.backend.event_processing import event_accumulator as ea

from configs import tiny
from tdyn_jax.analysis.load import load
from tdyn_jax.probe_board import exp_bucket_limits, tag
from tdyn_jax.probes.stats import exp_hist_labels


def _events(directory):
    accumulator = ea.EventAccumulator(str(directory), size_guidance={ea.HISTOGRAMS: 0, ea.SCALARS: 0})
    accumulator.Reload()
    return accumulator


def test_tags_group_by_kind_statistic_and_layer():
    assert tag("layer_03/resid/out", "kurtosis") == "resid/out/kurtosis/layer_03"
    assert tag("params/layer_00/mlp/up/kernel", "absmax") == "params/mlp/up/kernel/absmax/layer_00"
    assert tag("embed", "kurtosis") == "embed/kurtosis"


def test_exp_bucket_edges_hold_each_bin():
    """Every value of each signed log2 bin lies in (previous limit, limit] but the bin's own lower
    edge 2^e, which the histogram counts in the bin above it (TensorBoard's buckets leave it open)."""
    lo, hi = -3, 2
    limits = exp_bucket_limits(lo, hi)
    labels = exp_hist_labels(lo, hi)
    assert len(limits) == len(labels) and np.all(np.diff(limits) > 0)
    for i, label in enumerate(labels):
        low = limits[i - 1] if i else -np.inf
        if label == 0:
            values = [0.0]
        else:
            e = abs(label) - 1000
            inside = (
                [2.0**e * 1.5]
                + ([2.0 ** (lo - 5)] if e == lo - 1 else [])
                + ([2.0**hi * 9] if e == hi else [])
            )
            values = [v if label > 0 else -v for v in inside]
        for v in values:
            assert low < v <= limits[i], (label, v, low, limits[i])


def test_captures_in_tensorboard_equal_the_store_and_a_resume_writes_no_duplicates(tiny_run, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(tiny_run[0], w, ignore=shutil.ignore_patterns("analysis", "dumps"))
    shutil.rmtree(w / "checkpoints" / "20")  # as if it crashed after step 10: captures 10 and 15 again
    done = run_tiny(w, f"--config.probes.at_steps=({DUMP_STEP},)", "--config.train.tensorboard=True")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from step 10" in done.stderr
    captures, events = load(w), _events(w / "tb" / "probes")
    steps = [0, 2, 5, 10, 15]
    assert list(captures.steps) == steps
    site = "layer_01/resid/out"
    for stat in ("kurtosis", "absmax", "rms_kurtosis"):  # each step once, with the stored value
        points = events.Scalars(tag(site, stat))
        assert [p.step for p in points] == steps
        stored = captures.table[(captures.table.site == site) & (captures.table.stat == stat)].value
        np.testing.assert_allclose([p.value for p in points], stored.to_numpy(), rtol=1e-6)
    assert any(t.startswith("mlp/up/lowprec/gemm/e4m3/er/rel_err/") for t in events.Tags()["scalars"])
    assert tag("layer_00/mlp/up/E", "log2_range") in events.Tags()["scalars"]
    counts, edges = captures.arrays["lin_hist"].site(site), captures.arrays["lin_edges"].site(site)
    for i, point in enumerate(events.Histograms(tag(site, "lin_hist"))):
        h = point.histogram_value
        assert point.step == steps[i] and h.num == counts[i].sum()
        np.testing.assert_array_equal(h.bucket, counts[i])
        np.testing.assert_allclose(h.bucket_limit, edges[i][1:], rtol=1e-7)
        assert h.min == pytest.approx(edges[i][0], rel=1e-7)
    cfg = tiny.get_config().probes
    exp = events.Histograms(tag(site, "exp_hist"))
    assert [p.step for p in exp] == steps
    np.testing.assert_array_equal(exp[-1].histogram_value.bucket, captures.arrays["exp_hist"].site(site)[-1])
    np.testing.assert_array_equal(
        exp[-1].histogram_value.bucket_limit, exp_bucket_limits(cfg.exp_min, cfg.exp_max)
    )
    assert [p.step for p in _events(w / "tb").Scalars("loss")] == [5, 10, 15, 20]  # the metrics, once each
