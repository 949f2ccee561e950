"""Runs over several processes or devices as subprocesses: two JAX processes equal one, and a resume
on another mesh reshards the checkpoint."""

import subprocess

import numpy as np
from conftest import (
    DUMP_SITES,
    DUMP_STEP,
    ENV,
    ROOT,
    leaves,
    metric_rows,
    run_cmd,
    run_tiny,
    saved_params,
    start_tiny,
)

from tdyn_jax.analysis import load
from tdyn_jax.dumps import read_dump

PLAIN = "--config.probes.enabled=False"


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, *overrides):
    """The same run.py command as processes 0 and 1 of one JAX job (CPU, gloo collectives)."""
    job = [f"--config.mesh.coordinator_address=localhost:{_free_port()}", "--config.mesh.num_processes=2"]
    procs = [
        subprocess.Popen(
            run_cmd(workdir, *job, f"--config.mesh.process_id={i}", *overrides),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:  # neither process outlives the test
            p.kill()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return errs


def test_two_process_run_matches_one_process_and_resumes(tiny_run, tmp_path):
    """Two processes with capture and dumps on: the parameters, every captured statistic and the
    dumped tensors equal the session's one-process run; the resume deletes no chunk it needs."""
    single, _ = tiny_run
    multi = tmp_path / "multi"
    dumps = [f"--config.probes.at_steps=({DUMP_STEP},)", f"--config.probes.dump_steps=({DUMP_STEP},)"]
    dumps.append(f"--config.probes.dump_sites={DUMP_SITES!r}")
    _run_two_processes(multi, *dumps)
    one, two = leaves(saved_params(single, 20)), leaves(saved_params(multi, 20))
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert [r["step"] for r in metric_rows(multi)] == [5, 10, 15, 20]  # written once, by process 0
    _assert_same_captures(load(single), load(multi))
    for site in DUMP_SITES:
        for tensor in ("x",) if site.endswith("resid/out") else ("A", "W", "C", "E", "R"):
            np.testing.assert_allclose(
                read_dump(multi, DUMP_STEP, site, tensor),
                read_dump(single, DUMP_STEP, site, tensor),
                rtol=1e-5,
                atol=1e-6,
            )
    errs = _run_two_processes(multi, dumps[0], "--config.train.num_steps=30")  # the dump is taken
    assert all("from step 20" in err for err in errs)
    assert [r["step"] for r in metric_rows(multi)] == [5, 10, 15, 20, 25, 30]
    assert list(load(multi).steps) == [0, 2, 5, 10, 15, 20, 25]


def _assert_same_captures(one, two):
    """Every statistic of two runs' captures equal up to float32 reduction order (histograms: a value on
    a bin edge may move by one bin; top-k ties may swap channels; the rows sampled are the same)."""
    assert list(one.steps) == list(two.steps)
    merged = one.table.merge(two.table, on=["step", "site", "stat"], suffixes=("_one", "_two"))
    assert len(merged) == len(one.table) == len(two.table)
    # the skewness and kurtosis of nearly equal token norms (a_norm) depend on the float32 rounding of
    # each norm and of their mean (see test_probes), which the split over processes changes
    shape = merged.stat.isin(["skewness", "kurtosis"]).to_numpy()
    norms = shape & merged.site.str.endswith("/a_norm").to_numpy()
    for rows, atol in ((norms, 1e-2), (shape & ~norms, 2e-3), (~shape, 1e-6)):
        np.testing.assert_allclose(merged.value_two[rows], merged.value_one[rows], rtol=2e-3, atol=atol)
    for stat, a in one.arrays.items():  # at step 0: later the two runs' parameters differ by ~1e-6,
        b = two.arrays[stat]  # which reshuffles the histogram of a nearly constant tensor (norm gains)
        assert a.sites == b.sites
        a0, b0 = a.values[0], b.values[0]
        if stat in ("exp_hist", "lin_hist"):
            assert np.array_equal(a.values.sum(-1), b.values.sum(-1))
            assert np.abs(a0 - b0).sum(-1).max() <= 0.01 * a0.sum(-1).max(), stat
        elif stat not in ("massive_channel", "massive_token"):
            np.testing.assert_allclose(b0, a0, rtol=2e-3, atol=1e-6, err_msg=stat)


def test_resume_on_a_different_mesh_reshards_the_checkpoint(tmp_path):
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    constant = "--config.optim.schedule=constant"  # so that stopping at step 10 changes no lr
    uninterrupted = start_tiny(ref, tmp_path / "ref.log", constant, PLAIN)  # meanwhile
    assert run_tiny(moved, constant, PLAIN, "--config.train.num_steps=10").returncode == 0  # one device
    eight = subprocess.run(
        run_cmd(moved, constant, PLAIN, "--config.mesh.fsdp=2"),  # 4 (data) x 2 (fsdp) virtual devices
        cwd=ROOT,
        env={**ENV, "XLA_FLAGS": f"{ENV['XLA_FLAGS']} --xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "from step 10" in eight.stderr
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    one, resharded = leaves(saved_params(ref, 20)), leaves(saved_params(moved, 20))
    for name, value in one.items():
        np.testing.assert_allclose(resharded[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
