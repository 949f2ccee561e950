"""The failure paths: a run that diverges, damaged checkpoints, and what the user sees of each."""

import errno
import json
import re
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ENV, ROOT, run_cmd, run_tiny, saved_params, snapshot

from tdyn_jax import cli
from tdyn_jax.analysis import load

PLAIN = "--config.probes.enabled=False"
# sgd at lr 1 with heavy momentum and no norm: the tiny model's loss is nan after about 30 steps
DIVERGE = (
    "--config.optim.name=sgd", "--config.optim.lr=1", "--config.optim.grad_clip=0",
    "--config.optim.momentum=0.99", "--config.model.norm=none", "--config.train.num_steps=60",
)  # fmt: skip


def _strict_rows(workdir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN or Infinity tokens fail the test)."""
    text = (workdir / "metrics.jsonl").read_text()
    bad = lambda token: pytest.fail(f"metrics.jsonl is not strict JSON: {token}")
    return [json.loads(line, parse_constant=bad) for line in text.splitlines()]


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_what_was_good(tmp_path):
    w = tmp_path / "run"
    done = run_tiny(w, *DIVERGE, "--config.analysis.report=True")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    found = re.match(
        r"error: non-finite (loss|grad_norm) \(\w+\) at step (\d+) \(train.nonfinite=stop\)", line
    )
    assert found, line
    bad = int(found.group(2))
    saved = _checkpoints(w)
    assert saved and max(saved) < bad and f"checkpoints/{max(saved)}" in line  # only finite states
    rows = _strict_rows(w)
    assert rows[-1]["loss"] is None or rows[-1]["grad_norm"] is None  # the blow-up, as null
    assert all(r["loss"] is not None for r in rows if r["step"] < bad - 5)
    captures = load(w)  # readable, up to the step that blew up
    assert list(captures.steps) == list(range(0, bad, 5))
    assert "report: " in done.stdout and (w / "analysis" / "report.html").exists()
    # the same command resumes from the newest (finite) checkpoint and stops at the same step
    again = run_tiny(w, *DIVERGE, "--config.analysis.report=False")
    assert again.returncode == 3 and f"at step {bad} " in again.stderr.strip().splitlines()[-1]
    assert f"from step {max(saved)}" in again.stderr


def test_skip_leaves_the_state_unchanged_and_stops_after_max_skipped_in_a_row(tmp_path):
    w = tmp_path / "run"
    done = run_tiny(w, *DIVERGE, "--config.train.nonfinite=skip", "--config.train.max_skipped=4", PLAIN)
    assert done.returncode == 3, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert re.match(r"error: 4 non-finite steps in a row \(train.max_skipped\) at step \d+ ", line), line
    rows = _strict_rows(w)
    assert any(r["skipped"] > 0 for r in rows) and all(0 <= r["skipped"] <= 5 for r in rows)
    for step in _checkpoints(w):  # skipped steps never reach the state
        state = saved_params(w, step)
        assert all(np.isfinite(v).all() for v in jax.tree.leaves(state)), step


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    data = _largest(step_dir / "state" / "d")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _overwrite(step_dir: Path) -> None:
    data = _largest(step_dir / "state" / "d")
    data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))


def _empty_dir(directory: Path) -> None:
    for p in directory.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


CORRUPTIONS = {
    "data file truncated": _truncate,
    "data file overwritten": _overwrite,
    "_METADATA emptied": lambda d: (d / "state" / "_METADATA").write_bytes(b""),
    "manifest.ocdbt garbage": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"garbage" * 20),
    "state/ deleted": lambda d: __import__("shutil").rmtree(d / "state"),
    "data/ deleted": lambda d: __import__("shutil").rmtree(d / "data"),
    "step directory emptied": _empty_dir,
}


@pytest.fixture(scope="module")
def finished_plain_run(tmp_path_factory):
    """A tiny run without capture, 20 steps, checkpoints 10 and 20."""
    w = tmp_path_factory.mktemp("plain") / "run"
    done = run_tiny(w, PLAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _checkpoints(w) == [10, 20]
    return w


def _restore(workdir: Path):
    """restore_or_init of the tiny config on `workdir`, in this process: (state, data iterator)."""
    from configs import tiny
    from tdyn_jax import data as data_lib
    from tdyn_jax import sharding
    from tdyn_jax.checkpoint import Checkpoints
    from tdyn_jax.train import build, restore_or_init

    cfg = tiny.get_config()
    cfg.probes.enabled = False
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    program = build(cfg, mesh)
    tokens, _ = data_lib.load_splits(cfg.data, cfg.model.vocab_size)
    batches = data_lib.Batches(tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.seed)
    ckpt = Checkpoints(workdir, cfg.checkpoint)
    try:
        state, _ = restore_or_init(program, ckpt, batches, workdir)
    finally:
        ckpt.close()
    return state, batches


# the reads an in-process failed restore leaves in flight finish into Orbax's closed event loop; the
# command-line entry points drop those errors (`cli.drop_closed_loop_callbacks`), pytest reports them
STRAY_READS = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def test_only_the_stray_reads_errors_are_dropped(monkeypatch):
    """The hook drops a closed loop's call_soon_threadsafe error and passes any other on."""
    import asyncio
    import sys
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    cli.drop_closed_loop_callbacks()
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        stray = types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__, object=None)
    other = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), exc_traceback=None)
    different = types.SimpleNamespace(exc_value=ValueError("bad"), exc_traceback=None)
    for unraisable in (stray, other, different):
        sys.unraisablehook(unraisable)
    assert seen == [other, different]


@STRAY_READS
@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restores(
    finished_plain_run, tmp_path, caplog, case
):
    w = tmp_path / "run"
    shutil.copytree(finished_plain_run, w)
    CORRUPTIONS[case](w / "checkpoints" / "20")
    with caplog.at_level("WARNING"):
        state, batches = _restore(w)
    assert int(state.step) == 10 and batches.state["index"] == 10
    assert (w / "checkpoints" / "20.corrupt").is_dir() and not (w / "checkpoints" / "20").exists()
    assert _checkpoints(w) == [10]
    ours = [r for r in caplog.records if r.levelname == "WARNING" and "/tdyn_jax/" in r.pathname]
    (warning,) = [r.getMessage() for r in ours]
    assert warning.startswith("checkpoint 20 does not restore (") and "moved aside to" in warning


def test_when_no_checkpoint_restores_the_run_stops_with_one_line_and_changes_nothing(
    finished_plain_run, tmp_path
):
    w = tmp_path / "run"
    shutil.copytree(finished_plain_run, w)
    for step in (10, 20):
        CORRUPTIONS["_METADATA emptied"](w / "checkpoints" / str(step))
    before = snapshot(w)
    done = run_tiny(w, PLAIN, "--config.train.num_steps=30")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: no checkpoint in {w / 'checkpoints'} restores (newest, 20: "), line
    assert snapshot(w) == before


def test_a_run_resumes_past_a_damaged_checkpoint_and_cuts_its_logs_back(finished_plain_run, tmp_path):

    w = tmp_path / "run"
    shutil.copytree(finished_plain_run, w)
    CORRUPTIONS["data file truncated"](w / "checkpoints" / "20")
    done = run_tiny(w, PLAIN, "--config.train.num_steps=30")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "does not restore" in line]
    assert len(warnings) == 1 and "checkpoint 20 does not restore" in warnings[0]
    assert "from step 10" in done.stderr and "Traceback" not in done.stderr  # no stray reads' errors
    assert [r["step"] for r in _strict_rows(w)] == [5, 10, 15, 20, 25, 30]
    assert _checkpoints(w) == [20, 30] and (w / "checkpoints" / "20.corrupt").is_dir()


PROBE_CORRUPTIONS = {
    "truncated": lambda d: _truncate_file(_largest(d / "captures")),
    "random bytes": lambda d: _largest(d / "captures").write_bytes(np.random.default_rng(1).bytes(4096)),
    "index/ deleted": lambda d: __import__("shutil").rmtree(d / "index"),
    "captures/ deleted": lambda d: __import__("shutil").rmtree(d / "captures"),
}


def _truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@STRAY_READS
@pytest.mark.parametrize("case", PROBE_CORRUPTIONS)
def test_an_unreadable_probe_chunk_is_skipped_with_one_warning(tiny_run, tmp_path, caplog, case):
    from tdyn_jax.analysis import CapturesError

    w = tmp_path / "run"
    shutil.copytree(tiny_run[0], w)
    PROBE_CORRUPTIONS[case](w / "probes" / "10")
    with caplog.at_level("WARNING"):
        captures = load(w)
    assert list(captures.steps) == [10, 15] and captures.missing == ((0, 9),)
    ours = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(ours) == 1 and ours[0].startswith(f"skipping {w.absolute() / 'probes' / '10'} (")
    assert ours[0].endswith("it held the captures of steps 0 to 9")
    with pytest.raises(CapturesError, match="does not read"):
        load(w, strict=True)


def test_the_report_of_a_run_with_an_unreadable_chunk_says_what_is_missing(tiny_run, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(tiny_run[0], w)
    shutil.rmtree(w / "analysis")
    PROBE_CORRUPTIONS["index/ deleted"](w / "probes" / "10")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "experiments/analyze.py", f"--workdir={w}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Traceback" not in done.stderr and len([x for x in done.stderr.splitlines() if "skipping" in x]) == 1
    )
    page = (w / "analysis" / "report.html").read_text()
    assert "captures missing (unreadable chunks)</th><td>steps 0 to 9<" in page
    assert "capture steps</th><td>10, 15<" in page


def test_a_finished_run_whose_report_was_cut_short_writes_it_on_rerun(tiny_run, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(tiny_run[0], w)
    shutil.move(w / "analysis", w / "analysis.tmp")  # a kill while the report was written
    (w / "analysis.tmp" / "report.html").unlink()
    # the dumps were taken: a rerun without them may resume (they are resumable fields) and traces less
    done = run_tiny(w, f"--config.probes.at_steps=({2},)", "--config.analysis.report=True")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report is missing: writing it" in done.stdout
    assert (w / "analysis" / "report.html").exists() and not (w / "analysis.tmp").exists()


@pytest.mark.parametrize("delay", [0.3, 2.0])  # while importing, while building and compiling
def test_ctrl_c_while_starting_exits_130_quietly(tmp_path, delay):
    import signal
    import subprocess
    import time

    from conftest import ENV, ROOT, run_cmd

    w = tmp_path / "run"
    # a model of its own, 12 unrolled layers: compiled afresh for seconds, so the signal lands first
    model = ("--config.model.d_ff=48", "--config.model.num_layers=12", "--config.model.scan_layers=False")
    cmd = run_cmd(
        w, PLAIN, *model, "--config.train.num_steps=100000", "--config.train.compilation_cache=False"
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a run that ignored the signal must not outlive the test
    assert proc.returncode == 130, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C)"), err
    assert not (w / "config.json").exists() and not (w / "metrics.jsonl").exists()


# what tensorstore (under Orbax) raises when the disk is full, as a run on a full tmpfs printed it
TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing local file "/d/20.orbax-checkpoint-tmp/state/_sharding": '
    'Failed writing: "/d/20.orbax-checkpoint-tmp/state/_sharding.__lock": Failed to write '
    "1000 bytes to file 13: No space left on device [os_error_code='28']"
)


def test_a_full_disk_is_recognised_in_what_python_and_tensorstore_raise():
    assert cli.no_space(OSError(errno.ENOSPC, "No space left on device", "/d/m.jsonl")) == "/d/m.jsonl"
    assert cli.no_space(ValueError(TENSORSTORE_FULL)) == "/d/20.orbax-checkpoint-tmp/state/_sharding.__lock"
    try:  # raised from it, as Orbax's futures re-raise
        try:
            raise ValueError(TENSORSTORE_FULL)
        except ValueError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as chained:
        assert cli.no_space(chained).endswith("_sharding.__lock")
    for other in (OSError(errno.EACCES, "Permission denied", "/d"), ValueError("RESOURCE_EXHAUSTED: memory")):
        assert cli.no_space(other) is None


FULL_DISK = """set -e
mount -t tmpfs -o size=64m tmpfs "$MNT"
"$@" --config.train.num_steps=10 2> "$OUT/first.err"
used=$(df -k --output=used "$MNT" | tail -1)
mount -o remount,size=$((used + 64))k "$MNT"  # room for less than one more checkpoint
set +e
"$@" 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"
ls "$MNT/run/checkpoints" > "$OUT/full.ls"
mount -o remount,size=64m "$MNT"
"$@" 2> "$OUT/again.err"; echo $? > "$OUT/again.rc"
ls "$MNT/run/checkpoints" > "$OUT/again.ls"
"""


def test_a_run_that_fills_its_disk_stops_with_one_line_and_resumes_once_there_is_room(tmp_path):
    """On a small filesystem (a tmpfs in a user and mount namespace): the checkpoint after step 10 does
    not fit; the run says so in one line (exit 2), keeps checkpoint 10, and the same command resumes
    from it and finishes once there is room."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir(), out.mkdir()
    mount = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]
    if shutil.which("unshare") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs a tmpfs in user and mount namespaces (unshare -rm), not allowed here")
    command = run_cmd(mnt / "run", PLAIN, "--config.train.num_steps=20")
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", *command], cwd=ROOT, capture_output=True, text=True,
        env=ENV | {"MNT": str(mnt), "OUT": str(out)}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    read = lambda name: (out / name).read_text()
    assert read("full.rc").strip() == "2" and "Traceback" not in read("full.err")
    lines = [line for line in read("full.err").splitlines() if not re.match(r"I\d{4} ", line)]  # not its log
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: no space left on the device writing {mnt}/run/checkpoints/20.")
    assert read("full.ls").split() == ["10", "20.orbax-checkpoint-tmp"]  # 10 intact, 20 partial
    assert read("again.rc").strip() == "0" and "from step 10" in read("again.err")
    assert read("again.ls").split() == ["10", "20"]
