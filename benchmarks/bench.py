"""What the benchmark scripts share: random batches over the config's vocabulary, XLA's memory plan,
interleaved timing of several steps (medians: these machines vary by 15-25% from run to run), the
model FLOPs per token and a matmul peak measured in the same process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from tdyn_jax import data as data_lib
from tdyn_jax import sharding
from tdyn_jax.config import validate
from tdyn_jax.model import matmul
from tdyn_jax.train import Program, build


def global_batches(batches: data_lib.Batches, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
    """The batches as global arrays on `mesh`, without end."""
    while True:
        yield sharding.global_batch(next(batches), mesh)


def random_batches(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
    """Global batches of uniformly random tokens over the whole vocabulary (no corpus to load)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, 64 * cfg.data.seq_len * cfg.data.batch_size)
    return global_batches(
        data_lib.Batches(tokens.astype(np.uint32), cfg.data.seq_len, cfg.data.batch_size, 0), mesh
    )


def probed_program(
    cfg: ml_collections.ConfigDict, devices: list | None = None
) -> tuple[Mesh, Program, float]:
    """(mesh, program, seconds to build it) of `cfg` with capture on, over `devices` (default: all)."""
    cfg.probes.enabled = True
    devices = jax.devices() if devices is None else devices
    validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg, devices)
    start = time.perf_counter()
    program = build(cfg, mesh)  # traces the probed step (its statistics index comes from the trace)
    return mesh, program, time.perf_counter() - start


def memory_bytes(compiled: jax.stages.Compiled) -> tuple[int, int]:
    """(arguments + temporaries + outputs, temporaries) of XLA's memory plan, in bytes per device."""
    m = compiled.memory_analysis()
    temp = m.temp_size_in_bytes
    return m.argument_size_in_bytes + temp + m.output_size_in_bytes, temp


def timed_compile(jitted: jax.stages.Wrapped, *args) -> tuple[jax.stages.Compiled, float, float]:
    """(compiled, seconds to trace and lower, seconds to compile)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


def interleaved(steps: dict[str, Callable], state, batches: Iterator, rounds: int) -> tuple[dict, object]:
    """Median seconds of each step, run in turn (a, b, a, b, ...) `rounds` times after one warm-up
    round; every step takes the state and a batch and returns the new state first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            batch = next(batches)
            start = time.perf_counter()
            out = jax.block_until_ready(step(state, batch))
            if r:
                times[name].append(time.perf_counter() - start)
            state = out[0]
    return {name: float(np.median(t)) for name, t in times.items()}, state


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token: 3 x (2 x matmul weights + attention scores and mixing)."""
    mlp_mats = 3 if m.mlp == "swiglu" else 2
    weights = m.num_layers * (4 * m.d_model**2 + mlp_mats * m.d_model * m.d_ff)
    weights += m.d_model * m.vocab_size
    attention = m.num_layers * 2 * 2 * seq_len * m.d_model  # Q K^T and P V, full (unmasked) square
    return 3.0 * (2.0 * weights + attention)


def matmul_peak(size: int, dtype: jnp.dtype, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` size^3 matmuls."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda x: matmul(x, x, dtype))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best
