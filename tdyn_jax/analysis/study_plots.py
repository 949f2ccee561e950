"""Figures of the study scripts: seed claims, outlier levers, low-precision training and the Pythia
reference (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from tdyn_jax.analysis import claims as claims_lib
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.plots import save
from tdyn_jax.analysis.verdicts import Claim
from tdyn_jax.reference import PYTHIA_SIZES


def _early(ax: plt.Axes, num_steps: int) -> None:
    ax.axvline(claims_lib.EARLY * num_steps, color="gray", ls=":", lw=1, label="end of the early phase")


def claims_figure(
    captures: Captures, fits: pd.DataFrame, num_steps: int, found: list[Claim], path: Path
) -> Path:
    """One panel per claim with the quantity its core or tail check measures, the reference line, and
    the verdict in the title."""
    verdicts = {c.key: c.verdict for c in found}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes

    weights = claims_lib.weight_sites(captures)
    ratio = claims_lib.tail_ratio(captures, weights)
    if not ratio.empty:
        a.plot(ratio.columns, ratio.T.to_numpy(), color="tab:blue", lw=0.5, alpha=0.35)
        a.plot(ratio.columns, ratio.median(axis=0), color="black", lw=2, label="median over matrices")
        n = claims_lib.site_grid(captures, weights, "count").iloc[:, 0].median()
        a.axhline(claims_lib.gaussian_max(n), color="tab:red", ls="--", label="Gaussian 99% quantile")
    _early(a, num_steps)
    a.set(xlabel="step", ylabel="max|x - mean| / std", title=f"(a) weight tails: {verdicts.get('a', '')}")
    a.legend(fontsize=7)

    resid = claims_lib.residual_sites(captures)
    rows = fits[fits.site.isin(resid)]
    gap = rows.pivot_table(index=["site", "step"], columns="family", values="mean_loglik")
    if {"gaussian", "logistic"} <= set(gap.columns):
        diff = (gap["logistic"] - gap["gaussian"]).unstack("step")
        for site, row in diff.iterrows():
            b.plot(row.index, row.to_numpy(), marker=".", label=site)
    b.axhline(0, color="black", lw=0.8)
    _early(b, num_steps)
    b.set(
        xlabel="step",
        ylabel="logistic - Gaussian log-likelihood (nats / value)",
        title=f"(b) residual stream shape: {verdicts.get('b', '')}",
    )
    b.legend(fontsize=7)

    for name, sites, color in (
        ("weight gradients", claims_lib.weight_sites(captures, "grads"), "tab:green"),
        ("residual gradients", claims_lib.residual_grad_sites(captures), "tab:purple"),
    ):
        kurt = claims_lib.site_grid(captures, sites, "kurtosis")
        if kurt.empty:
            continue
        c.plot(kurt.columns, kurt.median(axis=0), color=color, lw=2, label=f"{name} (median)")
        c.fill_between(kurt.columns, kurt.min(axis=0), kurt.max(axis=0), color=color, alpha=0.2)
    c.axhline(claims_lib.LOGISTIC_KURTOSIS, color="tab:red", ls="--", label="logistic (1.2)")
    c.set_yscale("symlog", linthresh=1)
    c.set(xlabel="step", ylabel="excess kurtosis", title=f"(c) gradients: {verdicts.get('c', '')}")
    c.legend(fontsize=7)

    t = captures.table
    last = t[(t.step == t.step.max()) & t.site.str.endswith("/lowprec") & t.stat.str.endswith("/rel_err")]
    medians = last.groupby("stat")["value"].median().sort_values()
    if len(medians):
        names = [s.removesuffix("/rel_err") for s in medians.index]
        colors = [
            "tab:orange" if "/er" in n else "tab:blue" if n.startswith("gemm/") else "tab:green"
            for n in names
        ]
        d.barh(names, medians.to_numpy(), color=colors)
        d.set_xscale("log")
        d.tick_params(axis="y", labelsize=6)
    d.set(
        xlabel=f"median relative error of C at step {t.step.max()} (blue: gemm, green: store, orange: E/R)",
        title=f"(d) storing C as E and R vs in 8 bits: {verdicts.get('d', '')}",
    )
    fig.tight_layout()
    return save(fig, path)


def levers_figure(series: dict[tuple, pd.Series], path: Path) -> Path:
    """The residual stream's largest RMS kurtosis over training for each run of the sweep, one panel per
    norm placement; keys are (lr, eps, norm)."""
    norms = sorted({key[2] for key in series}, key=["pre", "post", "none"].index)
    fig, axes = plt.subplots(1, len(norms), figsize=(4.2 * len(norms), 3.6), squeeze=False, sharey=True)
    lrs = sorted({key[0] for key in series})
    epss = sorted({key[1] for key in series})
    for ax, norm in zip(axes[0], norms, strict=True):
        for (lr, eps, n), values in sorted(series.items()):
            if n != norm:
                continue
            color = plt.cm.viridis(lrs.index(lr) / max(len(lrs) - 1, 1))
            style = ["-", "--", ":", "-."][epss.index(eps) % 4]
            ax.plot(values.index, values.to_numpy(), style, color=color, label=f"lr {lr:g}, eps {eps:g}")
        ax.set(title=f"norms: {norm}", xlabel="step", yscale="log")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("largest RMS kurtosis over layers")
    fig.tight_layout()
    return save(fig, path)


def lowprec_training_figure(
    losses: dict[str, pd.DataFrame], kurtosis: dict[str, pd.Series], reference: str, path: Path
) -> Path:
    """Left: each run's training loss (the mean over each log interval) minus the reference run's at the
    same logged step; right: the residual stream's largest RMS kurtosis over training. One colour per
    forward format, dashed where the backward products are quantised too (run names ending in _bwd)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    column = "loss_avg" if "loss_avg" in losses[reference] else "loss"
    ref = losses[reference].set_index("step")[column]
    families = sorted({run.removesuffix("_bwd") for run in losses})
    for run in losses:
        color = plt.cm.tab20(families.index(run.removesuffix("_bwd")) / max(len(families) - 1, 1))
        style = "--" if run.endswith("_bwd") else "-"
        frame = losses[run]
        gap = frame[column].to_numpy() - ref.reindex(frame.step).to_numpy()
        left.plot(frame.step, gap, style, color=color, label=run)
        if run in kurtosis:
            right.plot(kurtosis[run].index, kurtosis[run].to_numpy(), style, color=color)
    left.axhline(0.0, color="black", lw=0.8)
    left.set(xlabel="step", ylabel=f"interval-mean training loss - {reference}'s (nats)")
    left.set_yscale("symlog", linthresh=0.01)
    left.legend(fontsize=6, ncol=2)
    right.set(xlabel="step", ylabel="largest RMS kurtosis of resid/out over layers", yscale="log")
    fig.tight_layout()
    return save(fig, path)


def pythia_tails_figure(tails: dict[str, pd.DataFrame], path: Path) -> Path:
    """Median over each model's weight matrices of max/std divided by the Gaussian 99% reference of the
    matrix's size (1: as far out as a Gaussian gets), with the interquartile band, against training
    progress: the whole run (left) and its first quarter (right). Pythia sizes in colour, project runs
    in black; `tails` maps a label to a tail table (`analysis.pythia`)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    pythia_labels = [label for label in tails if label in PYTHIA_SIZES]
    for label, frame in tails.items():
        scaled = frame.tail_ratio / frame.n.map(claims_lib.gaussian_max)
        grouped = scaled.groupby(frame.progress.to_numpy())
        low, mid, high = grouped.quantile(0.25), grouped.median(), grouped.quantile(0.75)
        if label in PYTHIA_SIZES:
            color = plt.cm.viridis(pythia_labels.index(label) / max(len(pythia_labels) - 1, 1))
            name, width = PYTHIA_SIZES[label][0], 1.2
        else:
            color, name, width = "black", label, 2.0
        for ax in axes:
            ax.plot(mid.index, mid.to_numpy(), color=color, lw=width, label=name)
            ax.fill_between(mid.index, low.to_numpy(), high.to_numpy(), color=color, alpha=0.15)
    for ax in axes:
        ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="Gaussian 99% quantile")
        ax.set(xlabel="training progress (fraction of the run)")
    axes[0].set(ylabel="max / std over the Gaussian reference", title="whole run")
    axes[1].set(xlim=(0, 0.25), title="first quarter")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def pythia_scaling_figure(table: pd.DataFrame, path: Path) -> Path:
    """The tail measures of each model of `table` (`analysis.pythia.scaling_table`), in its order, the
    Pythia sizes joined by lines: the share of matrices above the Gaussian reference at the end, the
    median shares of the change made early and within a short window (left), and the median first and
    final max/std over the reference (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(table))
    line = table.name.str.startswith("pythia-").to_numpy()
    series = [
        (left, table.share_above, "share above the Gaussian reference at the end", "tab:blue"),
        (left, table.early_share, "median share of the change by 25% of training", "tab:orange"),
        (left, table.sharp_share, "median share of the change within 5% of training", "tab:green"),
        (right, table.last_ratio / table.reference, "end", "black"),
        (right, table.first_ratio / table.reference, "first point", "gray"),
    ]
    for ax, values, text, color in series:
        ax.plot(x[line], values.to_numpy()[line], "o-", color=color, label=text)
        ax.plot(x[~line], values.to_numpy()[~line], "D", color=color)
    left.set(ylim=(-0.05, 1.05), ylabel="share")
    right.axhline(1.0, color="tab:red", ls="--", lw=1)
    right.set(ylabel="median max / std over the Gaussian reference")
    for ax in (left, right):
        ax.set_xticks(x, table.name.tolist(), rotation=20, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)
