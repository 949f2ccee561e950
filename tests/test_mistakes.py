"""Every entry point, every mistake: one `error:` line, exit code 2, no traceback, nothing written.

Each case runs its script (as `python SCRIPT ARGS` runs it, see `entry_points`) in a directory of its
own (a copy of the session's tiny run, a regular file, an empty directory, a path that does not exist),
which must be byte for byte the same afterwards. The cases run in parallel, once, in a module fixture;
each test reads its case's result.
"""

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ENV, ROOT, snapshot
from entry_points import run_script

TINY = "--config=configs/tiny.py"
PLAIN = "--config.probes.enabled=False"  # no probed step to trace before the mistake is found
# (script, arguments, the start of what the error line says after "error: "); {run} is a finished
# tiny run, {file} a regular file, {empty} an empty directory, {fresh} a path that does not exist.
# A few config mistakes stand for all that `validate` catches (test_config.py checks each in-process).
CASES = [
    ("run.py", [TINY, "--workdir={fresh}", "--config.seed=-1"], "seed=-1 must be an integer"),
    ("run.py", [TINY, "--workdir={file}"], "workdir {file}: {file} is a file"),
    ("run.py", [TINY, "--workdir={file}/sub"], "workdir {file}/sub: {file} is a file"),
    ("run.py", [TINY, "--workdir=/proc/tdyn_run", PLAIN], "cannot write the run directory /proc/tdyn_run ("),
    (
        "run.py",
        [TINY, "--workdir={fresh}", "--config.model.num_heads=3"],
        "model.d_model=32 is not divisible",
    ),
    ("run.py", [TINY, "--workdir={fresh}", "--foo=1"], "Unknown command line flag 'foo'"),
    ("run.py", ["--config=configs/nope.py", "--workdir={fresh}"], "cannot load the config file"),
    ("run.py", [TINY, "--workdir={fresh}", "--config.model.nope=1"], "unknown config field"),
    ("run.py", ["--workdir={fresh}"], "--config is required"),
    ("run.py", [TINY, "--workdir={fresh}", "extra"], "unexpected arguments: extra"),
    (
        "run.py",
        [TINY, "--workdir={fresh}", "--config.probes.sites=('atn/*',)"],
        "probes.sites pattern 'atn/*'",
    ),
    ("run.py", [TINY, "--workdir={fresh}", "--config.data.source=text"], "data.source=text needs data.path"),
    (
        "run.py",
        [TINY, "--workdir={fresh}", "--config.data.source=text", "--config.data.path=/nonexistent/c.txt"],
        "data.path=/nonexistent/c.txt",
    ),
    ("run.py", [TINY, "--workdir={run}", "--config.model.num_layers=3"], "cannot resume {run}"),
    ("run.py", [TINY, "--workdir={fresh}", "--config.train.num_steps=abc"], ""),
    (
        "run.py",
        [
            TINY,
            "--workdir={fresh}",
            "--config.probes.dump_steps=(2,)",
            "--config.probes.dump_sites=('layer_09/*',)",
        ],
        "probes.dump_sites pattern 'layer_09/*'",
    ),
    ("benchmarks/throughput.py", [TINY, "--config.model.num_heads=3"], "model.d_model=32 is not divisible"),
    ("benchmarks/throughput.py", [TINY, "--steps=0"], "flag --steps=0"),
    ("benchmarks/probe_overhead.py", [TINY, "--rounds=0"], "flag --rounds=0"),
    ("benchmarks/probe_overhead.py", [TINY, "--config.probes.sites=('atn/*',)"], "probes.sites pattern"),
    ("benchmarks/analysis_speed.py", ["--workdir={fresh}"], "{fresh} is not a run directory"),
    ("benchmarks/analysis_speed.py", ["--workdir={empty}"], "{empty} is not a run directory"),
    ("benchmarks/analysis_speed.py", ["--workdir={run}", "--workers=0"], "flag --workers=0"),
    ("benchmarks/tpu_compile.py", [TINY, "--hbm_gib=0"], "flag --hbm_gib=0"),
    ("benchmarks/gpu_check.py", [TINY, "--steps=0"], "flag --steps=0"),
    ("benchmarks/vs_nanodo.py", [TINY, "--nanodo={empty}"], "--nanodo='{empty}' holds no nanodo/model.py"),
    ("experiments/sample.py", ["--workdir={fresh}"], "{fresh} is not a run directory"),
    ("experiments/sample.py", ["--workdir={empty}"], "{empty} is not a run directory"),
    ("experiments/sample.py", ["--workdir={run}", "--temperature=-1"], "flag --temperature=-1"),
    ("experiments/sample.py", ["--workdir={run}", "extra"], "unexpected arguments: extra"),
    ("experiments/analyze.py", ["--workdir={fresh}"], "{fresh} is not a run directory"),
    ("experiments/analyze.py", [], "flag --workdir=None"),
    ("experiments/analyze.py", ["--workdir={run}", "--kinds=nomatch"], "kind pattern 'nomatch' matches no"),
    ("experiments/analyze.py", ["--workdir={run}", "--sites=nomatch"], "site pattern 'nomatch' matches no"),
    ("experiments/analyze.py", ["--workdir={run}", "--steps=abc"], "--steps=abc must be step numbers"),
    ("experiments/analyze.py", ["--workdir={run}", "--steps=999"], "steps [999] were not captured"),
    ("experiments/analyze.py", ["--workdir={run}", "--criterion=xyz"], "flag --criterion=xyz"),
    ("experiments/seed_claims.py", ["--scale=tiny", "--workdir={run}"], "{run} holds the run 'tiny'"),
    ("experiments/seed_claims.py", ["--workers=0"], "flag --workers=0"),
    ("experiments/outlier_levers.py", ["--scale=tiny", "--lrs=abc"], "--lrs and --eps take numbers"),
    ("experiments/outlier_levers.py", ["--scale=tiny", "--norms=weird"], "--norms: unknown weird"),
    ("experiments/outlier_levers.py", ["--scale=bogus"], "flag --scale=bogus"),
    ("experiments/pythia_reference.py", ["--workdir={fresh}"], "{fresh} is not a run directory"),
    ("experiments/pythia_reference.py", ["--tails={fresh}"], "--tails={fresh} does not exist"),
    ("experiments/lowprec_training.py", ["--scale=tiny", "--runs=fp9"], "--runs: unknown fp9"),
    ("experiments/lowprec_training.py", ["--scale=tiny", "--runs=mxfp4"], "--runs must include float32"),
]


def _run_case(index: int, root: Path, run: Path) -> tuple:
    case = root / f"case_{index:02d}"
    case.mkdir()
    script, args, _ = CASES[index]
    if any("{run}" in a for a in args):  # only the cases that point at it get a copy of the run
        shutil.copytree(run, case / "run")
    (case / "file").write_text("not a directory\n")
    (case / "empty").mkdir()
    names = {k: str(case / k) for k in ("run", "file", "empty", "fresh")}
    before = snapshot(case)
    done = run_script(script, [a.format(**names) for a in args], ROOT, ENV, timeout=600)
    return done, before, snapshot(case), names


@pytest.fixture(scope="module")
def results(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda i: _run_case(i, root, tiny_run[0]), range(len(CASES))))


def test_the_table_has_forty_mistakes_over_every_entry_point():
    scripts = {script for script, _, _ in CASES}
    entry_points = {"run.py"} | {
        f"{d}/{p.name}" for d in ("experiments", "benchmarks") for p in (ROOT / d).glob("*.py")
    }
    assert len(CASES) >= 40 and scripts == entry_points - {"benchmarks/bench.py"}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{s} {' '.join(a)}"[:90] for s, a, _ in CASES])
def test_a_mistake_is_one_line_exit_2_and_changes_nothing(results, index):
    done, before, after, names = results[index]
    expected = CASES[index][2].format(**names)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert after == before  # nothing written, moved or deleted


SCRIPTS = {  # what the forked run must report as `python SCRIPT` does
    "raises": "import sys\nprint('out')\nraise ValueError('boom')\n",
    "exits": "import atexit, sys\natexit.register(lambda: print('at exit', file=sys.stderr))\nsys.exit(3)\n",
    "message": "import sys\nsys.exit('bad input')\n",
    "argv": "import os, sys\nprint(sys.argv[1:], os.getcwd(), os.environ['MARK'], sys.path[0])\n",
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_forked_script_reports_what_python_reports(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPTS[name])
    env = ENV | {"MARK": "set"}
    want = subprocess.run(
        [sys.executable, str(script), "a b", "c"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    got = run_script(str(script), ["a b", "c"], tmp_path, env, timeout=60)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
    assert got.stderr == want.stderr
