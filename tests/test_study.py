"""The study scripts end to end on tiny configs: results written, verdicts traceable to the numbers, one
clear line for bad input."""

import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from tdyn_jax.analysis import claims, levers, pythia
from tdyn_jax.analysis import lowprec_training as lpt
from tdyn_jax.analysis.load import load
from tdyn_jax.analysis.verdicts import Check, verdict
from tests.conftest import ENV, ROOT


def script(name, *args):
    return subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--scale=tiny", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_image(path):
    with Image.open(path) as image:
        image.load()
        assert min(image.size) > 100


def test_seed_claims_tiny(tiny_run, tmp_path):
    """The study on the session's finished tiny run (configs/seed_claims.py:tiny differs from it only in
    fields a resume may change): nothing left to train, every claim measured."""
    shutil.copytree(tiny_run[0], tmp_path / "run", ignore=shutil.ignore_patterns("analysis", "dumps"))
    saved = tmp_path / "run" / "config.json"  # the study refuses another config's run: name it as its own
    saved.write_text(saved.read_text().replace('"name": "tiny"', '"name": "seed_claims_tiny"'))
    out = tmp_path / "results"
    done = script("seed_claims", f"--workdir={tmp_path / 'run'}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nothing to train" in done.stderr
    page = (out / "seed_claims.md").read_text()
    checks = pd.read_csv(out / "seed_claims" / "checks.csv")
    assert sorted(checks.claim.unique()) == ["a", "b", "c", "d"]
    for key, rows in checks.groupby("claim"):
        # the verdict follows from the numbers in checks.csv by the stated rule
        recomputed = verdict([Check(r.measure, r.value, r.sense, r.threshold) for r in rows.itertuples()])
        assert (rows.verdict == recomputed).all()
        assert f"| **{recomputed}** |" in next(
            line for line in page.splitlines() if line.startswith(f"| ({key}) ")
        )
        assert f"({key}) {recomputed}:" in done.stdout
    assert checks.value.notna().sum() >= len(checks) - 2  # tiny captures nearly everything the checks need
    for figure in ("claims.png", "resid_out_histograms.png"):
        assert f"(seed_claims/{figure})" in page
        assert_image(out / "seed_claims" / figure)
    assert "Training: " in page and "min of train steps" in page
    tails = pd.read_csv(out / "seed_claims" / "weight_tails.csv")
    table = load(tmp_path / "run").table
    assert len(tails) > 0 and (tails.progress == tails.step / 20).all()
    for row in tails.itertuples():  # max abs(x - mean) / std of the stored moments, n their count
        stat = table[(table.site == row.site) & (table.step == row.step)].set_index("stat").value
        spread = max(stat["max"] - stat["mean"], stat["mean"] - stat["min"])
        assert row.tail_ratio == pytest.approx(spread / stat["std"], rel=1e-9) and row.n == stat["count"]


def test_pythia_reference_against_the_tiny_run(tiny_run, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "experiments/pythia_reference.py", f"--workdir={tiny_run[0]}", f"--out={out}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    checks = pd.read_csv(out / "pythia_reference" / "checks.csv")
    names = ["pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "run"]
    assert list(checks.claim.unique()) == names
    page = (out / "pythia_reference.md").read_text()
    for key, rows in checks.groupby("claim"):
        recomputed = verdict([Check(r.measure, r.value, r.sense, r.threshold) for r in rows.itertuples()])
        assert (rows.verdict == recomputed).all() and f"({key}) {recomputed}:" in done.stdout
    # the run's row: its weight matrices' last tail ratio against the Gaussian reference of their size
    tails = claims.weight_tails(load(tiny_run[0]), 20)
    last = tails[tails.step == tails.step.max()]
    above = (last.tail_ratio > last.n.map(claims.gaussian_max)).mean()
    scaling = pd.read_csv(out / "pythia_reference" / "scaling.csv").set_index("model")
    run = scaling.loc["this project: tiny"]
    assert run.matrices == tails.site.nunique() and run.share_above == pytest.approx(above)
    assert run.last_ratio == pytest.approx(last.tail_ratio.median())
    assert scaling.loc["19m", "matrices"] == 24 and scaling.loc["1.3b", "matrices"] == 96
    assert "| pythia-70m | 512 | 6 | 24 |" in page
    for figure in ("tails.png", "scaling.png"):
        assert f"(pythia_reference/{figure})" in page
        assert_image(out / "pythia_reference" / figure)


def test_outlier_levers_tiny(tmp_path):
    out = tmp_path / "results"
    grid = ["--lrs=3e-3,1e-2", "--eps=1e-8", "--norms=pre"]
    done = script("outlier_levers", f"--workdir={tmp_path / 'runs'}", f"--out={out}", *grid)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = pd.read_csv(out / "outlier_levers" / "runs.csv")
    assert runs[["lr", "eps", "norm"]].values.tolist() == [[3e-3, 1e-8, "pre"], [1e-2, 1e-8, "pre"]]
    assert (runs.peak_rms_kurtosis >= runs.final_rms_kurtosis).all() and (runs.final_rms_kurtosis >= 1).all()
    assert (tmp_path / "runs" / "lr0.003_eps1e-08_pre" / "probes").is_dir()
    page = (out / "outlier_levers.md").read_text()
    assert page.count("| pre |") == 2
    # one pair of runs is fewer than a lever needs: every lever is inconclusive, none is decided
    assert page.count("**inconclusive**") == 4 and "1 comparable pairs" in page
    assert_image(out / "outlier_levers" / "kurtosis.png")


def test_lowprec_training_tiny(tmp_path):
    out, runs_dir = tmp_path / "results", tmp_path / "runs"
    done = script("lowprec_training", f"--workdir={runs_dir}", f"--out={out}", "--runs=er_fp4_bwd,float32")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = pd.read_csv(out / "lowprec_training" / "runs.csv").set_index("run")
    assert list(runs.index) == ["float32", "er_fp4_bwd"]  # the reference first
    assert runs.loc["er_fp4_bwd", ["forward", "backward"]].tolist() == ["e2m1/er", "e2m1/er"]
    for run in runs.index:
        metrics = pd.read_json(runs_dir / run / "metrics.jsonl", lines=True)
        assert runs.loc[run, "final_loss"] == pytest.approx(metrics.loss.iloc[-1], rel=1e-6)
        assert runs.loc[run, "val_loss"] == pytest.approx(metrics.val_loss.dropna().iloc[-1], rel=1e-6)
    gap = runs.loc["er_fp4_bwd", "val_loss"] - runs.loc["float32", "val_loss"]
    assert runs.loc["er_fp4_bwd", "val_gap"] == pytest.approx(gap, abs=1e-9) and gap != 0
    assert runs.loc["float32", "loss_gap"] == 0 and runs.diverged_at.isna().all()
    assert (runs.peak_rms_kurtosis >= 1).all() and (runs.peak_massive_ratio > 1).all()
    page = (out / "lowprec_training.md").read_text()
    assert page.count("\n| float32 |") == 1 and page.count("\n| er_fp4_bwd |") == 1
    # the pairs the claim compares were not trained: inconclusive, every check not measurable
    assert "**inconclusive**" in page and page.count("| not measurable |") == 4
    assert_image(out / "lowprec_training" / "losses.png")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--norms=sideways"], "error: --norms: unknown sideways; use some of pre, post, none"),
        (["--lrs=fast"], "error: --lrs and --eps take numbers"),
        (["--eps=0"], "error: --lrs and --eps must be positive"),
    ],
)
def test_outlier_levers_bad_grid(tmp_path, args, message):
    done = script("outlier_levers", f"--workdir={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}", *args)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def claim_rows(page: str) -> list[str]:
    """The rows of a results page's claims table (those that end in a bold verdict)."""
    return [line for line in page.splitlines() if re.match(r"\| \([\w.-]+\) .*\| \*\*[a-z ]+\*\* \|$", line)]


def test_committed_pythia_numbers_are_reproduced_from_the_vendored_data():
    """results/pythia_reference/scaling.csv, recomputed from tdyn_jax/reference and the committed
    seed-claims run's weight tails by the rules of tdyn_jax/analysis/pythia.py."""
    committed = pd.read_csv(ROOT / "results" / "pythia_reference" / "scaling.csv")
    run = pythia.run_tails(pd.read_csv(ROOT / "results" / "seed_claims" / "weight_tails.csv"))
    tails = pythia.with_pythia(committed.model.iloc[-1], run)
    again = pythia.scaling_table({label: pythia.tail_measures(frame) for label, frame in tails.items()})
    pd.testing.assert_frame_equal(again, committed, check_dtype=False)


def test_committed_results_trace_to_their_numbers_and_match_the_readme():
    readme = (ROOT / "README.md").read_text()
    seed = (ROOT / "results" / "seed_claims.md").read_text()
    checks = pd.read_csv(ROOT / "results" / "seed_claims" / "checks.csv")
    for key, rows in checks.groupby("claim"):
        recomputed = verdict([Check(r.measure, r.value, r.sense, r.threshold) for r in rows.itertuples()])
        assert (rows.verdict == recomputed).all()
        assert any(row.startswith(f"| ({key}) ") and f"**{recomputed}**" in row for row in claim_rows(seed))
    lever_page = (ROOT / "results" / "outlier_levers.md").read_text()
    found = levers.lever_claims(pd.read_csv(ROOT / "results" / "outlier_levers" / "runs.csv"))
    for claim in found:
        assert any(
            row.startswith(f"| ({claim.key}) ") and f"**{claim.verdict}**" in row
            for row in claim_rows(lever_page)
        )
    lowprec_page = (ROOT / "results" / "lowprec_training.md").read_text()
    runs = pd.read_csv(ROOT / "results" / "lowprec_training" / "runs.csv")
    er = lpt.er_claim(runs)
    assert any(f"**{er.verdict}**" in row for row in claim_rows(lowprec_page) if row.startswith("| (er) "))
    pythia_page = (ROOT / "results" / "pythia_reference.md").read_text()
    pythia_checks = pd.read_csv(ROOT / "results" / "pythia_reference" / "checks.csv")
    for key, rows in pythia_checks.groupby("claim"):
        recomputed = verdict([Check(r.measure, r.value, r.sense, r.threshold) for r in rows.itertuples()])
        assert (rows.verdict == recomputed).all()
        assert any(
            row.startswith(f"| ({key}) ") and f"**{recomputed}**" in row for row in claim_rows(pythia_page)
        )
    for row in claim_rows(seed) + claim_rows(lever_page) + claim_rows(lowprec_page) + claim_rows(pythia_page):
        assert row in readme, row
    for image in re.findall(r"\]\((results/[^)]+\.png)\)", readme):
        assert_image(ROOT / image)
    assert len(re.findall(r"\]\((results/[^)]+\.png)\)", readme)) >= 2
