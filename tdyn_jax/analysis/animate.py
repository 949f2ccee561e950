"""Animated histograms over training (GIF, one frame per capture step): one site, or every layer of a
kind side by side. Axes are fixed over the frames so that a growing tail is seen as it grows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import animation
from matplotlib import pyplot as plt

from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.plots import DPI, draw_histogram
from tdyn_jax.analysis.views import histogram, kind_sites, site_series


def _limits(captures: Captures, sites: list[str]) -> tuple[tuple[float, float], float]:
    """x range over every step and site, and the largest count."""
    low, high, top = np.inf, -np.inf, 1.0
    for site in sites:
        for step in captures.steps:
            counts, edges = histogram(captures, site, int(step))
            low, high, top = min(low, edges[0]), max(high, edges[-1]), max(top, counts.max())
    return (low, high), top


def histograms_gif(captures: Captures, fits: pd.DataFrame, sites: list[str], path: Path, title: str) -> Path:
    """A GIF whose frames are the capture steps and whose panels are `sites` (one or all layers), each a
    log-count histogram with its fitted Gaussian and logistic densities."""
    columns = min(len(sites), 4)
    rows = -(-len(sites) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows + 0.4), squeeze=False)
    (low, high), top = _limits(captures, sites)
    kurtosis = {site: site_series(captures, site, "kurtosis") for site in sites}

    def frame(step: int) -> None:
        for ax, site in zip(axes.flat, sites, strict=False):
            ax.clear()
            draw_histogram(ax, captures, fits, site, int(step))
            ax.set_xlim(low, high)
            ax.set_ylim(0.5, top * 3)
            ax.set_title(f"{site}  (kurtosis {kurtosis[site].get(step, np.nan):.2f})", fontsize=7)
            ax.set_xlabel("value")
            ax.set_ylabel("count (log)")
        for ax in list(axes.flat)[len(sites) :]:
            ax.axis("off")
        axes.flat[0].legend(loc="upper right", fontsize=6)
        fig.suptitle(f"{title} — step {step}")

    frames = [int(s) for s in captures.steps]
    movie = animation.FuncAnimation(fig, frame, frames=frames, interval=600)
    path.parent.mkdir(parents=True, exist_ok=True)
    movie.save(path, writer=animation.PillowWriter(fps=2), dpi=DPI * 0.7)
    plt.close(fig)
    return path


def kind_gif(captures: Captures, fits: pd.DataFrame, kind: str, path: Path) -> Path:
    """Every layer of `kind` together, one panel each."""
    return histograms_gif(captures, fits, kind_sites(captures, kind, "lin_hist"), path, f"{kind}, all layers")
