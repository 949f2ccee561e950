"""WORKDIR/dumps: full tensors of chosen sites at chosen steps, as zarr arrays written by tensorstore.

Layout: WORKDIR/dumps/step_<step:08d>/<site>/<tensor>, tensor in A, W, C, E, R (matmul sites, grouped
as (g, n, k), (g, k, m) and (g, n, m)) or x (activation sites). Read one back with `read_dump`, or
with plain tensorstore: `ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": PATH}})`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils


def dump_path(workdir: str | Path, step: int, site: str, tensor: str) -> Path:
    """Where tensor `tensor` of `site` at `step` is stored."""
    return Path(workdir).absolute() / "dumps" / f"step_{step:08d}" / site / tensor


def _spec(path: Path) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def read_dump(workdir: str | Path, step: int, site: str, tensor: str) -> np.ndarray:
    """Tensor `tensor` of `site` dumped at `step`, as a numpy array."""
    return ts.open(_spec(dump_path(workdir, step, site, tensor))).result().read().result()


def write_dumps(workdir: str | Path, step: int, dumped: dict[str, dict[str, jax.Array]]) -> list[str]:
    """Writes the tensors {site: {tensor: array}} of `step`; returns the sites written. Every process
    calls it: process 0 creates the arrays (replacing a dump of the same step, which a resumed run
    writes again), then each process writes the shards it holds, so no tensor is gathered."""
    arrays = {
        dump_path(workdir, step, site, name): value
        for site, tensors in dumped.items()
        for name, value in tensors.items()
    }
    if jax.process_index() == 0:
        for path, value in arrays.items():
            dtype, shape = np.dtype(value.dtype).name, value.shape
            ts.open(_spec(path), create=True, delete_existing=True, dtype=dtype, shape=shape).result()
    multihost_utils.sync_global_devices(f"dumps of step {step} created")
    for path, value in arrays.items():
        store = ts.open(_spec(path)).result()
        for shard in value.addressable_shards:
            if shard.replica_id == 0:
                store[shard.index].write(np.asarray(shard.data)).result()
    multihost_utils.sync_global_devices(f"dumps of step {step} written")
    return sorted(dumped)
