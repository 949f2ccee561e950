"""run.py end to end as a subprocess: resume, kill -9 and resume bitwise, SIGTERM/SIGINT, user errors."""

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DUMP_SITES, DUMP_STEP, ENV, ROOT, run_cmd, run_tiny, saved_params, snapshot

from configs import tiny
from tdyn_jax.analysis import load
from tdyn_jax.analysis.report import write_report
from tdyn_jax.checkpoint import check_resume, saved_config_path
from tdyn_jax.config import ConfigError, to_dict
from tdyn_jax.dumps import read_dump

PLAIN = "--config.probes.enabled=False"  # for the tests of the loop itself: no probed step to compile


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def _start_tiny(workdir, log, *overrides):
    """A tiny run started in the background, its output in the file `log` (a pipe nobody reads while
    the test does other work could fill and stall it)."""
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(run_cmd(workdir, *overrides), cwd=ROOT, env=ENV, stdout=out, stderr=out)


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def test_end_to_end_then_rerun_resumes(tiny_run, tmp_path):
    first, done = tiny_run
    assert "report: " in done.stdout and (first / "analysis" / "report.html").exists()
    rows = _metrics(first)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"grad_norm", "param_norm", "update_norm", "lr", "tokens_per_s", "step_time_s"} <= set(rows[-1])
    assert json.loads((first / "config.json").read_text())["model"]["d_model"] == 32
    assert sorted(p.name for p in (first / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    assert sorted(p.name for p in (first / "probes").iterdir()) == ["10", "20"]  # one chunk per checkpoint
    assert list(load(first).steps) == [0, 2, 5, 10, 15]

    w, extended = tmp_path / "run", tmp_path / "extended"
    shutil.copytree(first, w)
    shutil.copytree(first, extended)
    longer = _start_tiny(extended, tmp_path / "longer.log", "--config.train.num_steps=30")  # meanwhile
    again = run_tiny(w)  # same command: resumes at the end, trains nothing, duplicates nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "from step 20" in again.stderr
    assert [r["step"] for r in _metrics(w)] == [5, 10, 15, 20]

    assert longer.wait(timeout=600) == 0, (tmp_path / "longer.log").read_text()[-3000:]
    assert [r["step"] for r in _metrics(extended)] == [5, 10, 15, 20, 25, 30]
    assert list(load(extended).steps) == [0, 2, 5, 10, 15, 20, 25]


def test_kill_and_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    steps = ["--config.train.num_steps=1000", "--config.checkpoint.every=50", "--config.checkpoint.keep=2"]
    steps += ["--config.probes.every=50"]  # tiny's sites: the session's compiled probed step
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    uninterrupted = _start_tiny(ref, tmp_path / "ref.log", *steps)
    proc = subprocess.Popen(  # side by side with the reference: the two runs are independent
        run_cmd(crashed, *steps), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: (crashed / "checkpoints" / "100").exists(), proc)
    while_running = load(crashed).steps  # a run that is still training can be read
    assert list(while_running) == list(range(0, 50 * len(while_running), 50)) and len(while_running) >= 2
    proc.kill()
    proc.communicate()
    killed_at = max(r["step"] for r in _metrics(crashed))
    assert killed_at < 1000, "the run finished before it was killed"
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    saved = max(int(p.name) for p in (crashed / "checkpoints").iterdir() if p.name.isdigit())
    (crashed / "metrics.jsonl").open("a").write('{"step": 99')  # a line cut short by the kill
    page = write_report(crashed, ("resid/out",), workers=1, progress=False)  # of an interrupted run
    assert f"capture steps</th><td>{', '.join(map(str, load(crashed).steps))}<" in page.read_text()
    partial = crashed / "checkpoints" / f"{saved + 50}.orbax-checkpoint-tmp"  # a save cut short
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "truncated").write_bytes(b"\0" * 100)
    stray = crashed / "probes" / str(saved + 50)  # a chunk whose train-state checkpoint never finished
    if not stray.exists():
        shutil.copytree(crashed / "probes" / str(saved), stray)

    resumed = run_tiny(crashed, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    ref_params, new_params = _leaves(saved_params(ref, 1000)), _leaves(saved_params(crashed, 1000))
    assert ref_params.keys() == new_params.keys()
    for name, value in ref_params.items():
        assert np.array_equal(value, new_params[name]), f"{name} differs after kill and resume"
    ref_rows, new_rows = _metrics(ref), _metrics(crashed)
    assert [r["step"] for r in new_rows] == [r["step"] for r in ref_rows]  # each step exactly once
    assert [r["loss"] for r in new_rows] == [r["loss"] for r in ref_rows]
    assert not partial.exists()
    # every capture step on disk exactly once, with the values of the uninterrupted run
    ref_captures, new_captures = load(ref), load(crashed)
    assert list(new_captures.steps) == list(range(0, 1000, 50))
    assert not new_captures.table.duplicated(["step", "site", "stat"]).any()
    pd.testing.assert_frame_equal(new_captures.table, ref_captures.table)
    for stat, array in ref_captures.arrays.items():
        assert np.array_equal(new_captures.arrays[stat].values, array.values, equal_nan=True), stat


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_exits_zero_and_resumes_as_if_never_stopped(tmp_path, sig):
    w = tmp_path / "run"
    steps = ["--config.train.num_steps=100000", "--config.checkpoint.every=100000", PLAIN]
    proc = subprocess.Popen(
        run_cmd(w, *steps), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: (w / "metrics.jsonl").exists() and (w / "metrics.jsonl").stat().st_size, proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a run that ignored the signal must not outlive the test
    assert proc.returncode == 0, err[-3000:]
    saved = [int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 100000
    rows = _metrics(w)  # the stop writes no row of its own: rows stay aligned to log_every
    assert rows and all(r["step"] % 5 == 0 and r["step"] <= saved[0] for r in rows)
    resumed = run_tiny(w, f"--config.train.num_steps={saved[0] + 10}", PLAIN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {saved[0]}" in resumed.stderr
    assert _metrics(w)[-1]["step"] == saved[0] + 10
    if sig == signal.SIGTERM:  # every field but the timings equals an uninterrupted run's
        ref = tmp_path / "ref"
        assert run_tiny(ref, f"--config.train.num_steps={saved[0] + 10}", PLAIN).returncode == 0
        timing = {"step_time_s", "tokens_per_s", "compile_s"}
        strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
        assert strip(_metrics(w)) == strip(_metrics(ref))


def test_incompatible_resume_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    w = tmp_path / "run"
    assert run_tiny(w, "--config.train.num_steps=10", PLAIN).returncode == 0
    before = snapshot(w)
    refused = run_tiny(w, "--config.model.num_layers=3", "--config.train.num_steps=20", PLAIN)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume") and "model.num_layers=2 (saved) vs 3" in line
    assert snapshot(w) == before


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
    one, two = _leaves(saved_params(single, 20)), _leaves(saved_params(multi, 20))
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert [r["step"] for r in _metrics(multi)] == [5, 10, 15, 20]  # written once, by process 0
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
    assert [r["step"] for r in _metrics(multi)] == [5, 10, 15, 20, 25, 30]
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
    uninterrupted = _start_tiny(ref, tmp_path / "ref.log", constant, PLAIN)  # meanwhile
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
    one, resharded = _leaves(saved_params(ref, 20)), _leaves(saved_params(moved, 20))
    for name, value in one.items():
        np.testing.assert_allclose(resharded[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_without_config_json_the_newest_checkpoint_config_decides_a_resume(tiny_run, tmp_path):
    """A run directory that lost config.json (deleted while the run trained) still refuses a resume
    with another model: the config saved with its newest checkpoint is compared instead."""
    w = tmp_path / "run"
    shutil.copytree(tiny_run[0] / "checkpoints", w / "checkpoints")
    config = to_dict(tiny.get_config())
    check_resume(w, config)  # the same model: resumable
    config["model"]["num_layers"] = 3
    with pytest.raises(ConfigError, match=r"cannot resume .*model\.num_layers=2 \(saved\) vs 3"):
        check_resume(w, config)
    assert saved_config_path(w) == w / "checkpoints" / "20" / "config" / "metadata"
    assert saved_config_path(tmp_path / "fresh") is None
