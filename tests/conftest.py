"""Test setup: 8 virtual CPU devices for the sharding tests, one compilation cache per session, and one
tiny run with captures, dumps and a report that several test files read."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# the tests compile many small programs and run each a few times: XLA's backend optimisations cost
# more compile time than they save (tiny's probed step compiles in 7.6 s instead of 9.4)
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402 (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# run.py subprocesses of one session, and its test workers (pytest-xdist), share compiled programs
# (and never touch the user's cache)
RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if RUN_ID:
    os.environ["TDYN_JAX_CACHE"] = os.path.join(tempfile.gettempdir(), f"tdyn_jax_test_cache_{RUN_ID}")
else:
    os.environ["TDYN_JAX_CACHE"] = tempfile.mkdtemp(prefix="tdyn_jax_test_cache_")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["TDYN_JAX_CACHE"], "xla"))

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
ENV["XLA_FLAGS"] = FAST_COMPILE
DUMP_STEP = 2
DUMP_SITES = ("layer_01/resid/out", "layer_00/mlp/up")


# the files of many subprocess runs go first, so that the two test workers (a file each at a time) do
# not end on one long file; the first needs the session's tiny run, the second does not
FIRST = ("test_distributed.py", "test_failures.py", "test_run.py", "test_mistakes.py", "test_scripts.py")


def pytest_collection_modifyitems(items):
    """Puts the tests of the FIRST files first, in that order (within a file the order is kept)."""
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def saved_params(workdir, step):
    """The parameters of checkpoint `step` of a run, restored on one device."""
    import orbax.checkpoint as ocp

    path = Path(workdir) / "checkpoints" / str(step) / "state"
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta)
        return ckptr.restore(path, target)["params"]


def snapshot(root):
    """{path under root: its bytes (None for a directory)}: to check that nothing was written."""
    root = Path(root)
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def run_cmd(workdir, *overrides):
    """The run.py command line of a tiny run in `workdir`."""
    return [sys.executable, "run.py", "--config=configs/tiny.py", f"--workdir={workdir}", *overrides]


def metric_rows(workdir):
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def leaves(tree, prefix=""):
    """{path: array} of a nested dict of arrays (a restored parameter tree)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(leaves(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def start_tiny(workdir, log, *overrides):
    """A tiny run started in the background, its output in the file `log` (a pipe nobody reads while
    the test does other work could fill and stall it)."""
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(run_cmd(workdir, *overrides), cwd=ROOT, env=ENV, stdout=out, stderr=out)


def run_tiny(workdir, *overrides):
    """Runs run.py on configs/tiny.py to the end; returns the finished process."""
    return subprocess.run(
        run_cmd(workdir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(workdir, finished process) of the main job on configs/tiny.py: 20 steps, captures every 5 steps
    and at step 2, full tensors of two sites dumped at step 2, TensorBoard events, and the report
    written at the end."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the test workers: the first to ask runs it, the others wait
    with FileLock(root / "tiny_run.lock"):
        workdir, record = root / "tiny_run" / "run", root / "tiny_run" / "process.json"
        if not record.exists():
            done = run_tiny(
                workdir,
                f"--config.probes.at_steps=({DUMP_STEP},)",
                f"--config.probes.dump_steps=({DUMP_STEP},)",
                f"--config.probes.dump_sites={DUMP_SITES!r}",
                "--config.analysis.report=True",
                "--config.train.tensorboard=True",
            )
            fields = ("args", "returncode", "stdout", "stderr")
            record.write_text(json.dumps({k: getattr(done, k) for k in fields}))
        done = subprocess.CompletedProcess(**json.loads(record.read_text()))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done
