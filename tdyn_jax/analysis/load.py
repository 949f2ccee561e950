"""`load(workdir)`: the captured statistics of a run as a tidy table plus arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
from absl import logging

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


@dataclasses.dataclass(frozen=True)
class Captures:
    """Everything captured in a run: `table` has one row per step x site x scalar statistic
    (columns step, site, layer (-1 outside the layers), stat, value, sampled: True where the value is
    estimated on the sampled rows of the tensor, see `tdyn_jax.probes.spec.SAMPLED_PARTS`); `arrays`
    the other statistics (the array statistics of a /R or /lowprec site are sampled too)."""

    table: pd.DataFrame
    arrays: dict[str, ProbeArray]

    @property
    def steps(self) -> np.ndarray:
        """The capture steps, ascending."""
        return np.unique(self.table["step"].to_numpy())


def load(workdir: str | Path) -> Captures:
    """Reads every finished chunk of WORKDIR/probes; safe while the run is still writing (chunks in
    progress are not listed, nothing is cleaned up)."""
    root = probes_dir(workdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: the run has no captures (probes.enabled=False?)")
    chunks = []
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # read_only mode warns that it is read only
    try:
        options = ocp.CheckpointManagerOptions(read_only=True)
        manager = ocp.CheckpointManager(root, item_names=ITEMS, options=options)
    finally:
        logging.set_verbosity(verbosity)
    with manager:
        for step in manager.all_steps():
            args = ocp.args.Composite(captures=ocp.args.StandardRestore(), index=ocp.args.JsonRestore())
            restored = manager.restore(step, args=args)
            chunks.append((restored["captures"], decode_index(restored["index"])))
    steps = np.concatenate([np.asarray(c["steps"]) for c, _ in chunks]) if chunks else np.zeros(0, np.int64)
    order = np.argsort(steps, kind="stable")
    values: dict[str, list[np.ndarray]] = {}
    sites: dict[str, list[str]] = {}
    for captures, index in chunks:
        for stat, value in flatten(captures["stats"], sep="/").items():
            if sites.setdefault(stat, index[stat]) != index[stat]:
                raise ValueError(f"{root}: the sites of {stat!r} differ between chunks")
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
    return Captures(table[columns], arrays)
