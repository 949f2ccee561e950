"""Cost of capture: the plain and the probed train step of a config side by side in one process.

    python benchmarks/probe_overhead.py --config=configs/small.py [--rounds=10] [--config.x=y]

Prints trace + compile times, median step times (interleaved: plain, probed, plain, ...), the ratio
probed / plain, the amortized overhead when every Nth step is probed, XLA's memory plan of both steps
and their ratio, and the on-disk size and write time of one capture in the probe store.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
from absl import flags
from bench import interleaved, memory_bytes, probed_program, random_batches, timed_compile
from ml_collections import config_flags

from tdyn_jax import cli
from tdyn_jax.probe_store import ProbeStore

config_flags.DEFINE_config_file("config", "configs/small.py", "Config file.")
flags.DEFINE_integer("rounds", 10, "Timed rounds of (plain, probed) after one warm-up round.", lower_bound=1)

MIB = 2**20


def main(_: list[str]) -> None:
    cfg = flags.FLAGS.config
    mesh, program, build_s = probed_program(cfg)
    batches = random_batches(cfg, mesh)
    state = program.init()
    batch = next(batches)
    plain, plain_lower_s, plain_s = timed_compile(program.train_step, state, batch)
    probed, probed_lower_s, probed_s = timed_compile(program.probe_step, state, batch)
    medians, state = interleaved({"plain": plain, "probed": probed}, state, batches, flags.FLAGS.rounds)
    captured = jax.device_get(probed(state, next(batches))[2])
    with tempfile.TemporaryDirectory() as tmp:
        store = ProbeStore(tmp, program.probe_index)
        start = time.perf_counter()
        store.save(1, [(0, captured)])
        save_s = time.perf_counter() - start
        store.close()
        disk = sum(f.stat().st_size for f in Path(tmp, "probes").rglob("*") if f.is_file())
    (mem_plain, temp_plain), (mem_probed, temp_probed) = memory_bytes(plain), memory_bytes(probed)
    t_plain, t_probed = medians["plain"], medians["probed"]
    n_sites = len({s for sites in program.probe_index.values() for s in sites})
    print(f"config               {cfg.name} on {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"sites captured       {n_sites} ({len(program.probe_index)} statistics)")
    print(f"trace + lower        plain {plain_lower_s:.1f} s, probed {build_s + probed_lower_s:.1f} s")
    print(f"compile              plain {plain_s:.1f} s, probed {probed_s:.1f} s")
    total_plain, total_probed = plain_lower_s + plain_s, build_s + probed_lower_s + probed_s
    print(f"compile ratio        {total_probed / total_plain:.2f}x (trace + lower + compile)")
    print(f"step time (median)   plain {t_plain * 1e3:.1f} ms, probed {t_probed * 1e3:.1f} ms")
    print(f"probed / plain       {t_probed / t_plain:.2f}x")
    for every in (10, 100):
        extra = (t_probed - t_plain) / (every * t_plain)
        with_store = (t_probed - t_plain + save_s) / (every * t_plain)
        store_note = f"+{100 * with_store:.2f} % with the store write"
        print(f"amortized every={every:<4d} +{100 * extra:.2f} % ({store_note})")
    print(
        f"memory (XLA plan)    plain {mem_plain / MIB:.1f} MiB (temp {temp_plain / MIB:.1f}), "
        f"probed {mem_probed / MIB:.1f} MiB (temp {temp_probed / MIB:.1f}): {mem_probed / mem_plain:.2f}x"
    )
    print(f"one capture on disk  {disk / MIB:.2f} MiB, written in {save_s:.2f} s")


if __name__ == "__main__":
    cli.run(main)
