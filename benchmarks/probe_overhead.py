"""Cost of capture: plain and probed train steps side by side in one process.

    python benchmarks/probe_overhead.py --config=configs/small.py [--steps=10] [--config.x=y]

Prints compile times, median step times (interleaved: plain, probed, plain, ...), the ratio
probed / plain, the amortized overhead when every Nth step is probed, XLA's memory plan of both
steps, and the on-disk size and write time of one capture in the probe store.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tdyn_jax import data as data_lib
from tdyn_jax import sharding
from tdyn_jax.config import validate
from tdyn_jax.probe_store import ProbeStore
from tdyn_jax.train import build

config_flags.DEFINE_config_file("config", "configs/small.py", "Config file.")
flags.DEFINE_integer("steps", 10, "Timed steps of each kind (after one warm-up step each).")


def _memory(compiled) -> str:
    m = compiled.memory_analysis()
    if m is None:
        return "n/a"
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return f"{total / 2**20:.1f} MiB (temp {m.temp_size_in_bytes / 2**20:.1f} MiB)"


def _timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def main(_: list[str]) -> None:
    cfg = flags.FLAGS.config
    cfg.probes.enabled = True
    validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(cfg)
    t = time.perf_counter()
    program = build(cfg, mesh)
    trace_s = time.perf_counter() - t
    tokens = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint16)
    batches = data_lib.Batches(tokens, cfg.data.seq_len, cfg.data.batch_size, 0)
    batch = sharding.global_batch(next(batches), mesh)
    state = program.init()
    compiled, compile_s = {}, {}
    for name, step in (("plain", program.train_step), ("probed", program.probe_step)):
        t = time.perf_counter()
        compiled[name] = step.lower(state, batch).compile()
        compile_s[name] = time.perf_counter() - t
    plain = lambda s, b: compiled["plain"](s, b)
    probed = lambda s, b: (lambda r: (r[0], r[1], jax.device_get(r[2])))(compiled["probed"](s, b))
    (state, _), _ = _timed(plain, state, batch)
    (state, _, captured), _ = _timed(probed, state, batch)
    times = {"plain": [], "probed": []}
    for _ in range(flags.FLAGS.steps):
        (state, _), dt = _timed(plain, state, sharding.global_batch(next(batches), mesh))
        times["plain"].append(dt)
        (state, _, captured), dt = _timed(probed, state, sharding.global_batch(next(batches), mesh))
        times["probed"].append(dt)
    t_plain, t_probed = (float(np.median(times[k])) for k in ("plain", "probed"))
    with tempfile.TemporaryDirectory() as tmp:
        store = ProbeStore(tmp, program.probe_index)
        t = time.perf_counter()
        store.save(1, [(0, captured)])
        save_s = time.perf_counter() - t
        store.close()
        disk = sum(f.stat().st_size for f in Path(tmp, "probes").rglob("*") if f.is_file())
    n_sites = len({s for sites in program.probe_index.values() for s in sites})
    print(f"config               {cfg.name} on {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"sites captured       {n_sites} ({len(program.probe_index)} statistics)")
    print(f"trace (build)        {trace_s:.1f} s")
    print(f"compile              plain {compile_s['plain']:.1f} s, probed {compile_s['probed']:.1f} s")
    print(f"step time (median)   plain {t_plain * 1e3:.1f} ms, probed {t_probed * 1e3:.1f} ms")
    print(f"probed / plain       {t_probed / t_plain:.2f}x")
    for every in (10, 100):
        extra = (t_probed - t_plain) / (every * t_plain)
        with_store = (t_probed - t_plain + save_s) / (every * t_plain)
        store_note = f"+{100 * with_store:.2f} % with the store write"
        print(f"amortized every={every:<4d} +{100 * extra:.2f} % ({store_note})")
    print(f"memory (XLA plan)    plain {_memory(compiled['plain'])}, probed {_memory(compiled['probed'])}")
    print(f"one capture on disk  {disk / 2**20:.2f} MiB, written in {save_s:.2f} s")


if __name__ == "__main__":
    app.run(main)
