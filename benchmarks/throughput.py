"""Training throughput of a config: tokens/s, step time, model FLOPs per token and MFU.

    python benchmarks/throughput.py --config=configs/small.py [--steps=30] [--config.x=y]

MFU is measured against a matmul peak timed on the same device in the same process: a square
matmul in the config's compute dtype with float32 accumulation.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags
from bench import flops_per_token, matmul_peak
from ml_collections import config_flags

from tdyn_jax import cli, sharding
from tdyn_jax import data as data_lib
from tdyn_jax.config import validate
from tdyn_jax.model import DTYPES
from tdyn_jax.train import build

config_flags.DEFINE_config_file("config", "configs/small.py", "Config file.")
flags.DEFINE_integer("steps", 30, "Timed steps (after two warm-up steps).", lower_bound=1)
flags.DEFINE_integer("peak_size", 2048, "Side of the square matmul that measures the peak.", lower_bound=1)


def main(_: list[str]) -> None:
    cfg = flags.FLAGS.config
    validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(cfg)
    program = build(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint16)
    batches = data_lib.Batches(tokens, cfg.data.seq_len, cfg.data.batch_size, 0)
    state = program.init()
    t = time.perf_counter()
    for _ in range(2):
        state, metrics = program.train_step(state, sharding.global_batch(next(batches), mesh))
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(flags.FLAGS.steps):
        batch = sharding.global_batch(next(batches), mesh)
        t = time.perf_counter()
        state, metrics = program.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    achieved = fpt * tokens_per_step / step_s
    peak = matmul_peak(flags.FLAGS.peak_size, DTYPES[cfg.model.compute_dtype])
    params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"config            {cfg.name} ({params / 1e6:.2f}M params, {cfg.model.compute_dtype} compute)")
    print(f"devices           {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"compile+2 steps   {warmup_s:.1f} s")
    print(f"step time         {step_s * 1e3:.1f} ms (median of {len(times)})")
    print(f"tokens/s          {tokens_per_step / step_s:,.0f}")
    print(f"FLOPs/token       {fpt / 1e6:.2f} MFLOP (train, 3x forward)")
    print(f"achieved          {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul peak       {peak / 1e9:.1f} GFLOP/s ({flags.FLAGS.peak_size}^3, same dtype)")
    print(f"MFU               {100 * achieved / peak:.1f} %")


if __name__ == "__main__":
    cli.run(main)
