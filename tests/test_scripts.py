"""Every benchmark and experiment script not tested elsewhere runs on configs/tiny.py (or the session's
tiny run) and prints its numbers: none of them can break silently."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import ENV, ROOT


def _run(*args, timeout=600):
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _number(pattern, text):
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return float(found.group(1).replace(",", ""))


def test_throughput_benchmark():
    out = _run("benchmarks/throughput.py", "--config=configs/tiny.py", "--steps=3", "--peak_size=256")
    assert _number(r"tokens/s\s+([\d,]+)", out) > 0
    assert 0 < _number(r"MFU\s+([\d.]+) %", out) < 100


# the benchmarks' smoke tests check the scripts, not the statistics (those are tested on their own):
# the residual stream's outlier metrics compile in seconds where every statistic takes ten
NARROW = ("--config.probes.stats=('outliers',)", "--config.probes.grads=False")


def test_probe_overhead_benchmark():
    out = _run("benchmarks/probe_overhead.py", "--config=configs/tiny.py", "--rounds=2", *NARROW)
    assert _number(r"probed / plain\s+([\d.]+)x", out) > 0  # a ratio was printed (timings: not asserted)
    assert _number(r"memory \(XLA plan\).*: ([\d.]+)x", out) > 0.5
    assert _number(r"one capture on disk\s+([\d.]+) MiB", out) > 0


def test_tpu_compile_benchmark_on_local_devices():
    """The script that compiles for a TPU topology, here for 8 virtual CPU devices (libtpu is optional)."""
    env = {**ENV, "XLA_FLAGS": f"{ENV['XLA_FLAGS']} --xla_force_host_platform_device_count=8"}
    args = [
        "benchmarks/tpu_compile.py",
        "--config=configs/tiny.py",
        "--topology=local",
        "--config.mesh.fsdp=2",
        *NARROW,
    ]
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{'data': 4, 'fsdp': 2}" in done.stdout
    assert _number(r"probed / plain: memory ([\d.]+)x", done.stdout) > 1
    assert _number(r"plain\s+compile\s+([\d.]+) s", done.stdout) > 0


def test_gpu_check_runs_on_the_cpu():
    """The device check on configs/tiny.py: it trains, probes every 5 steps and reports both steps."""
    args = ["--config=configs/tiny.py", "--steps=11", "--peak_size=256", *NARROW]
    out = _run("benchmarks/gpu_check.py", *args)
    assert "(3 steps)" in out  # steps 0, 5 and 10 were probed
    assert _number(r"probed / plain\s+([\d.]+)x", out) > 0  # a ratio was printed (timings: not asserted)
    assert _number(r"plain\s+[\d.]+ ms\s+([\d,]+) tokens/s", out) > 0
    assert 0 < _number(r"probed\s+[\d.]+ ms\s+[\d,]+ tokens/s\s+MFU\s+([\d.]+) %", out) < 100
    start, end = (
        _number(pattern, out) for pattern in (r"loss\s+([\d.]+) at step 0", r", ([\d.]+) at step 11")
    )
    assert end < start  # it trains


# a stand-in for a nanodo checkout with its interface (nanodo.model.DoConfig and TransformerDo,
# nanodo.optimizer.get_optimizer): the real one is not on the package index
STAND_IN = {
    "model.py": """
import dataclasses
import flax.linen as nn
import jax.numpy as jnp

@dataclasses.dataclass
class DoConfig:
    D: int
    H: int
    L: int
    N: int
    V: int
    F: int
    dtype: jnp.dtype = jnp.float32
    fsdp_enabled: bool = True

class TransformerDo(nn.Module):
    docfg: DoConfig

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.docfg.V, self.docfg.D)
        return embed.attend(nn.Dense(self.docfg.D, dtype=self.docfg.dtype)(embed(tokens)))
""",
    "optimizer.py": """
import optax

def get_optimizer(c):
    return optax.MultiSteps(optax.adamw(c.peak_learning_rate, b1=c.b1, b2=c.b2), 1)
""",
}


def test_nanodo_comparison(tmp_path):
    """The comparison runs both steps, interleaved, and prints both throughputs and their ratio."""
    (tmp_path / "nanodo").mkdir()
    for name, text in {"__init__.py": "", **STAND_IN}.items():
        (tmp_path / "nanodo" / name).write_text(text)
    args = ["benchmarks/vs_nanodo.py", "--config=configs/tiny.py", "--rounds=2", "--dtypes=bfloat16"]
    out = _run(*args, f"--nanodo={tmp_path}")
    line = next(line for line in out.splitlines() if line.startswith("bfloat16"))
    ours, theirs = (_number(rf"{who}\s+[\d.]+ ms\s+([\d,]+) tok/s", line) for who in ("tdyn_jax", "nanodo"))
    assert ours > 0 and theirs > 0
    assert _number(r"/ nanodo ([\d.]+)x", line) == pytest.approx(ours / theirs, rel=0.005, abs=0.006)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the session's tiny run, for scripts that write into it."""
    workdir, _ = tiny_run
    return shutil.copytree(workdir, tmp_path / "run")


def test_analysis_speed_benchmark(run_copy):
    out = _run("benchmarks/analysis_speed.py", f"--workdir={run_copy}", "--workers=2")
    assert _number(r"fit every site x step: 1 thread ([\d.]+) s", out) > 0
    assert _number(r"write_report: [\d.]+ s, (\d+) figures", out) > 0
    assert (run_copy / "analysis" / "report.html").exists()


def test_sample_experiment(tiny_run):
    workdir, _ = tiny_run
    out = _run("experiments/sample.py", f"--workdir={workdir}", "--prompt=ab", "--temperature=0")
    assert out.startswith("--- step 20, temperature 0.0 ---")
    assert len(out.splitlines()[1]) > 0
