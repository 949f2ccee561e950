"""Train state, the jitted train and eval steps, and the training loop with checkpoint/resume."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from tdyn_jax import data as data_lib
from tdyn_jax import sharding
from tdyn_jax.checkpoint import CheckpointError, Checkpoints, check_resume, unreadable_reason, write_config
from tdyn_jax.config import ConfigError, to_dict, validate
from tdyn_jax.dumps import write_dumps
from tdyn_jax.guard import NonFiniteGuard, NonFiniteStop
from tdyn_jax.metrics import MetricsWriter
from tdyn_jax.model import Transformer
from tdyn_jax.optim import optimizer, schedule
from tdyn_jax.probe_board import ProbeBoard
from tdyn_jax.probe_store import ProbeStore
from tdyn_jax.probes import capture
from tdyn_jax.probes.naming import layer_free
from tdyn_jax.probes.spec import ProbeSpec
from tdyn_jax.probes.stats import seed_of


@flax.struct.dataclass
class TrainState:
    """Everything that changes from step to step on the devices."""

    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy plus z_loss * mean(log Z^2); returns (loss, parts)."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.mean(log_z - target_logit)
    zl = jnp.mean(log_z**2)
    return ce + z_loss * zl, {"ce": ce, "log_z_sq": zl}


def init_state(model: Transformer, tx: optax.GradientTransformation, seed: int, seq_len: int):
    """A function of no arguments that builds the initial train state (for jit / eval_shape)."""

    def init() -> TrainState:
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(jax.random.key(seed), tokens)["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    return init


def make_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    cfg: ml_collections.ConfigDict,
    probe: ProbeSpec | None = None,
) -> Callable:
    """One optimizer step: (state, batch) -> (new state, scalar metrics).

    With a `probe` spec it is the probed step, (state, batch) -> (new state, metrics, {site:
    statistics}, {site: dumped tensors}), computing the same new state bit for bit.
    """
    lr_fn = schedule(cfg.optim, cfg.train.num_steps)
    probed = model.clone(probe=probe)

    def loss_fn(params: Any, batch: dict, taps: Any = None, key: jax.Array | None = None):
        if probe is None:
            logits = model.apply({"params": params}, batch["inputs"])
            return cross_entropy(logits, batch["targets"], cfg.optim.z_loss)
        logits, sown = probed.apply(
            {"params": params, "grad_taps": taps}, batch["inputs"], rngs={"probe": key},
            mutable=["intermediates", "dumps"],
        )  # fmt: skip
        loss, parts = cross_entropy(logits, batch["targets"], cfg.optim.z_loss)
        return loss, (parts, sown)

    def step(state: TrainState, batch: dict):
        if probe is None:
            (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        else:
            key = jax.random.fold_in(jax.random.key(cfg.seed + 1), state.step)
            taps = zero_grad_taps(probed, state.params, batch, key)
            (loss, (parts, sown)), (grads, tap_grads) = jax.value_and_grad(
                lambda p, t: loss_fn(p, batch, t, key), argnums=(0, 1), has_aux=True
            )(state.params, taps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        extra = {}
        if cfg.train.nonfinite == "skip":  # a non-finite step leaves parameters and optimizer state
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            extra["skipped"] = jnp.where(finite, 0.0, 1.0)
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            "lr": lr_fn(state.step),
            **extra,
        }
        new_state = TrainState(state.step + 1, params, opt_state)
        if probe is None:
            return new_state, metrics
        captured = capture.merged(capture.sites(sown.get("intermediates", {})), capture.sites(tap_grads))
        if probe.params:
            trees = {"params": state.params, "grads": grads, "updates": updates}
            nu = second_moment(opt_state)
            trees |= {} if nu is None else {"nu": nu}
            captured |= capture.tree_stats(probe, trees, seed_of(jax.random.fold_in(key, 1)))
        return new_state, metrics, captured, capture.sites(sown.get("dumps", {}))

    return step


def zero_grad_taps(probed: Transformer, params: Any, batch: dict, key: jax.Array) -> Any:
    """Zeros shaped like the model's grad_taps collection (the statistics of each tapped gradient),
    learnt from a forward pass that computes no statistics."""
    shapes = jax.eval_shape(
        lambda: probed.clone(probe=probed.probe.taps()).apply(
            {"params": params}, batch["inputs"], rngs={"probe": key},
            mutable=["grad_taps", "intermediates", "dumps"],
        )[1].get("grad_taps", {})
    )  # fmt: skip
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def second_moment(opt_state: Any) -> Any | None:
    """The optimizer's second-moment estimate `nu` (Adam, AdamW), or None (SGD, Lion, Adafactor)."""
    found = optax.tree.get_all_with_path(opt_state, "nu")
    return found[0][1] if found else None


def is_capture_step(probes: ml_collections.ConfigDict, step: int) -> bool:
    """Whether step `step` (0-based, the step being taken) runs the probed step."""
    return step % probes.every == 0 or step in probes.at_steps or step in probes.dump_steps


def make_eval_step(model: Transformer) -> Callable[[Any, dict], jax.Array]:
    """Mean cross-entropy of a batch under `params`."""

    def step(params: Any, batch: dict) -> jax.Array:
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"], 0.0)[1]["ce"]

    return step


def summarize(
    metrics: list[dict], elapsed: float, timed_steps: int, tokens_per_step: int
) -> dict[str, float]:
    """One log row: the last step's metrics, the interval's mean loss (over its finite losses; nan if
    none), step time and tokens/s; with train.nonfinite=skip, `skipped` counts the interval's skipped
    steps."""
    row = {k: float(v) for k, v in metrics[-1].items()}
    losses = np.array([np.nan if m["loss"] is None else m["loss"] for m in metrics], np.float64)
    finite = losses[np.isfinite(losses)]
    row["loss_avg"] = float(finite.mean()) if finite.size else float("nan")
    if "skipped" in row:
        row["skipped"] = float(sum(m["skipped"] for m in metrics))
    if timed_steps:
        row["step_time_s"] = elapsed / timed_steps
        row["tokens_per_s"] = tokens_per_step * timed_steps / elapsed
    return row


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (single-process runs)."""

    def __init__(self):
        self.signal: int | None = None
        self.warned = False
        self._previous = {}
        if jax.process_count() == 1:  # multi-host: the Orbax preemption sync point handles SIGTERM
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
        elif not self.warned:  # a second signal: say what the run is waiting for
            self.warned = True
            print("stopping: saving the checkpoint first (once more to quit without it)", file=sys.stderr)
        else:  # a third: quit now (raising could be swallowed); the previous checkpoint stays intact
            print(
                "quit without the final checkpoint; the previous one is intact", file=sys.stderr, flush=True
            )
            os._exit(130)

    def restore(self) -> None:
        """Reinstalls the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass(frozen=True)
class Program:
    """The compiled pieces of a run on a mesh: model, optimizer, initial state, train step, eval step,
    shardings."""

    model: Transformer
    tx: optax.GradientTransformation
    init: Callable[[], TrainState]  # jitted, returns the sharded initial state
    abstract_state: Any  # ShapeDtypeStructs carrying the state shardings (restore target)
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted, donates the state
    eval_step: Callable[[Any, dict], jax.Array]  # jitted mean cross-entropy
    probe_step: Any = None  # jitted probed step: + ({statistic: (sites, ...)}, {})
    dump_step: Any = None  # the jitted probed step that also returns the tensors to dump
    probe_index: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # statistic -> sites


def batch_shapes(cfg: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes (with their sharding) of a global batch, to trace or compile a step without data."""
    tokens = jax.ShapeDtypeStruct(
        (cfg.data.batch_size, cfg.data.seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh)
    )
    return {"inputs": tokens, "targets": tokens}


def build(cfg: ml_collections.ConfigDict, mesh: Mesh, probes: bool = True) -> Program:
    """Model, optimizer and jitted steps for `cfg`, laid out on `mesh`; with `probes` and
    cfg.probes.enabled, the probed steps too (see `with_probes`)."""
    model = Transformer(cfg.model)
    tx = optimizer(cfg.optim, cfg.train.num_steps)
    init = init_state(model, tx, cfg.seed, cfg.data.seq_len)
    shapes = jax.eval_shape(init)
    state_sharding = sharding.state_shardings(shapes, mesh, cfg.mesh.fsdp_min_size)
    batch_sharding = sharding.batch_sharding(mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sharding
    )
    train_step = jax.jit(
        make_train_step(model, tx, cfg),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(model), in_shardings=(state_sharding.params, batch_sharding))
    program = Program(model, tx, jax.jit(init, out_shardings=state_sharding), abstract, train_step, eval_step)
    return with_probes(program, cfg, mesh) if probes and cfg.probes.enabled else program


def with_probes(program: Program, cfg: ml_collections.ConfigDict, mesh: Mesh, dumps: bool = True) -> Program:
    """`program` with the jitted probed step and its statistics index, and with `dumps` and
    cfg.probes.dump_steps, the probed step that also dumps tensors. Tracing them takes seconds: a
    run builds them only when it has capture steps left.

    Raises ConfigError when a probes.sites or probes.dump_sites pattern matches no site of the model.
    """
    state_sharding = jax.tree.map(lambda a: a.sharding, program.abstract_state)
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = ProbeSpec.from_config(cfg.probes).for_platform(mesh.devices.flat[0].platform)
    dumping = dumps and bool(cfg.probes.dump_steps)
    if dumping:
        spec = spec.with_dumps(tuple(cfg.probes.dump_sites))
    step = jax.jit(make_train_step(program.model, program.tx, cfg, spec))
    _, _, blocks, dumped = step.eval_shape(program.abstract_state, batch_shapes(cfg, mesh))  # traced once

    def packed(with_dumps: bool) -> Any:
        """The jitted step (reusing the trace above) that packs the statistics and returns the dumped
        tensors, or none: XLA then leaves out what only the dumps need."""

        def run(state: TrainState, b: dict) -> tuple:
            new_state, metrics, blocks, dumped = step(state, b)
            dumped = capture.dumped_sites(dumped, spec.dump_sites) if with_dumps else {}
            return new_state, metrics, capture.pack(blocks), dumped

        return jax.jit(
            run,
            in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
            out_shardings=(state_sharding, None, replicated, None),  # dumps stay as they are sharded
            donate_argnums=0,
        )

    index = capture.pack_index(blocks)
    captured = {layer_free(site) for sites in index.values() for site in sites}
    _check_patterns("probes.sites", cfg.probes.sites, captured, prefixes=True)
    dump_step = None
    if dumping:
        _check_patterns(
            "probes.dump_sites", cfg.probes.dump_sites, capture.dump_names(dumped), prefixes=False
        )
        dump_step = packed(True)
    return dataclasses.replace(program, probe_step=packed(False), dump_step=dump_step, probe_index=index)


def probes_left(program: Program, cfg: ml_collections.ConfigDict, mesh: Mesh, start: int) -> Program:
    """`program` with the probed steps that a run at step `start` still needs: none without a capture
    step left, the dump step only with a dump step left."""
    left = range(start, cfg.train.num_steps)
    if not cfg.probes.enabled or not any(is_capture_step(cfg.probes, s) for s in left):
        return program
    return with_probes(program, cfg, mesh, dumps=any(s in left for s in cfg.probes.dump_steps))


def _check_patterns(field: str, patterns: tuple[str, ...], sites: set[str], prefixes: bool) -> None:
    """ConfigError for the first pattern that matches none of `sites` (or of their prefixes)."""
    names = sites
    if prefixes:
        names = {"/".join(s.split("/")[:i]) for s in sites for i in range(1, s.count("/") + 2)}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            examples = ", ".join(sorted(names)[:6])
            raise ConfigError(
                f"{field} pattern {pattern!r} matches no site of this model; sites look like {examples}"
            )


class Interval:
    """The steps since the last log line: their metrics (fetched from the devices when asked), their
    count and time; the first step after a (re)start is timed apart, as compile time. `carried`: the
    losses (and skipped flags) of this interval's steps taken before a restart, from the checkpoint."""

    def __init__(self, start: int, tokens_per_step: int, carried: list[dict] | None = None):
        self.start, self.tokens_per_step = start, tokens_per_step
        self.pending: list[tuple[int, dict]] = []  # (step, metrics on the devices)
        self.fetched: list[dict] = list(carried or [])
        self.compile_s: dict[str, float] = {}  # reported once, on the first logged line
        self.began, self.steps = time.perf_counter(), 0

    def add(self, done: int, metrics: dict) -> None:
        """Records the metrics of the step that brought the run to step `done`."""
        self.pending.append((done, metrics))
        self.steps += 1
        if done == self.start + 1:  # exclude compilation from the throughput figures
            jax.block_until_ready(metrics)
            self.compile_s["compile_s"] = time.perf_counter() - self.began
            self.began, self.steps = time.perf_counter(), 0

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """The steps recorded since the last fetch, with their metrics as floats (waits for them)."""
        rows = [(done, {k: float(v) for k, v in m.items()}) for done, m in jax.device_get(self.pending)]
        self.pending = []
        self.fetched += [m for _, m in rows]
        return rows

    def carry(self) -> list[dict]:
        """What `summarize` needs of this interval's earlier steps, as JSON (kept with a checkpoint)."""
        self.fetch()
        finite = lambda v: v is not None and math.isfinite(v)  # carried values may be null already
        keys = ("loss", "skipped")
        return [{k: m[k] if finite(m[k]) else None for k in keys if k in m} for m in self.fetched]

    def close(self) -> dict[str, float]:
        """The log row of the interval (waits for its steps, which run asynchronously); starts anew."""
        self.fetch()
        row = summarize(self.fetched, time.perf_counter() - self.began, self.steps, self.tokens_per_step)
        row.update(self.compile_s)
        self.fetched, self.compile_s = [], {}
        self.began, self.steps = time.perf_counter(), 0
        return row


def restore_or_init(
    program: Program, ckpt: Checkpoints, batches: data_lib.Batches, workdir: Path
) -> tuple[TrainState, list[dict]]:
    """(state, open log interval) of the newest checkpoint that restores (the data iterator moved to
    its position), or (initial state, []). Newer checkpoints that do not restore are moved aside to
    checkpoints/<step>.corrupt, one warning each; CheckpointError when none restores (nothing moved)."""
    steps = ckpt.all_steps()
    if not steps:
        return program.init(), []
    failed: list[tuple[int, str]] = []
    for step in steps:
        try:
            state, data_state, log = ckpt.restore(step, program.abstract_state)
            batches.restore(data_state)
            break
        except Exception as e:  # whatever a damaged file raises: Orbax, TensorStore, JSON, shapes
            failed.append((step, unreadable_reason(e)))
    else:
        raise CheckpointError(
            f"no checkpoint in {ckpt.directory} restores (newest, {steps[0]}: {failed[0][1]}); "
            "move the directory aside to start the run over"
        )
    for bad, reason in failed:
        target = ckpt.move_aside(bad)
        logging.warning("checkpoint %d does not restore (%s): moved aside to %s", bad, reason, target)
    logging.info("resumed %s from step %d", workdir, step)
    return state, log.get("interval", [])


def take_step(
    program: Program, cfg: ml_collections.ConfigDict, workdir: Path, step: int, state: TrainState, batch: dict
):
    """Step `step` (the state's, passed in so that the host never waits for the devices here): the
    probed step on capture steps (writing dumps on dump steps), else the plain one. Returns (new
    state, metrics, {statistic: (sites, ...)} or None)."""
    if not (program.probe_step and is_capture_step(cfg.probes, step)):
        return *program.train_step(state, batch), None
    dump = step in cfg.probes.dump_steps
    state, metrics, captured, dumped = (program.dump_step if dump else program.probe_step)(state, batch)
    if dump:  # every process writes its own shards
        write_dumps(workdir, step, dumped)
    return state, metrics, captured


class Captures:
    """The captures taken since the last checkpoint, still on the devices, and where they are saved:
    the probe store, one chunk per checkpoint, and TensorBoard when `board` is set."""

    def __init__(self, store: ProbeStore):
        self.store, self.board = store, None
        self.taken: list[tuple[int, Any]] = []

    @classmethod
    def open(cls, cfg: ml_collections.ConfigDict, workdir: Path, program: Program, start: int) -> Captures:
        """The captures of a run (re)starting at step `start`: chunks after it, left by a crash, are
        deleted; TensorBoard is written when the run has a probed step and train.tensorboard is set."""
        captures = cls(ProbeStore(workdir, program.probe_index))
        captures.store.discard_after(start)
        if program.probe_step and cfg.train.tensorboard and jax.process_index() == 0:
            exp_range = (cfg.probes.exp_min, cfg.probes.exp_max)
            captures.board = ProbeBoard(workdir, program.probe_index, exp_range, start)
        return captures

    def add(self, step: int, captured: Any) -> None:
        self.taken.append((step, captured))

    def save(self, chunk: int, before: int | None = None) -> None:
        """Writes the captures (those of steps before `before`) as chunk `chunk`; starts anew."""
        kept = [(s, c) for s, c in self.taken if before is None or s < before]
        self.taken = []
        if kept:
            fetched = jax.device_get(kept)
            self.store.save(chunk, fetched)
            if self.board:
                self.board.write(fetched)

    def close(self) -> None:
        self.store.close()
        if self.board:
            self.board.close()


def nonfinite_stop(cfg: ml_collections.ConfigDict, ckpt: Checkpoints, bad: int, reason: str) -> NonFiniteStop:
    """The exception that ends a run at its first non-finite step `bad`, saying how to go on."""
    latest = ckpt.latest_step()
    resume = (
        f"rerun with --config.train.nonfinite=skip to resume from checkpoint {latest} "
        f"({ckpt.directory / str(latest)}) and step over it"
        if latest is not None
        else "no checkpoint was saved: rerun with --config.train.nonfinite=skip to step over it"
    )
    return NonFiniteStop(
        f"{reason} at step {bad} (train.nonfinite={cfg.train.nonfinite}): the captures up to it are "
        f"saved, no state after step {latest or 0}; {resume}, or start a new run with a lower optim.lr",
        bad,
    )


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics with their step (only
    the step when nothing was trained).

    Raises NonFiniteStop when train.nonfinite stops the run, ConfigError, DataError or CheckpointError
    for a user mistake (before anything is written)."""
    workdir = Path(workdir)
    sharding.maybe_initialize_distributed(cfg.mesh)
    validate(cfg, jax.device_count())
    config = to_dict(cfg)
    check_resume(workdir, config)
    train_tokens, val_tokens = data_lib.load_splits(cfg.data, cfg.model.vocab_size)
    seq, batch_size = cfg.data.seq_len, cfg.data.batch_size
    process = (jax.process_index(), jax.process_count())
    batches = data_lib.Batches(train_tokens, seq, batch_size, cfg.seed, *process, "train")
    val = data_lib.Batches(val_tokens, seq, batch_size, cfg.seed + 1, *process, "validation")
    if cfg.train.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(data_lib.cache_dir() / "xla"))
    mesh = sharding.make_mesh(cfg)
    program = build(cfg, mesh, probes=False)
    new_run = not (workdir / "checkpoints").exists()
    if new_run:  # its probe patterns are checked before anything is written
        program = probes_left(program, cfg, mesh, 0)
    ckpt = Checkpoints(workdir, cfg.checkpoint)
    try:
        state, carried = restore_or_init(program, ckpt, batches, workdir)
        start = int(state.step)
        if not new_run:
            program = probes_left(program, cfg, mesh, start)
    except (CheckpointError, ConfigError):
        ckpt.close()
        raise
    write_config(workdir, config)
    captures = Captures.open(cfg, workdir, program, start) if cfg.probes.enabled else None
    val_batches = [sharding.global_batch(val.batch(i), mesh) for i in range(cfg.train.eval_batches)]

    def evaluate(params: Any) -> dict[str, float]:
        loss = float(np.mean(jax.device_get([program.eval_step(params, b) for b in val_batches])))
        return {"val_loss": loss, "val_ppl": float(np.exp(loss))}

    def stop_at(bad: int, reason: str, done: int) -> NonFiniteStop:
        """Writes the log row and the captures before step `bad`; the exception that ends the run."""
        writer.write(done, interval.close())
        if captures is not None:
            captures.save(bad, before=bad)
        return nonfinite_stop(cfg, ckpt, bad, reason)

    show_bar = cfg.train.progress_bar and sys.stderr.isatty() and jax.process_index() == 0
    bar = tqdm(total=cfg.train.num_steps, initial=start, disable=not show_bar, dynamic_ncols=True)
    echo = (lambda line: bar.write(line, file=sys.stderr)) if show_bar else logging.info
    writer = MetricsWriter(workdir, start, cfg.train.tensorboard, echo)
    stop = StopRequest()
    if start >= cfg.train.num_steps:
        logging.info("%s is already at step %d of %d: nothing to train", workdir, start, cfg.train.num_steps)
    interval, last = Interval(start, batch_size * seq, carried), {"step": start}
    guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_skipped)
    try:
        for step in range(start, cfg.train.num_steps):
            batch = sharding.global_batch(next(batches), mesh)
            state, metrics, captured = take_step(program, cfg, workdir, step, state, batch)
            if captured is not None:
                captures.add(step, captured)
            done = step + 1
            interval.add(done, metrics)
            bar.update(1)
            stopping = stop.signal is not None or ckpt.reached_preemption(done)
            final = done == cfg.train.num_steps
            evaluate_now = done % cfg.train.eval_every == 0 or final
            log_now = done % cfg.train.log_every == 0 or evaluate_now  # a stop writes no row
            save_now = done % cfg.checkpoint.every == 0 or final or stopping
            if log_now or save_now:
                halt = guard.check(interval.fetch())
                if halt:
                    raise stop_at(*halt, done)
            if log_now:
                row = interval.close() | (evaluate(state.params) if evaluate_now else {})
                writer.write(done, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
                last.update(row, step=done)
            if save_now:
                if captures is not None:  # the chunk is on disk before the checkpoint that covers it starts
                    captures.save(done)
                ckpt.save(done, state, batches.state, config, {"interval": interval.carry()})
            if stopping:
                logging.warning("stop requested at step %d: checkpoint saved, exiting", done)
                last["step"] = done
                break
    finally:
        bar.close()
        stop.restore()
        ckpt.close()
        writer.close()
        if captures is not None:
            captures.close()
    return last
