"""Selections of captured statistics that the figures, animations and findings share.

A *kind* is a site name without its layer (`resid/out` for `layer_03/resid/out`); its sites are that
kind in every layer, in layer order.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import pandas as pd

from tdyn_jax.analysis.load import Captures, ProbeArray
from tdyn_jax.probes.naming import layer_free, layer_of


def _sites_with(captures: Captures, stat: str) -> list[str]:
    """The sites that have statistic `stat` (an array statistic or a scalar one)."""
    if stat in captures.arrays:
        return list(captures.arrays[stat].sites)
    return list(captures.table.loc[captures.table.stat == stat, "site"].unique())


def kinds(captures: Captures, stat: str) -> list[str]:
    """The kinds with statistic `stat`, sorted."""
    return sorted({layer_free(s) for s in _sites_with(captures, stat)})


def kind_sites(captures: Captures, kind: str, stat: str) -> list[str]:
    """The sites of `kind` that have statistic `stat`, in layer order."""
    return sorted((s for s in _sites_with(captures, stat) if layer_free(s) == kind), key=layer_of)


def select_kinds(available: list[str], patterns: tuple[str, ...] | list[str]) -> list[str]:
    """The kinds matching any fnmatch pattern, in the order of the patterns."""
    chosen: list[str] = []
    for pattern in patterns:
        chosen += [k for k in available if fnmatch.fnmatchcase(k, pattern) and k not in chosen]
    return chosen


def pick_steps(steps: np.ndarray, count: int) -> list[int]:
    """Up to `count` capture steps spread evenly from the first to the last."""
    index = np.unique(np.linspace(0, len(steps) - 1, min(count, len(steps))).round().astype(int))
    return [int(steps[i]) for i in index]


def histogram(captures: Captures, site: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the linear histogram of `site` at `step`, as float64."""
    counts, edges = captures.arrays["lin_hist"], captures.arrays["lin_edges"]
    i = list(counts.steps).index(step)
    return counts.site(site)[i].astype(np.float64), edges.site(site)[i].astype(np.float64)


def scalar(captures: Captures, kind: str, stat: str) -> pd.DataFrame:
    """Scalar statistic `stat` of the sites of `kind`: rows layers (-1 outside the layers), columns steps."""
    rows = captures.table[captures.table.stat == stat]
    rows = rows[rows.site.map(layer_free) == kind]
    return rows.pivot_table(index="layer", columns="step", values="value", aggfunc="first")


def site_series(captures: Captures, site: str, stat: str) -> pd.Series:
    """Scalar statistic `stat` of one site, indexed by capture step."""
    t = captures.table
    return t[(t.site == site) & (t.stat == stat)].set_index("step")["value"]


def dynamic_range(captures: Captures, kind: str) -> pd.DataFrame:
    """log2(max |x| / smallest nonzero |x|) of the sites of `kind`: the binades a format must span."""
    return np.log2(scalar(captures, kind, "absmax") / scalar(captures, kind, "min_nonzero"))


def restrict(captures: Captures, sites: list[str] | None = None, steps: list[int] | None = None) -> Captures:
    """The captures of the sites matching any fnmatch pattern in `sites` (with or without the layer) at
    `steps`; raises ValueError naming what exists when a pattern or a step matches nothing."""
    table, arrays = captures.table, captures.arrays
    if steps is not None:
        missing = sorted(set(steps) - set(captures.steps.tolist()))
        if missing:
            raise ValueError(f"steps {missing} were not captured; captured: {captures.steps.tolist()}")
    names = table.site.unique().tolist()
    keep = set(names)
    if sites is not None:
        for pattern in sites:
            if not any(_matches(n, pattern) for n in names):
                raise ValueError(
                    f"site pattern {pattern!r} matches no captured site, e.g. {', '.join(names[:4])}"
                )
        keep = {n for n in names if any(_matches(n, p) for p in sites)}
    wanted = set(captures.steps.tolist() if steps is None else steps)
    table = table[table.site.isin(keep) & table.step.isin(wanted)].reset_index(drop=True)
    out = {}
    for stat, array in arrays.items():
        rows = np.isin(array.steps, list(wanted))
        columns = [i for i, s in enumerate(array.sites) if s in keep]
        if columns:
            values = array.values[rows][:, columns]
            out[stat] = ProbeArray(array.steps[rows], [array.sites[i] for i in columns], values)
    return Captures(table, out, captures.missing)


def _matches(site: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(site, pattern) or fnmatch.fnmatchcase(layer_free(site), pattern)
