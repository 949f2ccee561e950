"""WORKDIR/dumps: full tensors of chosen sites at chosen steps, as zarr arrays written by tensorstore.

Layout: WORKDIR/dumps/step_<step:08d>/<site>/<tensor>, tensor in A, W, C, E, R (matmul sites, grouped
as (g, n, k), (g, k, m) and (g, n, m)) or x (activation sites). Read one back with plain tensorstore:
`ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": PATH}}).result().read().result()`.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import tensorstore as ts


def dump_path(workdir: str | Path, step: int, site: str, tensor: str) -> Path:
    """Where tensor `tensor` of `site` at `step` is stored."""
    return Path(workdir).absolute() / "dumps" / f"step_{step:08d}" / site / tensor


def write_dumps(
    workdir: str | Path, step: int, dumped: dict[str, dict[str, np.ndarray]], patterns: tuple[str, ...]
) -> list[str]:
    """Writes the tensors of the sites matching `patterns` (full names, with the layer); returns the
    sites written. An existing dump of the same step is replaced (a resumed run writes it again)."""
    written = []
    for site, tensors in sorted(dumped.items()):
        if not any(fnmatch.fnmatchcase(site, p) for p in patterns):
            continue
        for name, value in tensors.items():
            value = np.asarray(value)
            path = str(dump_path(workdir, step, site, name))
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
            store = ts.open(
                spec, create=True, delete_existing=True, dtype=value.dtype.name, shape=value.shape
            ).result()
            store.write(value).result()
        written.append(site)
    return written
