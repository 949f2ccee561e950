"""Prints text sampled from the newest checkpoint of a byte-level run.

python experiments/sample.py --workdir=runs/small [--prompt="ROMEO."] [--temperature=0.8]
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from tdyn_jax import cli, sharding
from tdyn_jax import data as data_lib
from tdyn_jax.checkpoint import Checkpoints
from tdyn_jax.train import build

flags.DEFINE_string("workdir", "runs/small", "Run directory holding config.json and checkpoints/.")
flags.DEFINE_string("prompt", "\n", "Text the sample continues.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def sample(apply_fn, params, prompt: np.ndarray, length: int, temperature: float, seed: int) -> np.ndarray:
    """Extends `prompt` to `length` tokens, recomputing the full window at each position."""
    buf = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))

    @jax.jit
    def next_token(buf: jax.Array, t: jax.Array, key: jax.Array) -> jax.Array:
        logits = apply_fn({"params": params}, buf)[0, t - 1]
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    key = jax.random.key(seed)
    for t in range(len(prompt), length):
        key, sub = jax.random.split(key)
        buf = buf.at[0, t].set(next_token(buf, jnp.int32(t), sub))
    return np.asarray(buf[0])


def main(_: list[str]) -> None:
    workdir = cli.run_directory(flags.FLAGS.workdir)
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    cfg.probes.enabled = False  # sampling needs only the model
    mesh = sharding.make_mesh(cfg, jax.devices()[:1])
    program = build(cfg, mesh)
    ckpt = Checkpoints(workdir, cfg.checkpoint, writer=False)  # the run may be training
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        cli.fail(f"{workdir} has no checkpoint yet: train first")
    state, _, _ = ckpt.restore(step, program.abstract_state)
    ckpt.close()
    prompt = data_lib.encode([flags.FLAGS.prompt.encode()])
    out = sample(
        program.model.apply, state.params, prompt, cfg.data.seq_len, flags.FLAGS.temperature, flags.FLAGS.seed
    )
    print(f"--- step {step}, temperature {flags.FLAGS.temperature} ---")
    print(data_lib.decode(out[1:]))


if __name__ == "__main__":
    cli.run(main)
