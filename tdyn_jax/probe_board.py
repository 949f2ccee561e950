"""Captures in TensorBoard (train.tensorboard): each capture step's histograms and headline statistics
of every site, in WORKDIR/tb/probes (a run of its own beside the metrics in WORKDIR/tb).

Tags group by kind, then statistic, then layer: `resid/out/kurtosis/layer_03`, `resid/out/exp_hist/
layer_03`; a site outside the layers has no layer part (`embed/kurtosis`). Histograms are the stored
ones with their real bucket edges (no resampling): the linear histogram on its own edges, and the
signed log2 histogram on the edges +-2^e. Written when a chunk of captures is saved (before its
checkpoint); a resumed run purges what the crashed one wrote from its restart step on, so every step
appears once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from tdyn_jax.probes.naming import layer_free, layer_name, layer_of

SCALARS = ("kurtosis", "absmax", "rms_kurtosis")  # at every site that has them
PART_SCALARS = {"E": ("log2_range",), "R": ("std",)}  # at the E and R of every matmul
DBL_MAX = sys.float_info.max


def tag(site: str, stat: str) -> str:
    """'layer_03/resid/out', 'kurtosis' -> 'resid/out/kurtosis/layer_03'; no layer part outside the
    layers."""
    layer = layer_of(site)
    name = f"{layer_free(site)}/{stat}"
    return f"{name}/{layer_name(layer)}" if layer >= 0 else name


def exp_bucket_limits(exp_min: int, exp_max: int) -> np.ndarray:
    """The right edge of each bin of the signed log2 histogram (`stats.exp_hist_labels` order): -2^e
    for the negative bins (the outermost reaches -inf), then -5e-324 (the bin of the negative values
    below 2^exp_min, which holds every negative value above -2^exp_min), 0 (the zero bin), then 2^(e+1)
    for the positive bins, the outermost DBL_MAX (it holds up to +inf)."""
    negative = [-(2.0**e) for e in range(exp_max, exp_min - 1, -1)]
    positive = [2.0 ** (e + 1) for e in range(exp_min - 1, exp_max)]
    return np.array([*negative, -5e-324, 0.0, *positive, DBL_MAX])


def _is_written(site: str, stat: str) -> bool:
    part = site.rsplit("/", 1)[-1]
    if part == "lowprec":
        return stat.endswith("/rel_err")
    return stat in SCALARS or stat in PART_SCALARS.get(part, ())


class ProbeBoard:
    """Writes captured statistics as TensorBoard events (process 0 only)."""

    def __init__(self, workdir: Path, index: dict[str, list[str]], exp_range: tuple[int, int], start: int):
        from tensorboardX import SummaryWriter

        self.index, self.exp_limits = index, exp_bucket_limits(*exp_range)
        self.writer = SummaryWriter(str(Path(workdir) / "tb" / "probes"), purge_step=start)

    def write(self, captures: list[tuple[int, dict[str, Any]]]) -> None:
        """Writes [(capture step, {statistic: values over its sites})] (the probe store's chunk)."""
        for step, stats in captures:
            site_stats = {
                stat: dict(zip(self.index[stat], np.asarray(values), strict=True))
                for stat, values in stats.items()
            }
            for stat, by_site in site_stats.items():
                for site, value in by_site.items():
                    if _is_written(site, stat):
                        self.writer.add_scalar(tag(site, stat), float(value), step)
            for site, counts in site_stats.get("exp_hist", {}).items():
                self._histogram(tag(site, "exp_hist"), counts, self.exp_limits, site_stats, site, step)
            for site, counts in site_stats.get("lin_hist", {}).items():
                edges = np.asarray(site_stats["lin_edges"][site], np.float64)
                self._histogram(tag(site, "lin_hist"), counts, edges[1:], site_stats, site, step, edges[0])
        self.writer.flush()

    def _histogram(self, name, counts, limits, site_stats, site, step, low=None) -> None:
        """One histogram: `counts` in buckets with right edges `limits` (the first from `low`, or from
        the site's min), with the site's moments for the sum and the sum of squares."""
        moment = lambda stat: float(site_stats[stat][site]) if stat in site_stats else 0.0
        n = float(np.sum(counts))
        mean, std = moment("mean"), moment("std")
        self.writer.add_histogram_raw(
            name,
            min=moment("min") if low is None else float(low),
            max=moment("max"),
            num=n,
            sum=mean * n,
            sum_squares=(std * std + mean * mean) * n,
            bucket_limits=np.asarray(limits, np.float64).tolist(),
            bucket_counts=np.asarray(counts, np.float64).tolist(),
            global_step=step,
        )

    def close(self) -> None:
        """Flushes and closes the event file."""
        self.writer.close()
