"""Animated histograms over training (GIF, one frame per capture step): one site, or every layer of a
kind side by side. Axes are fixed over the frames so that a growing tail is seen as it grows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import animation, ticker
from matplotlib import pyplot as plt

from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.plots import DPI, FIT_STYLE, histogram_with_fits
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
    log-count histogram with its fitted Gaussian and logistic densities. The axes are drawn once; each
    frame only moves the histogram, the curves and the titles."""
    columns = min(len(sites), 4)
    rows = -(-len(sites) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.5 * rows + 0.5), squeeze=False)
    (low, high), top = _limits(captures, sites)
    kurtosis = {site: site_series(captures, site, "kurtosis") for site in sites}
    panels = []
    for ax, site in zip(axes.flat, sites, strict=False):
        fill = ax.stairs([1.0], [low, high], fill=True, color="0.75", label="captured")
        edge = ax.stairs([1.0], [low, high], color="0.35", linewidth=0.6)
        lines = {}
        for family, (color, style) in FIT_STYLE.items():
            (lines[family],) = ax.plot([], [], color=color, linestyle=style, linewidth=1.1, label=family)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(numticks=4))
        ax.yaxis.set_minor_locator(ticker.NullLocator())  # fewer ticks: most of a frame's drawing time
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
        ax.set_xlim(low, high)
        ax.set_ylim(0.5, top * 3)
        ax.set_xlabel("value")
        ax.set_ylabel("count (log)")
        ax.set_title(site, fontsize=7)
        panels.append((site, ax, fill, edge, lines))
    for ax in list(axes.flat)[len(sites) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="upper right", fontsize=6)
    heading = fig.suptitle(title)
    changing = [heading] + [
        a for _, ax, fill, edge, lines in panels for a in (ax.title, fill, edge, *lines.values())
    ]
    fig.subplots_adjust(top=1 - 0.45 / fig.get_figheight(), hspace=0.6, wspace=0.35, bottom=0.18)

    def frame(step: int) -> list:
        for site, ax, fill, edge, lines in panels:
            counts, edges, curves = histogram_with_fits(captures, fits, site, step)
            fill.set_data(counts, edges)
            edge.set_data(counts, edges)
            for family, line in lines.items():
                line.set_data(*curves.get(family, ([], [])))
            ax.title.set_text(f"{site}  (kurtosis {kurtosis[site].get(step, np.nan):.2f})")
        heading.set_text(f"{title}: step {step}")
        return changing

    frames = [int(s) for s in captures.steps]
    movie = animation.FuncAnimation(fig, frame, frames=frames, interval=600, blit=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    movie.save(path, writer=animation.PillowWriter(fps=2), dpi=DPI * 0.7)
    plt.close(fig)
    return path


def kind_gif(captures: Captures, fits: pd.DataFrame, kind: str, path: Path) -> Path:
    """Every layer of `kind` together, one panel each."""
    return histograms_gif(captures, fits, kind_sites(captures, kind, "lin_hist"), path, f"{kind}, all layers")
