"""The plain and the probed train step compiled for a Cloud TPU topology on this machine, without a
TPU: per-chip memory (XLA's plan) and compile time, side by side.

    pip install -e '.[tpu]'   # libtpu from the package index: compiles for TPU, runs nothing
    python benchmarks/tpu_compile.py --config=configs/tpu_v5e_64.py [--topology=v5e:8x8] [--config.x=y]

The mesh is built from the topology's abstract devices; the state and the batch are shapes only.
`--topology=local` compiles for this machine's devices instead (no libtpu needed: the smoke test).
"""

from __future__ import annotations

import time

import jax
from absl import flags
from bench import memory_bytes, probed_program
from jax.experimental import topologies
from ml_collections import config_flags

from tdyn_jax import cli
from tdyn_jax.train import batch_shapes

config_flags.DEFINE_config_file("config", "configs/tpu_v5e_64.py", "Config file.")
flags.DEFINE_string(
    "topology",
    "v5e:8x8",
    "TPU topology to compile for (v5e:2x2, v5e:8x8, v5p:2x2x2), or 'local' for this machine.",
)
flags.DEFINE_float(
    "hbm_gib", 16.0, "Memory of one chip, to say whether the steps fit (v5e: 16 GiB).", lower_bound=0.001
)

GIB = 2**30


def main(_: list[str]) -> None:
    cfg = flags.FLAGS.config
    topology = flags.FLAGS.topology
    devices = jax.devices() if topology == "local" else topologies.get_topology_desc(topology, "tpu").devices
    mesh, program, build_s = probed_program(cfg, devices)
    batch = batch_shapes(cfg, mesh)
    steps = {"plain": program.train_step, "probed": program.probe_step}
    results = {}
    for name, step in steps.items():
        if step is None:
            continue
        start = time.perf_counter()
        compiled = step.lower(program.abstract_state, batch).compile()
        results[name] = (time.perf_counter() - start, *memory_bytes(compiled))
    print(f"config      {cfg.name} on {flags.FLAGS.topology}: {len(devices)} x {devices[0].device_kind}")
    print(f"mesh        {dict(mesh.shape)}; build (traces the probed step) {build_s:.1f} s")
    for name, (seconds, total, temp) in results.items():
        fits = "fits" if total <= flags.FLAGS.hbm_gib * GIB else "does NOT fit"
        print(
            f"{name:11s} compile {seconds:6.1f} s, per chip {total / GIB:6.2f} GiB (temporaries"
            f" {temp / GIB:.2f}): {fits} in {flags.FLAGS.hbm_gib:g} GiB"
        )
    if len(results) == 2:
        (plain_s, plain_mem, _), (probed_s, probed_mem, _) = results["plain"], results["probed"]
        print(f"probed / plain: memory {probed_mem / plain_mem:.2f}x, compile {probed_s / plain_s:.2f}x")


if __name__ == "__main__":
    cli.run(main)
