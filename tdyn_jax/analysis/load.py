"""`load(workdir)`: the captured statistics of a run as a tidy table plus arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
from absl import logging

from tdyn_jax.checkpoint import unreadable_reason
from tdyn_jax.config import flatten
from tdyn_jax.probe_store import ITEMS, decode_index, probes_dir
from tdyn_jax.probes.naming import layer_of
from tdyn_jax.probes.spec import is_sampled


@dataclasses.dataclass(frozen=True)
class ProbeArray:
    """One array statistic (histogram, edges, sample, top-k) over capture steps and sites."""

    steps: np.ndarray  # (k,) capture steps
    sites: list[str]  # (n,) site names
    values: np.ndarray  # (k, n, ...) float32

    def site(self, name: str) -> np.ndarray:
        """values[:, i] of site `name`: (k, ...)."""
        return self.values[:, self.sites.index(name)]


class CapturesError(Exception):
    """The captures of a run cannot be read (no probes directory, or a chunk with strict=True)."""


@dataclasses.dataclass(frozen=True)
class Captures:
    """Everything captured in a run: `table` has one row per step x site x scalar statistic
    (columns step, site, layer (-1 outside the layers), stat, value, sampled: True where the value is
    estimated on the sampled rows of the tensor, see `tdyn_jax.probes.spec.SAMPLED_PARTS`); `arrays`
    the other statistics (the array statistics of a /R or /lowprec site are sampled too)."""

    table: pd.DataFrame
    arrays: dict[str, ProbeArray]
    missing: tuple[tuple[int, int], ...] = ()  # (first, last) step of each unreadable chunk's captures

    @property
    def steps(self) -> np.ndarray:
        """The capture steps, ascending."""
        return np.unique(self.table["step"].to_numpy())


def load(workdir: str | Path, strict: bool = False, quiet: bool = False) -> Captures:
    """Reads every finished chunk of WORKDIR/probes; safe while the run is still writing (chunks in
    progress are not listed, nothing is cleaned up). A chunk that does not read is skipped with one
    warning naming it and the steps whose captures it held (`Captures.missing`; none with `quiet`),
    or raises CapturesError with `strict`."""
    root = probes_dir(workdir)
    if not root.is_dir():
        raise CapturesError(f"{root} does not exist: the run has no captures (probes.enabled=False?)")
    chunks, missing, warnings = [], [], []
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # read_only mode warns that it is read only
    try:
        options = ocp.CheckpointManagerOptions(read_only=True)
        manager = ocp.CheckpointManager(root, item_names=ITEMS, options=options)
        with manager:
            previous = 0
            for step in sorted(manager.all_steps()):
                try:
                    chunks.append(_read_chunk(manager, step))
                except Exception as e:  # whatever a damaged file raises: Orbax, TensorStore, JSON
                    reason = unreadable_reason(e)
                    chunk, held = root / str(step), f"the captures of steps {previous} to {step - 1}"
                    if strict:
                        raise CapturesError(f"{chunk} does not read ({reason}); it held {held}") from e
                    warnings.append(f"skipping {chunk} ({reason}): it held {held}")
                    missing.append((previous, step - 1))
                previous = step
    finally:
        logging.set_verbosity(verbosity)
    for line in [] if quiet else warnings:
        logging.warning("%s", line)
    steps = np.concatenate([np.asarray(c["steps"]) for c, _ in chunks]) if chunks else np.zeros(0, np.int64)
    order = np.argsort(steps, kind="stable")
    values: dict[str, list[np.ndarray]] = {}
    sites: dict[str, list[str]] = {}
    for captures, index in chunks:
        for stat, value in flatten(captures["stats"], sep="/").items():
            if sites.setdefault(stat, index[stat]) != index[stat]:
                raise CapturesError(f"{root}: the sites of {stat!r} differ between chunks")
            values.setdefault(stat, []).append(np.asarray(value))
    frames, arrays = [], {}
    for stat, parts in sorted(values.items()):
        stacked = np.concatenate(parts)[order]
        if stacked.ndim > 2:
            arrays[stat] = ProbeArray(steps[order], sites[stat], stacked)
            continue
        k, n = stacked.shape
        frames.append(
            pd.DataFrame(
                {
                    "step": np.repeat(steps[order], n),
                    "site": np.tile(np.array(sites[stat], dtype=object), k),
                    "layer": np.tile([layer_of(s) for s in sites[stat]], k),
                    "stat": stat,
                    "value": stacked.reshape(-1),
                    "sampled": np.tile([is_sampled(s, stat) for s in sites[stat]], k),
                }
            )
        )
    columns = ["step", "site", "layer", "stat", "value", "sampled"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return Captures(table[columns], arrays, tuple(missing))


def _read_chunk(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict[str, list[str]]]:
    """(captures, index) of chunk `step`, checked for shape: one row per capture step and site."""
    args = ocp.args.Composite(captures=ocp.args.StandardRestore(), index=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    captures, index = restored["captures"], decode_index(restored["index"])
    count = len(np.asarray(captures["steps"]))
    for stat, value in flatten(captures["stats"], sep="/").items():
        if stat not in index or np.shape(value)[:2] != (count, len(index[stat])):
            raise ValueError(f"statistic {stat!r} does not match the chunk's index")
    return captures, index
