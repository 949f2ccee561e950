"""What the benchmark scripts share: random batches over the config's vocabulary, XLA's memory plan,
and interleaved timing of several steps (medians: these machines vary by 15-25% from run to run)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from tdyn_jax import data as data_lib
from tdyn_jax import sharding


def random_batches(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
    """Global batches of uniformly random tokens over the whole vocabulary (no corpus to load)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, 64 * cfg.data.seq_len * cfg.data.batch_size)
    batches = data_lib.Batches(tokens.astype(np.uint32), cfg.data.seq_len, cfg.data.batch_size, 0)
    while True:
        yield sharding.global_batch(next(batches), mesh)


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
