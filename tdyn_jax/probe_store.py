"""WORKDIR/probes: captured statistics, one Orbax chunk per train-state checkpoint, never pruned.

Chunk N holds every capture taken since the previous checkpoint, up to (not including) step N. It is
written, and waited for, before train-state checkpoint N is started, so a finalized checkpoint N
always has its chunk on disk. On resume from checkpoint N, chunks after N are deleted (their steps
will be captured again), so every capture step up to N is on disk exactly once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

ITEMS = ("captures", "index")


def probes_dir(workdir: str | Path) -> Path:
    """WORKDIR/probes as an absolute path."""
    return Path(workdir).absolute() / "probes"


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}} (statistic names hold '/', Orbax keys should not); the inverse
    of `config.flatten(tree, sep="/")`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def encode_index(index: dict[str, list[str]]) -> dict[str, Any]:
    """{statistic: sites} as JSON with each distinct site list written once."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for stat, sites in index.items():
        groups.setdefault(tuple(sites), []).append(stat)
    return {"groups": [{"sites": list(sites), "stats": stats} for sites, stats in groups.items()]}


def decode_index(encoded: dict[str, Any]) -> dict[str, list[str]]:
    """The inverse of `encode_index`."""
    return {stat: group["sites"] for group in encoded["groups"] for stat in group["stats"]}


class ProbeStore:
    """Writer of WORKDIR/probes (process 0 writes; every process must call `save` and `discard_after`)."""

    def __init__(self, workdir: str | Path, index: dict[str, list[str]]):
        self.index = index
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=False, cleanup_tmp_directories=True, create=True
        )
        self.manager = ocp.CheckpointManager(probes_dir(workdir), item_names=ITEMS, options=options)

    def discard_after(self, step: int) -> None:
        """Deletes the chunks of checkpoints after `step` (left by a run that crashed before them)."""
        stale = [s for s in self.manager.all_steps() if s > step]
        if stale and jax.process_index() == 0:
            for s in stale:
                shutil.rmtree(self.manager.directory / str(s))
        multihost_utils.sync_global_devices("probe store: stale chunks deleted")  # before anyone reloads
        self.manager.reload()

    def save(self, step: int, captures: list[tuple[int, dict[str, np.ndarray]]]) -> None:
        """Writes the captures [(capture step, {statistic: (sites, ...)})] as chunk `step`, and waits."""
        stats = {stat: np.stack([np.asarray(c[stat]) for _, c in captures]) for stat in self.index}
        tree = {"steps": np.array([s for s, _ in captures], np.int64), "stats": nest(stats)}
        args = ocp.args.Composite(
            captures=ocp.args.StandardSave(tree), index=ocp.args.JsonSave(encode_index(self.index))
        )
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Releases the manager."""
        self.manager.close()
