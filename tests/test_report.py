"""The analysis report of a tiny run: every figure function writes a valid image, the page references
only images that exist, experiments/analyze.py with its filters and its errors, and the page renders in
headless Chromium."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ENV, ROOT
from PIL import Image

from tdyn_jax.analysis import animate, load, plots
from tdyn_jax.analysis.fit import BINNED_FAMILIES, FAMILIES, fit_captures
from tdyn_jax.analysis.report import read_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _check_image(path, frames=None):
    assert path.exists() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100
        if frames is not None:
            assert image.n_frames == frames


def test_main_job_writes_a_report_whose_images_exist(tiny_run):
    workdir, done = tiny_run
    page = workdir / "analysis" / "report.html"
    assert f"report: {page}" in done.stdout
    text = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) >= 8
    steps = len(load(workdir).steps)
    for name in images:
        _check_image(page.parent / name, frames=steps if name.endswith(".gif") else None)
    assert "logistic beats Gaussian" in text or "fits as well as the logistic" in text
    assert "peak excess kurtosis" in text and "E spans a median" in text
    fits = pd.read_csv(workdir / "analysis" / "fits.csv")
    captures = load(workdir)
    assert len(fits) == len(captures.steps) * len(captures.arrays["sample"].sites) * len(FAMILIES)
    assert set(fits.family) == set(FAMILIES)
    binned = pd.read_csv(workdir / "analysis" / "fits_histogram.csv")
    hist_sites = captures.arrays["lin_hist"].sites
    assert len(binned) == len(captures.steps) * len(hist_sites) * len(BINNED_FAMILIES)
    hist = captures.arrays["lin_hist"]
    occupied = {
        (step, site): (hist.site(site)[i] > 0).sum()
        for i, step in enumerate(hist.steps)
        for site in hist.sites
    }
    one_bin = np.array([occupied[key] < 2 for key in zip(binned.step, binned.site, strict=True)])
    assert (binned.scale.isna().to_numpy() == one_bin).all()  # a histogram with one occupied bin has no shape
    assert one_bin.mean() < 0.2


def test_each_figure_function_writes_a_valid_image(tiny_run, tmp_path):
    workdir, _ = tiny_run
    captures = load(workdir)
    fits = fit_captures(captures)
    matmuls = ["mlp/up", "attn/scores"]
    written = [
        plots.histograms(captures, fits, "resid/out", tmp_path / "hist.png"),
        plots.qq(captures, fits, "layer_01/resid/out", tmp_path / "qq.png"),
        plots.heatmaps(captures, fits, "resid/out", tmp_path / "heat.png", "aic"),
        plots.energy(captures, matmuls, tmp_path / "energy.png"),
        plots.lowprec(captures, matmuls, tmp_path / "lowprec.png"),
        plots.outlier_channels(captures, "resid/mid", tmp_path / "channels.png"),
        plots.losses(read_metrics(workdir), tmp_path / "loss.png"),
    ]
    for path in written:
        _check_image(path)
    _check_image(animate.kind_gif(captures, fits, "resid/out", tmp_path / "a.gif"), frames=5)
    one = animate.histograms_gif(captures, fits, ["layer_00/mlp/up/R"], tmp_path / "b.gif", "R")
    _check_image(one, frames=5)


def _analyze(*args):
    return subprocess.run(
        [sys.executable, "experiments/analyze.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True
    )


def test_the_report_first_states_what_happened(tiny_run):
    """The summary at the top states the run's own numbers, each recomputed here from metrics.jsonl,
    the captures and fits.csv."""
    workdir, _ = tiny_run
    text = (workdir / "analysis" / "report.html").read_text()
    table = re.search(r'<h2>What happened</h2><table class="happened">(.*?)</table>', text).group(1)
    said = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table))
    assert text.index("What happened") < text.index("<h2>Findings</h2>")
    metrics = pd.read_json(workdir / "metrics.jsonl", lines=True)
    first, last = metrics.iloc[0], metrics.iloc[-1]
    assert said["loss"].startswith(f"{first.loss:.4f} at step 5 -&gt; {last.loss:.4f} at step 20;")
    assert said["loss"].endswith(f"validation {metrics.val_loss.dropna().iloc[-1]:.4f} at step 20")
    t = load(workdir).table
    kurt = t[(t.stat == "kurtosis") & ~t.site.str.startswith(("params/", "grads/", "updates/", "nu/"))]
    kurt = kurt[~kurt.site.str.rsplit("/", n=1).str[-1].isin(["a_norm", "w_norm", "E", "R", "lowprec"])]
    top = kurt.loc[kurt.value.idxmax()]
    assert said["heaviest tails (excess kurtosis)"].startswith(
        f"{top.site}: {top.value:.3g} at step {top.step}"
    )
    last_step = t.step.max()
    gemm = t[(t.step == last_step) & t.stat.str.match(r"gemm/.*/rel_err")].groupby("stat").value.median()
    best = gemm.idxmin().removeprefix("gemm/").removesuffix("/rel_err")
    assert said["low precision, computing C"].startswith(
        f"best {best} (median relative error of C {gemm.min():.3g})"
    )
    fits = pd.read_csv(workdir / "analysis" / "fits.csv")
    resid = fits[fits.site.str.endswith("/resid/out")].pivot_table(
        index=["site", "step"], columns="family", values="aic"
    )
    wins = (resid.logistic < resid.gaussian).groupby(level="site").apply(list)
    onsets = {}
    for site, flags in wins.items():  # the first step from which the logistic wins at every later capture
        steps = sorted(fits[fits.site == site].step.unique())
        if flags[-1]:
            onsets[site] = next(steps[i] for i in range(len(flags)) if all(flags[i:]))
    if onsets:
        assert said["resid/out turns logistic"].startswith(f"from step {min(onsets.values())} (first layer)")
    else:
        assert said["resid/out turns logistic"].startswith("Gaussian as good as logistic")
    assert said["non-finite"] == "none"
    assert text.count("<details open><summary>") >= 3  # findings grouped by topic, each collapsible
    assert "<details><summary>low precision (" in text  # a long topic starts collapsed
    for name in re.findall(r'<img src="([^"]+)"', text):
        assert f'<a href="{name}"><img src="{name}"' in text  # each figure opens full size


def test_analyze_command_filters_sites_and_steps(tiny_run, tmp_path):
    source, _ = tiny_run
    w = tmp_path / "run"
    shutil.copytree(source, w, ignore=shutil.ignore_patterns("analysis"))
    sites = "--sites=resid/out,params/*/attn/q/kernel"
    done = _analyze(f"--workdir={w}", sites, "--steps=0,15", "--kinds=resid/out", "--reference=pythia")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"report: {w / 'analysis' / 'report.html'}"
    fits = pd.read_csv(w / "analysis" / "fits.csv")
    assert sorted(fits.step.unique()) == [0, 15]
    assert sorted(fits.site.unique()) == [
        "layer_00/resid/out", "layer_01/resid/out", "params/layer_00/attn/q/kernel",
        "params/layer_01/attn/q/kernel",
    ]  # fmt: skip
    page = (w / "analysis" / "report.html").read_text()
    figure = re.search(r'<h2>Pythia reference</h2>\n<figure><a href="([^"]+)"><img', page)
    assert figure, "analysis.reference=pythia draws the run's weight tails over Pythia's"
    with Image.open(w / "analysis" / figure.group(1)) as image:
        assert min(image.size) > 100
    # its refusals (steps, sites and kinds that match nothing, no run directory) are in test_mistakes.py


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright

    workdir, _ = tiny_run
    page_path = workdir / "analysis" / "report.html"
    problems = []
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.src, i.complete, i.naturalWidth])"
        )
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert images and all(complete and width > 0 for _, complete, width in images), images
    _check_image(tmp_path / "report.png")
