"""tdyn_jax's plain train step against nanodo's on the same model, interleaved in one process.

    python benchmarks/vs_nanodo.py --nanodo=PATH [--config=configs/small.py] [--rounds=10]

PATH is a checkout of github.com/google-deepmind/nanodo, which is not a dependency: its model and
optimizer modules are imported from there (its data pipeline is not needed). Both models get the
config's width, depth, heads, d_ff, vocabulary, sequence and batch; tdyn_jax takes nanodo's
architecture (pre-LayerNorm, learned positions, GELU MLP, tied embeddings, no biases), and both train
with AdamW at the config's settings after global-norm clipping, and report the gradient, parameter
and update norms. For each compute dtype (float32, then bfloat16; parameters in float32) it prints
the median step time and tokens/s of both and their ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import flags
from bench import interleaved, random_batches
from flax.training.train_state import TrainState
from ml_collections import config_flags

from tdyn_jax import cli, sharding
from tdyn_jax.config import ConfigError, validate
from tdyn_jax.train import build

config_flags.DEFINE_config_file("config", "configs/small.py", "Config file.")
flags.DEFINE_string("nanodo", None, "Path of a nanodo checkout (the directory that holds nanodo/).")
flags.DEFINE_integer(
    "rounds", 10, "Timed rounds of (tdyn_jax, nanodo) after one warm-up round.", lower_bound=1
)
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to compare, one after the other.")


def nanodo_modules(path: str | None):
    """(nanodo.model, nanodo.optimizer) imported from the checkout at `path`."""
    if not path or not (Path(path) / "nanodo" / "model.py").is_file():
        raise ConfigError(
            f"--nanodo={path!r} holds no nanodo/model.py: pass a checkout of "
            "github.com/google-deepmind/nanodo (git clone it anywhere)"
        )
    sys.path.insert(0, str(Path(path).resolve()))
    from nanodo import model, optimizer

    return model, optimizer


def matched(cfg: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
    """`cfg` with nanodo's architecture and the given compute dtype, capture off."""
    cfg = cfg.copy_and_resolve_references()
    m = cfg.model
    m.norm, m.norm_placement, m.positions, m.mlp = "layernorm", "pre", "learned", "gelu"
    m.tie_embeddings, m.use_bias, m.qk_norm = True, False, False
    m.compute_dtype, m.param_dtype = dtype, "float32"
    cfg.probes.enabled = False
    return cfg


def nanodo_step(model, optimizer, cfg: ml_collections.ConfigDict):
    """(initial state, jitted step (state, batch) -> (state, metrics)) of nanodo's model."""
    m, o = cfg.model, cfg.optim
    docfg = model.DoConfig(
        D=m.d_model, H=m.num_heads, L=cfg.data.seq_len, N=m.num_layers, V=m.vocab_size, F=m.d_ff,
        dtype=jnp.dtype(m.compute_dtype), fsdp_enabled=False,
    )  # fmt: skip
    opt = ml_collections.ConfigDict(
        dict(
            num_train_steps=cfg.train.num_steps, peak_learning_rate=o.lr, init_learning_rate=o.lr * 0.1,
            final_learning_rate=o.lr * o.min_lr_ratio, warmup_steps=o.warmup_steps, decay_type="cosine",
            weight_decay=o.weight_decay, clip_by_global_norm=o.grad_clip or None, optimizer="adamw",
            b1=o.b1, b2=o.b2, eps=o.eps,
        )
    )  # fmt: skip
    net = model.TransformerDo(docfg)
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = net.init(jax.random.key(cfg.seed), tokens)["params"]
    state = TrainState.create(apply_fn=net.apply, params=params, tx=optimizer.get_optimizer(opt))

    def loss_fn(params, batch: dict) -> jax.Array:
        logits = state.apply_fn({"params": params}, batch["inputs"])
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    def step(state: TrainState, batch: dict):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        norms = {k: optax.tree.norm(t) for k, t in (("grad", grads), ("param", params), ("update", updates))}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss, **norms}

    return state, jax.jit(step, donate_argnums=0)


def own_state(step, state):
    """`step` as `interleaved` calls it, (state, batch) -> (new state,), but on a state of its own."""
    held = [state]

    def one(_shared, batch: dict) -> tuple:
        held[0] = step(held[0], batch)[0]
        return (held[0],)

    return one


def main(_: list[str]) -> None:
    model, optimizer = nanodo_modules(flags.FLAGS.nanodo)
    base = flags.FLAGS.config
    tokens = base.data.batch_size * base.data.seq_len
    print(f"config {base.name}: d {base.model.d_model}, {base.model.num_layers} layers, vocabulary ", end="")
    print(f"{base.model.vocab_size}, {base.data.batch_size} x {base.data.seq_len} tokens, {jax.devices()[0]}")
    for dtype in flags.FLAGS.dtypes:
        cfg = matched(base, dtype)
        validate(cfg, jax.device_count())
        mesh = sharding.make_mesh(cfg)
        program = build(cfg, mesh)
        ours, theirs = program.init(), nanodo_step(model, optimizer, cfg)
        batches = random_batches(cfg, mesh)
        steps = {"tdyn_jax": own_state(program.train_step, ours), "nanodo": own_state(theirs[1], theirs[0])}
        medians, _ = interleaved(steps, None, batches, flags.FLAGS.rounds)
        t_ours, t_theirs = medians["tdyn_jax"], medians["nanodo"]
        print(
            f"{dtype:9s} tdyn_jax {t_ours * 1e3:8.1f} ms {tokens / t_ours:10,.0f} tok/s | nanodo "
            f"{t_theirs * 1e3:8.1f} ms {tokens / t_theirs:10,.0f} tok/s | tdyn_jax / nanodo "
            f"{t_theirs / t_ours:.2f}x tokens/s"
        )


if __name__ == "__main__":
    cli.run(main)
