"""Figures of the seed-claims study, the outlier-lever sweep and low-precision training (PNG, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from tdyn_jax.analysis import claims as claims_lib
from tdyn_jax.analysis.load import Captures
from tdyn_jax.analysis.plots import save
from tdyn_jax.analysis.verdicts import Claim


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
    """Left: each run's training loss minus the reference run's at the same logged step; right: the
    residual stream's largest RMS kurtosis over training. One colour per forward format, dashed where
    the backward products are quantised too (run names ending in _bwd)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    ref = losses[reference].set_index("step").loss
    families = sorted({run.removesuffix("_bwd") for run in losses})
    for run in losses:
        color = plt.cm.tab20(families.index(run.removesuffix("_bwd")) / max(len(families) - 1, 1))
        style = "--" if run.endswith("_bwd") else "-"
        frame = losses[run]
        left.plot(
            frame.step,
            frame.loss.to_numpy() - ref.reindex(frame.step).to_numpy(),
            style,
            color=color,
            label=run,
        )
        if run in kurtosis:
            right.plot(kurtosis[run].index, kurtosis[run].to_numpy(), style, color=color)
    left.axhline(0.0, color="black", lw=0.8)
    left.set(xlabel="step", ylabel=f"training loss - {reference}'s (nats)")
    left.set_yscale("symlog", linthresh=0.01)
    left.legend(fontsize=6, ncol=2)
    right.set(xlabel="step", ylabel="largest RMS kurtosis of resid/out over layers", yscale="log")
    fig.tight_layout()
    return save(fig, path)
