"""`write_report(workdir)`: fits, figures, animations and one HTML page in WORKDIR/analysis.

Safe while the run trains: it reads only finished probe chunks and complete metric lines, and replaces
fits.csv and report.html atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import html
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from tdyn_jax.analysis import animate, claims, findings, plots, pythia, study_plots, summary
from tdyn_jax.analysis.fit import fit_captures, fit_histograms
from tdyn_jax.analysis.load import Captures, load
from tdyn_jax.analysis.views import kind_sites, kinds, restrict, select_kinds, site_series
from tdyn_jax.metrics import read_jsonl


def read_metrics(workdir: Path) -> pd.DataFrame:
    """The complete lines of WORKDIR/metrics.jsonl (a line being written is skipped)."""
    return pd.DataFrame(read_jsonl(workdir / "metrics.jsonl")[0])


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def write_report(
    workdir: str | Path,
    kind_patterns: tuple[str, ...] | list[str],
    sites: list[str] | None = None,
    steps: list[int] | None = None,
    criterion: str = "bic",
    workers: int = 2,
    progress: bool = True,
    require_kinds: bool = False,
    reference: str = "none",
) -> Path:
    """Writes WORKDIR/analysis/{fits.csv, *.png, *.gif, report.html} and returns the page's path.

    `sites` (fnmatch patterns over site names, with or without the layer) and `steps` restrict what is
    analysed; `kind_patterns` choose the kinds that get histogram, QQ, heatmap and animation figures.
    Everything is written into WORKDIR/analysis.tmp, which then replaces WORKDIR/analysis: a report
    cut short leaves the previous one (or none) in place, never half of one. `reference` "pythia" adds
    the run's weight tails drawn over Pythia's (claim (a); see `analysis.pythia`). Raises CapturesError or
    ValueError (nothing written) when there is nothing to analyse, or with `require_kinds` when a
    kind pattern matches no captured kind.
    """
    workdir = Path(workdir)
    captures = restrict(load(workdir), sites, steps)
    available = kinds(captures, "sample")
    for pattern in kind_patterns if require_kinds else ():
        if not select_kinds(available, [pattern]):
            raise ValueError(
                f"kind pattern {pattern!r} matches no captured kind, e.g. {', '.join(available[:4])}"
            )
    chosen = select_kinds(available, kind_patterns)
    final, out = workdir / "analysis", workdir / "analysis.tmp"
    shutil.rmtree(out, ignore_errors=True)  # left by a report cut short
    out.mkdir(parents=True)
    fits = fit_captures(captures, workers=workers, progress=progress)
    fits_csv = fits.to_csv(index=False, float_format="%.9g")
    write_atomic(out / "fits.csv", fits_csv)
    binned = fit_histograms(captures).to_csv(index=False, float_format="%.9g")
    write_atomic(out / "fits_histogram.csv", binned)
    matmuls = [k.removesuffix("/E") for k in kinds(captures, "log2_range") if k.endswith("/E")]
    metrics = read_metrics(workdir)
    config = (workdir / "config.json").read_text() if (workdir / "config.json").exists() else "{}"
    num_steps = json.loads(config).get("train", {}).get("num_steps", 0)
    data = _Data(captures, fits, metrics, matmuls, criterion, num_steps, reference)
    jobs = _figure_jobs(data, chosen)
    drawn: list[tuple[str, str, str]] = []
    bar = tqdm(total=len(jobs), desc="figures", disable=not progress, unit="fig")
    if workers > 1 and len(jobs) > 1:
        # each process loads the same captures (the same steps, even if the run has moved on)
        setup = (workdir, out, sites, captures.steps.tolist(), criterion, matmuls, num_steps, reference)
        context = multiprocessing.get_context("spawn")  # no fork of a process that ran JAX threads
        with ProcessPoolExecutor(min(workers, len(jobs)), context, _start_worker, setup) as pool:
            for job, name in zip(jobs, pool.map(_draw, jobs, [out] * len(jobs)), strict=True):
                drawn.append((job[0], job[1], name))
                bar.update()
    else:
        _use(data)
        for job in jobs:
            drawn.append((job[0], job[1], _draw(job, out)))
            bar.update()
    bar.close()
    found = _findings(captures, fits, chosen, matmuls, criterion)
    happened = summary.summary(captures, fits, metrics)
    write_atomic(out / "report.html", _html(workdir, captures, metrics, config, happened, found, drawn))
    old = workdir / "analysis.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(out, final)
    shutil.rmtree(old, ignore_errors=True)
    return final / "report.html"


@dataclasses.dataclass(frozen=True)
class _Data:
    """What the figures are drawn from."""

    captures: Captures
    fits: pd.DataFrame
    metrics: pd.DataFrame
    matmuls: list[str]
    criterion: str
    num_steps: int  # the run's train.num_steps (training progress = step / num_steps)
    reference: str  # none | pythia


_WORKER: _Data | None = None  # the data of this process's figures

# figure name -> draw(data, argument, path); arguments are site kinds or site names
DRAW: dict[str, Callable[[_Data, str, Path], Path]] = {
    "losses": lambda d, _, p: plots.losses(d.metrics, p),
    "heatmaps": lambda d, kind, p: plots.heatmaps(d.captures, d.fits, kind, p, d.criterion),
    "energy": lambda d, _, p: plots.energy(d.captures, d.matmuls, p),
    "lowprec": lambda d, _, p: plots.lowprec(d.captures, d.matmuls, p),
    "histograms": lambda d, kind, p: plots.histograms(d.captures, d.fits, kind, p),
    "qq": lambda d, site, p: plots.qq(d.captures, d.fits, site, p),
    "outlier_channels": lambda d, kind, p: plots.outlier_channels(d.captures, kind, p),
    "kind_gif": lambda d, kind, p: animate.kind_gif(d.captures, d.fits, kind, p),
    "site_gif": lambda d, site, p: animate.histograms_gif(d.captures, d.fits, [site], p, site),
    "pythia": lambda d, _, p: study_plots.pythia_tails_figure(
        pythia.with_pythia("this run", pythia.run_tails(claims.weight_tails(d.captures, d.num_steps))), p
    ),
}


def _figure_jobs(data: _Data, chosen: list[str]) -> list[tuple[str, str, str, str]]:
    """(section, caption, figure name, argument) of every figure of the report, in page order."""
    captures, jobs = data.captures, []
    heaviest = {kind: _most_kurtotic(captures, kind) for kind in chosen}
    if not data.metrics.empty and "loss" in data.metrics:
        jobs.append(("Training", "loss, gradient norm and learning rate", "losses", ""))
    jobs += [("Heatmaps", kind, "heatmaps", kind) for kind in chosen]
    if data.matmuls:
        jobs.append(("Energy and correlation", "E and R of every matmul", "energy", ""))
    if any(s.endswith("/lowprec") for s in captures.table.site.unique()):
        jobs.append(("Low precision", "low-precision error of C", "lowprec", ""))
    if data.reference == "pythia" and data.num_steps and claims.weight_sites(captures):
        caption = "weight tails (max / std over a Gaussian's) over training, against Pythia 70M-1.4B"
        jobs.append(("Pythia reference", caption, "pythia", ""))
    for kind in chosen:
        site = heaviest[kind]
        jobs += [("Histograms", kind, "histograms", kind), ("QQ plots", site, "qq", site)]
        if kind_sites(captures, kind, "massive_channel"):
            jobs.append(("Outlier channels", kind, "outlier_channels", kind))
    for kind in chosen:
        jobs += [
            ("Animations", f"{kind}, all layers", "kind_gif", kind),
            ("Animations", heaviest[kind], "site_gif", heaviest[kind]),
        ]
    return jobs


def _use(data: _Data) -> None:
    global _WORKER
    _WORKER = data


def _start_worker(workdir: Path, out: Path, sites: list[str] | None, steps: list[int], *settings) -> None:
    """Loads a figure process's data: the parent's captures (same steps) and its fits.csv in `out`;
    `settings` are the other fields of `_Data` (criterion, matmuls, num_steps, reference)."""
    captures = restrict(load(workdir, quiet=True), sites, steps)
    fits = pd.read_csv(out / "fits.csv")
    criterion, matmuls, num_steps, reference = settings
    _use(_Data(captures, fits, read_metrics(workdir), matmuls, criterion, num_steps, reference))


def _draw(job: tuple[str, str, str, str], out: Path) -> str:
    """Draws one figure of `_figure_jobs` into `out`; returns its file name."""
    section, caption, figure, argument = job
    suffix = ".gif" if figure.endswith("_gif") else ".png"
    name = _file_name(f"{section}_{caption}")[:120] + suffix
    return DRAW[figure](_WORKER, argument, out / name).name


def _most_kurtotic(captures: Captures, kind: str) -> str:
    """The site of `kind` with the largest excess kurtosis at the last capture (the first if none)."""
    sites = kind_sites(captures, kind, "sample")
    last = {s: site_series(captures, s, "kurtosis").iloc[-1] for s in sites}
    finite = {s: k for s, k in last.items() if pd.notna(k)}
    return max(finite, key=finite.get) if finite else sites[0]


def _findings(
    captures: Captures, fits: pd.DataFrame, chosen: list[str], matmuls: list[str], criterion: str
) -> list[findings.Finding]:
    found = []
    for kind in chosen:
        found += [
            findings.gaussian_to_logistic(fits, captures, kind),
            findings.best_families(fits, captures, kind, criterion),
            findings.kurtosis_peak(captures, kind),
            findings.persistent_channel(captures, kind),
        ]
    found.append(findings.energy_and_correlation(captures, matmuls))
    found += findings.low_precision(captures, matmuls)
    return [f for f in found if f is not None]


OPEN_TOPIC = 6  # a findings topic with more lines than this starts collapsed
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: 0.85em; color: #555; }
details { margin: 0.4em 0; } summary { cursor: pointer; font-weight: 600; }
table.happened th { width: 16em; } .facts { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def _html(
    workdir: Path,
    captures: Captures,
    metrics: pd.DataFrame,
    config: str,
    happened: list[tuple[str, str]],
    found: list[findings.Finding],
    drawn: list[tuple[str, str, str]],
) -> str:
    e = html.escape
    last = metrics.iloc[-1].to_dict() if not metrics.empty else {}
    summary = [
        ("run directory", str(workdir)),
        ("capture steps", ", ".join(str(s) for s in captures.steps)),
        ("sites captured", str(captures.table.site.nunique())),
        ("last logged step", str(int(last["step"])) if "step" in last else "none"),
        ("last loss", f"{last['loss']:.4f}" if pd.notna(last.get("loss")) else "none"),
    ]
    if captures.missing:  # chunks of the probe store that did not read
        gaps = ", ".join(f"steps {first} to {last_step}" for first, last_step in captures.missing)
        summary.append(("captures missing (unreadable chunks)", gaps))
    rows = lambda pairs: "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in pairs)
    topics: dict[str, list[str]] = {}
    for f in found:
        topics.setdefault(f.topic, []).append(f.text)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Training dynamics of {e(workdir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Training dynamics of {e(workdir.name)}</h1>",
        f'<h2>What happened</h2><table class="happened">{rows(happened)}</table>',
        f'<table class="facts">{rows(summary)}</table>',
        "<h2>Findings</h2>",
        *(
            f"<details{' open' * (len(texts) <= OPEN_TOPIC)}><summary>{e(topic)} ({len(texts)})</summary><ul>"
            + "".join(f"<li>{e(t)}</li>" for t in texts)
            + "</ul></details>"
            for topic, texts in topics.items()
        ),
        "<p>Fits: maximum likelihood on the sampled values of each site and step (fits.csv), and binned"
        " maximum likelihood on the linear histogram of every element (fits_histogram.csv); best family"
        " by the criterion named in each heatmap.</p>",
    ]
    section = None
    for name, caption, file in drawn:
        if name != section:
            parts.append(f"<h2>{e(name)}</h2>")
            section = name
        parts.append(
            f'<figure><a href="{e(file)}"><img src="{e(file)}" alt="{e(caption)}"></a>'
            f"<figcaption>{e(caption)} (click: full size)</figcaption></figure>"
        )
    parts += [
        "<h2>Configuration</h2>",
        f"<details><summary>config.json</summary><pre>{e(config)}</pre></details>",
    ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
