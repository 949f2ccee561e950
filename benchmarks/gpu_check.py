"""The device check: a config trained on its own data for a few hundred steps with capture every
`probes.every` steps, timed step by step, on whatever accelerator JAX finds (one GPU, say).

    python benchmarks/gpu_check.py --config=configs/gpu_125m.py [--steps=300] [--config.x=y]

Prints tokens/s and the model FLOP utilisation of the plain and of the probed step (medians, against
a bf16 matmul peak measured in the same process), the probed / plain ratio and the amortized overhead,
XLA's memory plan of both steps and the device's peak memory, and the loss at the start and the end.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from bench import flops_per_token, global_batches, matmul_peak, memory_bytes, probed_program, timed_compile
from ml_collections import config_flags

from tdyn_jax import cli
from tdyn_jax import data as data_lib
from tdyn_jax.train import is_capture_step

config_flags.DEFINE_config_file("config", "configs/gpu_125m.py", "Config file.")
flags.DEFINE_integer("steps", 300, "Steps to train (probed at step 0 and every probes.every).", lower_bound=1)
flags.DEFINE_integer(
    "peak_size", 8192, "Side of the square bf16 matmul that measures the peak.", lower_bound=1
)

GIB = 2**30


def main(_: list[str]) -> None:
    cfg = flags.FLAGS.config
    mesh, program, _ = probed_program(cfg)
    train_tokens, _ = data_lib.load_splits(cfg.data, cfg.model.vocab_size)
    batches = global_batches(
        data_lib.Batches(train_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.seed), mesh
    )
    state = program.init()
    plain, _, plain_s = timed_compile(program.train_step, state, next(batches))
    probed, _, probed_s = timed_compile(program.probe_step, state, next(batches))
    times: dict[str, list[float]] = {"plain": [], "probed": []}
    losses = []
    for step in range(flags.FLAGS.steps):
        kind = "probed" if is_capture_step(cfg.probes, step) else "plain"
        start = time.perf_counter()
        out = jax.block_until_ready((probed if kind == "probed" else plain)(state, next(batches)))
        times[kind].append(time.perf_counter() - start)
        state = out[0]
        losses.append(float(out[1]["loss"]))
    tokens = cfg.data.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    peak = matmul_peak(flags.FLAGS.peak_size, jnp.bfloat16)
    median = {k: float(np.median(v[1:] if len(v) > 1 else v)) for k, v in times.items()}
    device = jax.devices()[0]
    params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"device          {jax.device_count()} x {device.device_kind} ({jax.default_backend()})")
    print(f"config          {cfg.name}: {params / 1e6:.1f}M parameters, {tokens} tokens per step")
    print(f"compile         plain {plain_s:.1f} s, probed {probed_s:.1f} s")
    for kind in ("plain", "probed"):
        t = median[kind]
        mfu = 100 * flops / t / peak
        count = len(times[kind])
        print(
            f"{kind:15s} {t * 1e3:8.1f} ms  {tokens / t:12,.0f} tokens/s  MFU {mfu:5.1f} %  ({count} steps)"
        )
    ratio = median["probed"] / median["plain"]
    amortized = (ratio - 1) / cfg.probes.every
    print(f"probed / plain  {ratio:.2f}x; amortized at every={cfg.probes.every}: +{100 * amortized:.2f} %")
    print(f"matmul peak     {peak / 1e12:.1f} TFLOP/s (bf16 in, f32 out, {flags.FLAGS.peak_size}^3)")
    (plain_mem, _), (probed_mem, _) = memory_bytes(plain), memory_bytes(probed)
    ratio = probed_mem / plain_mem
    print(
        f"memory (XLA)    plain {plain_mem / GIB:.2f} GiB, probed {probed_mem / GIB:.2f} GiB ({ratio:.2f}x)"
    )
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"device peak     {stats['peak_bytes_in_use'] / GIB:.2f} GiB")
    print(f"loss            {losses[0]:.3f} at step 0, {losses[-1]:.3f} at step {len(losses)}")


if __name__ == "__main__":
    cli.run(main)
