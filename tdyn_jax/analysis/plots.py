"""Static figures of a run (PNG): histograms with fitted densities, QQ plots, layer x step heatmaps, the
E/R split, low-precision errors, outlier channels and loss curves. Every function writes one file and
returns its path; none of them shows a window."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from scipy import special

from tdyn_jax.analysis.fit import FAMILIES, best_family, logpdf
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.views import (
    dynamic_range,
    histogram,
    kind_sites,
    pick_steps,
    scalar,
)
from tdyn_jax.probes.naming import layer_free

DPI = 130
plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8})
FIT_STYLE = {"gaussian": ("tab:blue", "--"), "logistic": ("tab:red", "-")}
FAMILY_COLORS = ListedColormap(["tab:blue", "tab:red", "tab:green", "tab:purple"])


def save(fig: plt.Figure, path: Path) -> Path:
    """Writes `fig` to `path` (PNG) and closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def fitted_density(fits: pd.DataFrame, step: int, site: str, family: str, x: np.ndarray) -> np.ndarray | None:
    """Density of the fitted `family` at x for (step, site), or None when it was not fitted."""
    row = fits[(fits.step == step) & (fits.site == site) & (fits.family == family)]
    if row.empty or not np.isfinite(row["scale"].iloc[0]):
        return None
    names = ["loc", "scale", "df"] if family == "student_t" else ["loc", "scale"]
    params = row[names].to_numpy(np.float64)
    return np.exp(logpdf(family, x[None, :], params))[0]


def histogram_with_fits(
    captures: Captures, fits: pd.DataFrame, site: str, step: int
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(counts, edges, {family: (x, expected counts)}) of `site` at `step`: the linear histogram and the
    fitted Gaussian and logistic densities scaled to counts (density x finite count x bin width)."""
    counts, edges = histogram(captures, site, step)
    x = np.linspace(edges[0], edges[-1], 400)
    curves = {}
    for family in FIT_STYLE:
        density = fitted_density(fits, step, site, family, x)
        if density is not None:
            curves[family] = (x, density * counts.sum() * (edges[1] - edges[0]))
    return counts, edges, curves


def draw_histogram(ax: plt.Axes, captures: Captures, fits: pd.DataFrame, site: str, step: int) -> None:
    """The linear histogram of `site` at `step` on a log-count axis, with its fitted densities."""
    counts, edges, curves = histogram_with_fits(captures, fits, site, step)
    ax.stairs(counts, edges, fill=True, color="0.75", label="captured")
    ax.stairs(counts, edges, color="0.35", linewidth=0.6)
    for family, (x, y) in curves.items():
        color, style = FIT_STYLE[family]
        ax.plot(x, y, color=color, linestyle=style, linewidth=1.1, label=family)
    ax.set_yscale("log")
    ax.set_ylim(0.5, max(counts.max(), 1) * 3)


def histograms(captures: Captures, fits: pd.DataFrame, kind: str, path: Path, columns: int = 4) -> Path:
    """Rows: layers of `kind`; columns: capture steps from first to last; log counts with fits."""
    sites = kind_sites(captures, kind, "lin_hist")
    steps = pick_steps(captures.steps, columns)
    fig, axes = plt.subplots(
        len(sites), len(steps), figsize=(2.6 * len(steps), 1.9 * len(sites)), squeeze=False, sharey="row"
    )
    for i, site in enumerate(sites):
        for j, step in enumerate(steps):
            ax = axes[i, j]
            draw_histogram(ax, captures, fits, site, step)
            ax.set_title(f"{site} @ step {step}", fontsize=7)
            if j == 0:
                ax.set_ylabel("count (log)")
            if i == len(sites) - 1:
                ax.set_xlabel("value")
    axes[0, -1].legend(loc="upper right")
    fig.suptitle(f"{kind}: histograms over training with maximum-likelihood fits", y=1.0)
    fig.tight_layout()
    return save(fig, path)


def qq(captures: Captures, fits: pd.DataFrame, site: str, path: Path, steps: int = 3) -> Path:
    """Sample quantiles of `site` against the fitted Gaussian and logistic quantiles at a few steps."""
    chosen = pick_steps(captures.steps, steps)
    sample = captures.arrays["sample"]
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(chosen)))
    for ax, family in zip(axes, ("gaussian", "logistic"), strict=True):
        for step, color in zip(chosen, colors, strict=True):
            values = sample.site(site)[list(sample.steps).index(step)]
            values = np.sort(values[np.isfinite(values)].astype(np.float64))
            row = fits[(fits.step == step) & (fits.site == site) & (fits.family == family)]
            if values.size < 2 or row.empty or not np.isfinite(row["scale"].iloc[0]):
                continue
            p = (np.arange(1, values.size + 1) - 0.5) / values.size
            loc, scale = row["loc"].iloc[0], row["scale"].iloc[0]
            theory = loc + scale * (special.ndtri(p) if family == "gaussian" else special.logit(p))
            ax.plot(theory, values, ".", markersize=2.5, color=color, label=f"step {step}")
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="k", linewidth=0.8)
        ax.set_xlabel(f"fitted {family} quantile")
        ax.set_ylabel("sample quantile")
        ax.set_title(f"QQ vs {family}")
    axes[0].legend(markerscale=3)
    fig.suptitle(site)
    fig.tight_layout()
    return save(fig, path)


HEATMAP_STATS = {
    "kurtosis": "excess kurtosis",
    "absmax": "max |x|",
    "dynamic_range": "log2(max|x| / min nonzero |x|)",
    "int8_outlier_channels": "LLM.int8 outlier channels",
}


def heatmaps(captures: Captures, fits: pd.DataFrame, kind: str, path: Path, criterion: str = "bic") -> Path:
    """Layer x step heatmaps of `kind`: kurtosis, absmax, log2 dynamic range, outlier-channel count (at
    activation sites) and the best-fitting family."""
    panels = [s for s in HEATMAP_STATS if s == "dynamic_range" or not scalar(captures, kind, s).empty]
    best = best_family(fits, criterion) if not fits.empty else pd.Series(dtype=object)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.3 * (len(panels) + 1), 2.8), squeeze=False)
    for ax, stat in zip(axes[0], panels, strict=False):
        grid = dynamic_range(captures, kind) if stat == "dynamic_range" else scalar(captures, kind, stat)
        image = ax.imshow(grid.to_numpy(np.float64), aspect="auto", origin="lower", cmap="magma")
        fig.colorbar(image, ax=ax, fraction=0.05)
        _layer_step_axes(ax, grid)
        ax.set_title(HEATMAP_STATS[stat])
    ax = axes[0, -1]
    grid = _best_grid(best, captures, kind)
    ax.imshow(grid.to_numpy(np.float64), aspect="auto", origin="lower", cmap=FAMILY_COLORS, vmin=0, vmax=3)
    _layer_step_axes(ax, grid)
    ax.set_title(f"best family ({criterion.upper()})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=FAMILY_COLORS(i)) for i in range(len(FAMILIES))]
    ax.legend(handles, FAMILIES, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    fig.suptitle(kind)
    fig.tight_layout()
    return save(fig, path)


def _best_grid(best: pd.Series, captures: Captures, kind: str) -> pd.DataFrame:
    """Layer x step codes (index in FAMILIES) of the best family at the sites of `kind`."""
    sites = kind_sites(captures, kind, "sample")
    grid = pd.DataFrame(np.nan, index=range(len(sites)), columns=captures.steps)
    for i, site in enumerate(sites):
        for step in captures.steps:
            family = best.get((step, site))
            if family is not None:
                grid.loc[i, step] = FAMILIES.index(family)
    return grid


def _layer_step_axes(ax: plt.Axes, grid: pd.DataFrame) -> None:
    steps = list(grid.columns)
    ticks = range(0, len(steps), -(-len(steps) // 6))  # at most 6 labels, evenly strided
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
    ax.set_xlabel("step")
    ax.set_ylabel("layer")


def energy(captures: Captures, kinds: list[str], path: Path) -> Path:
    """Per matmul kind over training: log2 dynamic range of E, the spread (std) of R, and the share of
    var(log2|C|) carried by E and by R; one line per layer."""
    columns = [("E", "log2_range", "log2 range of E (binades)"), ("R", "std", "std of R")]
    columns.append(("R", "share_e", "share of var(log2|C|): E (solid), R (dashed)"))
    fig, axes = plt.subplots(len(kinds), 3, figsize=(10.5, 2.3 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, (part, stat, title) in enumerate(columns):
            ax = axes[i, j]
            grid = scalar(captures, f"{kind}/{part}", stat)
            colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(grid.index), 1)))
            for layer, color in zip(grid.index, colors, strict=True):
                ax.plot(grid.columns, grid.loc[layer], color=color, label=f"layer {layer}")
                if stat == "share_e":
                    share_r = scalar(captures, f"{kind}/R", "share_r")
                    ax.plot(share_r.columns, share_r.loc[layer], color=color, linestyle="--")
            ax.set_title(f"{kind}: {title}", fontsize=8)
            ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return save(fig, path)


def lowprec(captures: Captures, kinds: list[str], path: Path, step: int | None = None) -> Path:
    """Relative error of C at one capture step (default: the last with finite errors: a run that
    diverged has none after), mean over layers, per matmul kind, on two axes that answer two
    questions: computing C from low-precision A and W (gemm/: each format and scaling, the E/R-split
    GEMM hatched) and storing C (store/: C itself in each format, or as E and R, hatched)."""
    t = captures.table
    rows = t[t.site.str.endswith("/lowprec") & t.stat.str.endswith("rel_err") & np.isfinite(t.value)]
    if step is None:
        step = int(rows.step.max()) if len(rows) else int(captures.steps[-1])
    rows = rows[rows.step == step]
    if rows.empty:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, f"no finite low-precision error at step {step}", ha="center", va="center")
        ax.set_axis_off()
        return save(fig, path)
    rows = rows.assign(kind=[layer_free(s).removesuffix("/lowprec") for s in rows.site])
    table = rows[rows.kind.isin(kinds)].groupby(["kind", "stat"])["value"].mean().unstack("stat")
    questions = {"gemm": "computing C from A, W in low precision", "store": "storing C in low precision"}
    columns = {q: sorted(c for c in table.columns if c.startswith(f"{q}/")) for q in questions}
    widest = max(len(c) for c in columns.values())
    fig, axes = plt.subplots(2, 1, figsize=(min(14, max(6, 0.2 * len(table.index) * widest)), 7.2))
    x = np.arange(len(table.index))
    for ax, (question, title) in zip(axes, questions.items(), strict=True):
        order = columns[question]
        width = 0.8 / max(len(order), 1)
        for i, name in enumerate(order):
            hatch = "//" if "/er" in name else None
            label = _lowprec_label(name.removesuffix("/rel_err"))
            ax.bar(x + i * width, table[name], width, color=plt.cm.tab20(i % 20), hatch=hatch, label=label)
        ax.set_xticks(x + 0.4 - width / 2, table.index, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("relative error of C")
        ax.set_title(f"{title}, step {step} (E/R hatched)")
        ax.legend(ncol=2, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return save(fig, path)


def _lowprec_label(name: str) -> str:
    """Legend text of 'gemm/e4m3/tensor', 'gemm/e4m3/er' (the E/R-split GEMM), 'store/int8/row',
    'store/er/e3/r8s' (E as an 8-bit log code on 2^-3 steps, R on 8 bits scaled to its range),
    'store/er/exact/r8' (E exact: its norm vectors)."""
    question, *rest = name.split("/")
    if question == "store" and rest[0] == "er":
        e, r = rest[1:]
        e_text = "E exact" if e == "exact" else f"E 8-bit log ({e[1:]} frac bits)"
        r_text = f"R {r[1:].rstrip('s')} bits" + (" (own range)" if r.endswith("s") else "")
        return f"{e_text}, {r_text}"
    fmt, scaling = rest
    if question == "store":
        return f"C {fmt} ({scaling} scale)"
    return f"A,W {fmt} ({'E/R-split' if scaling == 'er' else scaling + ' scale'})"


def outlier_channels(captures: Captures, kind: str, path: Path) -> Path:
    """The channels of the top-k |x| at each capture step, one panel per layer: a channel that stays in
    the top-k over training is a persistent outlier feature (marker area ~ log2 of its max/median)."""
    sites = kind_sites(captures, kind, "massive_channel")
    channels, ratios = captures.arrays["massive_channel"], captures.arrays["massive_ratio"]
    fig, axes = plt.subplots(1, len(sites), figsize=(3.0 * len(sites), 2.8), squeeze=False, sharey=True)
    for ax, site in zip(axes[0], sites, strict=True):
        ch, ratio = channels.site(site), ratios.site(site)  # (steps, k)
        steps = np.repeat(channels.steps, ch.shape[1])
        size = 6 * np.log2(np.maximum(ratio.reshape(-1), 2))
        ax.scatter(steps, ch.reshape(-1), s=size, c=np.tile(np.arange(ch.shape[1]), len(channels.steps)))
        ax.set_title(site, fontsize=8)
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("channel of a top-k |x|")
    fig.suptitle(f"{kind}: where the largest activations sit (colour: rank 1 = dark)")
    fig.tight_layout()
    return save(fig, path)


def losses(metrics: pd.DataFrame, path: Path) -> Path:
    """Training and validation loss, learning rate and gradient norm over steps."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(metrics.step, metrics.loss, label="train loss")
    if "val_loss" in metrics:
        val = metrics.dropna(subset=["val_loss"])
        left.plot(val.step, val.val_loss, "o-", label="validation loss")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats / token)")
    left.legend()
    right.plot(metrics.step, metrics.grad_norm, color="tab:gray", label="gradient norm")
    right.set_xlabel("step")
    right.set_ylabel("global gradient norm")
    twin = right.twinx()
    twin.plot(metrics.step, metrics.lr, color="tab:orange", label="learning rate")
    twin.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    return save(fig, path)
