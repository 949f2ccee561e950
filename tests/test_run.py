"""run.py end to end as a subprocess: resume, kill -9 and resume bitwise, SIGTERM/SIGINT, user errors."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from conftest import ENV, ROOT, leaves, metric_rows, run_cmd, run_tiny, saved_params, snapshot, start_tiny

from configs import tiny
from tdyn_jax.analysis import load
from tdyn_jax.analysis.report import write_report
from tdyn_jax.checkpoint import check_resume, saved_config_path
from tdyn_jax.config import ConfigError, to_dict

PLAIN = "--config.probes.enabled=False"  # for the tests of the loop itself: no probed step to compile


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
    rows = metric_rows(first)
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
    longer = start_tiny(extended, tmp_path / "longer.log", "--config.train.num_steps=30")  # meanwhile
    again = run_tiny(w)  # same command: resumes at the end, trains nothing, duplicates nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "from step 20" in again.stderr
    assert [r["step"] for r in metric_rows(w)] == [5, 10, 15, 20]

    assert longer.wait(timeout=600) == 0, (tmp_path / "longer.log").read_text()[-3000:]
    assert [r["step"] for r in metric_rows(extended)] == [5, 10, 15, 20, 25, 30]
    assert list(load(extended).steps) == [0, 2, 5, 10, 15, 20, 25]


def test_a_second_run_in_a_training_runs_directory_is_refused_and_sampling_it_is_not(tmp_path):
    """While a run trains, a second run.py on its directory exits 2 with one line and leaves the first
    training; text can be sampled from it meanwhile (a killed run's lock goes with it: see the kill
    test, which resumes one)."""
    import sys

    w, log, steps = tmp_path / "run", tmp_path / "first.log", ["--config.checkpoint.every=10", PLAIN]
    first = start_tiny(w, log, "--config.train.num_steps=100000", *steps)
    try:
        deadline = time.time() + 120
        while not (w / "checkpoints" / "20").exists():
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        second = subprocess.run(  # without the lock it would train on: the timeout fails the test
            run_cmd(w, "--config.train.num_steps=100000", *steps),
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        sampled = subprocess.run(
            [sys.executable, "experiments/sample.py", f"--workdir={w}", "--prompt=ab", "--temperature=0"],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert first.poll() is None, log.read_text()[-3000:]  # still training, undisturbed
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    (line,) = [x for x in second.stderr.splitlines() if x.strip()]
    assert line == (
        f"error: {w} is in use by another run (a process holds {w / '.lock'}): "
        "wait for it to end or pass another --workdir"
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.startswith("--- step ") and len(sampled.stdout.splitlines()[1]) > 0


def test_kill_and_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    steps = ["--config.train.num_steps=1000", "--config.checkpoint.every=50", "--config.checkpoint.keep=2"]
    steps += ["--config.probes.every=50"]  # tiny's sites: the session's compiled probed step
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    uninterrupted = start_tiny(ref, tmp_path / "ref.log", *steps)
    proc = subprocess.Popen(  # side by side with the reference: the two runs are independent
        run_cmd(crashed, *steps), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: (crashed / "checkpoints" / "100").exists(), proc)
    while_running = load(crashed).steps  # a run that is still training can be read
    assert list(while_running) == list(range(0, 50 * len(while_running), 50)) and len(while_running) >= 2
    proc.kill()
    proc.communicate()
    killed_at = max(r["step"] for r in metric_rows(crashed))
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
    ref_params, new_params = leaves(saved_params(ref, 1000)), leaves(saved_params(crashed, 1000))
    assert ref_params.keys() == new_params.keys()
    for name, value in ref_params.items():
        assert np.array_equal(value, new_params[name]), f"{name} differs after kill and resume"
    ref_rows, new_rows = metric_rows(ref), metric_rows(crashed)
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
    rows = metric_rows(w)  # the stop writes no row of its own: rows stay aligned to log_every
    assert rows and all(r["step"] % 5 == 0 and r["step"] <= saved[0] for r in rows)
    resumed = run_tiny(w, f"--config.train.num_steps={saved[0] + 10}", PLAIN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {saved[0]}" in resumed.stderr
    assert metric_rows(w)[-1]["step"] == saved[0] + 10
    if sig == signal.SIGTERM:  # every field but the timings equals an uninterrupted run's
        ref = tmp_path / "ref"
        assert run_tiny(ref, f"--config.train.num_steps={saved[0] + 10}", PLAIN).returncode == 0
        timing = {"step_time_s", "tokens_per_s", "compile_s"}
        strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
        assert strip(metric_rows(w)) == strip(metric_rows(ref))


def test_incompatible_resume_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    w = tmp_path / "run"
    assert run_tiny(w, "--config.train.num_steps=10", PLAIN).returncode == 0
    before = snapshot(w)
    refused = run_tiny(w, "--config.model.num_layers=3", "--config.train.num_steps=20", PLAIN)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume") and "model.num_layers=2 (saved) vs 3" in line
    assert snapshot(w) == before


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
