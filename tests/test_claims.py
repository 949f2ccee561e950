"""The verdict rules of the seed claims and the lever sweep, on synthetic captures whose answer is known,
and the reference quantiles against simulation."""

import numpy as np
import pandas as pd
import pytest

from tdyn_jax.analysis import claims, levers, study
from tdyn_jax.analysis import lowprec_training as lpt
from tdyn_jax.analysis.load import Captures, ProbeArray
from tdyn_jax.analysis.verdicts import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Check,
    Claim,
    markdown,
    verdict,
)
from tdyn_jax.probes.naming import layer_of

STEPS = [0, 10, 50, 100]
NUM_STEPS = 200  # early: steps <= 50
N = 4096


def captures_of(values: dict[tuple[int, str, str], float], arrays: dict | None = None) -> Captures:
    """Captures from {(step, site, stat): value}."""
    rows = [
        {"step": step, "site": site, "layer": layer_of(site), "stat": stat, "value": value}
        for (step, site, stat), value in values.items()
    ]
    return Captures(pd.DataFrame(rows), arrays or {})


def moments_of(site: str, step: int, ratio: float, kurtosis: float = 0.0, count: float = N) -> dict:
    """min/max/mean/std/count/kurtosis of a site whose max|x - mean| / std is `ratio`."""
    stats = {"mean": 0.0, "std": 1.0, "max": ratio, "min": -ratio / 2, "count": count, "kurtosis": kurtosis}
    return {(step, site, k): v for k, v in stats.items()}


def fits_of(rows: list[tuple[int, str, str, float, float]]) -> pd.DataFrame:
    """A fits table from (step, site, family, mean_loglik, ks) rows."""
    return pd.DataFrame(
        [
            {"step": s, "site": site, "family": f, "n": N, "mean_loglik": ll, "aic": 4 - 2 * N * ll, "ks": ks}
            for s, site, f, ll, ks in rows
        ]
    )


def check(value: float, sense: str = ">=", threshold: float = 0.5) -> Check:
    return Check("x", value, sense, threshold)


# ----------------------------------------------------------------------------------------------------
# verdict rule
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, expected",
    [
        ((0.6, 0.7, 0.9), SUPPORTED),
        ((0.4, 0.7, 0.9), NOT_SUPPORTED),
        ((0.4, 0.1, 0.1), NOT_SUPPORTED),
        ((0.6, 0.1, 0.9), INCONCLUSIVE),
        ((np.nan, 0.7, 0.9), INCONCLUSIVE),
        ((0.6, np.nan), INCONCLUSIVE),
        ((0.5,), SUPPORTED),  # the threshold itself holds
    ],
)
def test_verdict_rule(values, expected):
    assert verdict([check(v) for v in values]) == expected


def test_check_sense_and_nan():
    assert check(0.3, "<=", 0.5).holds is True and check(0.7, "<=", 0.5).holds is False
    assert check(float("inf")).holds is None and check(float("nan")).holds is None
    with pytest.raises(ValueError, match="sense"):
        Check("x", 1.0, ">", 0.5)


def test_markdown_escapes_pipes_and_lists_every_check():
    claim = Claim("z", "a | b", (Check("share of |x|", 0.7, ">=", 0.5, "2 | 3"), check(0.1)))
    text = markdown([claim])
    assert "a \\| b" in text and "share of \\|x\\|" in text
    assert "| (z) a \\| b | 0.7: 2 \\| 3 | share of \\|x\\| ≥ 0.5 | 1 of 2 | **inconclusive** |" in text
    assert text.count("| (z) |") == 2


# ----------------------------------------------------------------------------------------------------
# reference quantiles
# ----------------------------------------------------------------------------------------------------


def test_tail_references_match_simulation():
    rng = np.random.default_rng(1)
    n, trials = 500, 20000
    gauss = np.abs(rng.standard_normal((trials, n))).max(axis=1)
    logistic = np.abs(rng.logistic(0.0, np.sqrt(3) / np.pi, (trials, n))).max(axis=1)  # std 1
    for q in (0.5, 0.99):
        assert claims.gaussian_max(n, q) == pytest.approx(np.quantile(gauss, q), rel=0.02)
        assert claims.logistic_max(n, q) == pytest.approx(np.quantile(logistic, q), rel=0.03)
    assert claims.gaussian_max(4.0e5) < claims.logistic_max(4.0e5)  # logistic tails are heavier


def test_gaussian_ks_critical_rejects_one_percent_of_gaussians_and_most_laplace():
    from tdyn_jax.analysis.fit import fit, ks_statistic

    n = 1024
    critical = claims.gaussian_ks_critical(n)
    rng = np.random.default_rng(7)
    gauss = rng.standard_normal((1000, n))
    laplace = rng.laplace(size=(200, n))
    reject = lambda x: ks_statistic("gaussian", x, fit(x, "gaussian").params) > critical
    assert 0.002 <= reject(gauss).mean() <= 0.025  # 1% +- binomial noise
    assert reject(laplace).mean() > 0.9


# ----------------------------------------------------------------------------------------------------
# claims on synthetic captures
# ----------------------------------------------------------------------------------------------------

WEIGHTS = [f"params/layer_0{i}/mlp/up/kernel" for i in range(4)]


def weights_captures(final_ratio: float) -> Captures:
    """Tail ratio 4.0 at step 0 (Gaussian-like for 4096 values), `final_ratio` from step 10 on."""
    values = {}
    for site in WEIGHTS:
        for step in STEPS:
            values |= moments_of(site, step, 4.0 if step == 0 else final_ratio)
    return captures_of(values)


def test_weights_claim_supported_refuted_and_partial():
    small_ks = fits_of([(s, w, "gaussian", -1.4, 0.004) for s in STEPS for w in WEIGHTS])
    found = claims.weights_claim(weights_captures(9.0), small_ks, NUM_STEPS)
    assert [c.holds for c in found.checks] == [True, True, True] and found.verdict == SUPPORTED
    # tails stay Gaussian (4.0 < ~4.5 for 4096 values): only the bulk holds
    found = claims.weights_claim(weights_captures(4.0), small_ks, NUM_STEPS)
    assert found.checks[1].holds is False and found.verdict == INCONCLUSIVE
    # a bulk the KS test rejects everywhere (critical about 0.016 for 4096 values)
    big_ks = small_ks.assign(ks=0.05)
    assert claims.weights_claim(weights_captures(9.0), big_ks, NUM_STEPS).verdict == NOT_SUPPORTED


def test_weights_claim_change_after_the_early_phase_fails_the_sharpness_check():
    values = {}
    for site in WEIGHTS:
        for step, ratio in zip(STEPS, (4.0, 4.1, 4.2, 9.0), strict=True):
            values |= moments_of(site, step, ratio)
    fits = fits_of([(s, w, "gaussian", -1.4, 0.004) for s in STEPS for w in WEIGHTS])
    found = claims.weights_claim(captures_of(values), fits, NUM_STEPS)
    assert found.checks[2].value == pytest.approx(0.2 / 5.0)
    assert found.verdict == INCONCLUSIVE


RESID = [f"layer_0{i}/resid/out" for i in range(4)]


def residual_inputs(onset: int | None, final_ratio: float, channels: np.ndarray):
    """Gaussian fits better until `onset`, logistic from it on; tail ratio 4 then `final_ratio`; the
    top-1 channel of each layer at each capture from `channels` (steps, layers)."""
    rows, values = [], {}
    for step in STEPS:
        logistic_wins = onset is not None and step >= onset
        for site in RESID:
            rows += [
                (step, site, "gaussian", -1.40, 0.01),
                (step, site, "logistic", -1.38 if logistic_wins else -1.42, 0.01),
            ]
            values |= moments_of(site, step, 4.0 if step == 0 else final_ratio, count=4.0e5)
    top = np.zeros((len(STEPS), len(RESID), 4), np.float32)
    top[:, :, 0] = channels
    arrays = {"massive_channel": ProbeArray(np.array(STEPS), RESID, top)}
    return captures_of(values, arrays), fits_of(rows)


def test_residual_claim_rules():
    persistent = np.array([[5, 6, 7, 8], [3, 3, 3, 3], [3, 3, 9, 3], [3, 3, 3, 3]])  # channel 3, 3 of 3
    captures, fits = residual_inputs(10, 20.0, persistent)
    found = claims.residual_claim(captures, fits, NUM_STEPS)
    assert [c.holds for c in found.checks] == [True, True, True] and found.verdict == SUPPORTED
    assert found.checks[2].value == 1.0
    # onset after the early phase (step 100 > 50): the core fails
    captures, fits = residual_inputs(100, 20.0, persistent)
    assert claims.residual_claim(captures, fits, NUM_STEPS).verdict == NOT_SUPPORTED
    # never logistic
    captures, fits = residual_inputs(None, 20.0, persistent)
    assert claims.residual_claim(captures, fits, NUM_STEPS).checks[0].value == 0.0
    # early logistic but tails within a logistic's (about 7.9 for 4e5 values) and wandering channels
    wandering = np.arange(len(STEPS) * len(RESID)).reshape(len(STEPS), len(RESID))
    captures, fits = residual_inputs(10, 6.0, wandering)
    found = claims.residual_claim(captures, fits, NUM_STEPS)
    assert [c.holds for c in found.checks] == [True, False, False] and found.verdict == INCONCLUSIVE


def gradient_captures(weight_kurtosis: float, resid_kurtosis: float, ratio: float) -> Captures:
    values = {}
    for step in STEPS:
        for i in range(4):
            values |= moments_of(f"grads/layer_0{i}/mlp/up/kernel", step, ratio, weight_kurtosis)
            values |= moments_of(f"layer_0{i}/resid/out/grad", step, ratio, resid_kurtosis)
    return captures_of(values)


def test_gradients_claim_rules():
    found = claims.gradients_claim(gradient_captures(0.3, 0.5, 5.0))
    assert [c.holds for c in found.checks] == [True, True, True] and found.verdict == SUPPORTED
    assert claims.gradients_claim(gradient_captures(5.0, 0.5, 5.0)).verdict == NOT_SUPPORTED
    found = claims.gradients_claim(gradient_captures(0.3, 7.0, 30.0))  # heavy activation gradients
    assert [c.holds for c in found.checks] == [True, False, False] and found.verdict == INCONCLUSIVE


def energy_captures(er: float, aw: float, e_range: float, share_r: float) -> Captures:
    values = {}
    for step in (0, 100):
        for i in range(3):
            site = f"layer_0{i}/mlp/up"
            values[(step, f"{site}/lowprec", "store/er/exact/r8/rel_err")] = er
            values[(step, f"{site}/lowprec", "store/er/e3/r8/rel_err")] = 2 * er
            values[(step, f"{site}/lowprec", "store/er/e0/r8/rel_err")] = 0.2
            values[(step, f"{site}/lowprec", "store/e4m3/row/rel_err")] = aw
            values[(step, f"{site}/lowprec", "store/int8/tensor/rel_err")] = 10 * aw
            values[(step, f"{site}/lowprec", "store/mxfp4/block/rel_err")] = aw / 100  # 4-bit: not compared
            values[(step, f"{site}/lowprec", "gemm/e4m3/channel/rel_err")] = aw / 100  # another question
            values[(step, f"{site}/E", "log2_range")] = e_range
            values[(step, f"{site}/R", "share_r")] = share_r
    return captures_of(values)


def test_energy_claim_rules():
    found = claims.energy_claim(energy_captures(0.01, 0.02, 9.0, 0.8))
    assert found.checks[0].value == pytest.approx(0.5) and found.verdict == SUPPORTED
    assert claims.energy_claim(energy_captures(0.03, 0.02, 9.0, 0.8)).verdict == NOT_SUPPORTED
    found = claims.energy_claim(energy_captures(0.01, 0.02, 2.0, 0.8))  # narrow E
    assert [c.holds for c in found.checks] == [True, False, True] and found.verdict == INCONCLUSIVE
    empty = claims.energy_claim(captures_of({(0, "layer_00/mlp/up/R", "share_r"): 0.8}))
    assert empty.checks[0].holds is None and empty.verdict == INCONCLUSIVE


# ----------------------------------------------------------------------------------------------------
# levers
# ----------------------------------------------------------------------------------------------------


def sweep(kurtosis) -> pd.DataFrame:
    """A full 2 x 2 x 3 sweep table whose peak and final RMS kurtosis is kurtosis(lr, eps, norm)."""
    rows = []
    for lr in (1e-3, 4e-3):
        for eps in (1e-8, 1e-4):
            for norm in ("pre", "post", "none"):
                k = kurtosis(lr, eps, norm)
                rows.append(
                    {"lr": lr, "eps": eps, "norm": norm, "peak_rms_kurtosis": k, "final_rms_kurtosis": k}
                )
    return pd.DataFrame(rows)


def test_levers_as_he_et_al_describe_are_all_supported():
    norm_effect = {"pre": 3.0, "post": 2.0, "none": 1.0}
    table = sweep(lambda lr, eps, norm: norm_effect[norm] * lr * 1e3 / (1 + eps * 1e4))
    found = levers.lever_claims(table)
    assert [c.key for c in found] == ["lr", "eps", "pre", "none"]
    assert all(c.verdict == SUPPORTED for c in found)
    assert (
        found[0].checks[0].detail == "6 comparable pairs"
        and found[2].checks[0].detail == "4 comparable pairs"
    )


def test_levers_reversed_diverged_and_unvaried():
    table = sweep(lambda lr, eps, norm: 1.0 / lr)  # a larger lr lowers it; norms and eps do nothing
    found = {c.key: c for c in levers.lever_claims(table)}
    assert found["lr"].checks[0].value == 0.0 and found["lr"].verdict == NOT_SUPPORTED
    assert found["eps"].verdict == NOT_SUPPORTED  # ties are not raises
    # diverged runs (nan) leave too few pairs to decide
    table = sweep(lambda lr, eps, norm: np.nan if lr > 1e-3 else 1.0)
    assert levers.paired_share(table, "lr", 4e-3, 1e-3, "peak_rms_kurtosis") == (
        pytest.approx(np.nan, nan_ok=True),
        0,
    )
    assert levers.lever_claims(table)[0].verdict == INCONCLUSIVE
    # a factor with one value: no pairs
    one_eps = table[table.eps == 1e-8]
    assert levers.lever_claims(one_eps)[1].checks[0].holds is None


def test_run_summary_peak_final_and_divergence():
    values = {}
    for step, ks in zip(STEPS, ([1.0, 2.0], [5.0, 3.0], [4.0, 6.0], [2.0, 2.5]), strict=True):
        for layer, k in enumerate(ks):
            site = f"layer_0{layer}/resid/out"
            values[(step, site, "rms_kurtosis")] = k
            values[(step, site, "kurtosis")] = k - 1
            values[(step, site, "int8_outlier_channels")] = float(layer)
    captures = captures_of(values)
    metrics = pd.DataFrame({"step": [50, 100], "loss": [3.0, 2.5], "val_loss": [np.nan, 2.7]})
    got = levers.run_summary(captures, metrics)
    assert got["peak_rms_kurtosis"] == 6.0 and got["final_rms_kurtosis"] == 2.5
    assert got["peak_kurtosis"] == 5.0 and got["final_outlier_channels"] == 1.0
    assert got["final_loss"] == 2.5 and got["val_loss"] == 2.7
    diverged = levers.run_summary(captures, metrics.assign(loss=[3.0, np.nan]))
    assert np.isnan(diverged["peak_rms_kurtosis"]) and np.isnan(diverged["final_outlier_channels"])


def test_training_seconds_from_metrics():
    metrics = pd.DataFrame(
        {"step": [10, 30, 40], "step_time_s": [0.5, 0.25, 1.0], "compile_s": [20.0, np.nan, np.nan]}
    )
    assert study.training_seconds(metrics) == pytest.approx(10 * 0.5 + 20 * 0.25 + 10 * 1.0 + 20.0)
    assert np.isnan(study.training_seconds(pd.DataFrame()))


def test_lowprec_divergence_step():
    reference = pd.DataFrame({"step": [20, 40, 60, 80], "loss": [4.0, 3.0, 2.5, 2.0]})
    close = reference.assign(loss=[4.1, 3.5, 3.4, 2.9])  # within 1 nat of float32 at every step
    assert np.isnan(lpt.divergence_step(close, reference, None))
    assert lpt.divergence_step(reference.assign(loss=[4.1, 3.5, 3.6, 2.9]), reference, None) == 60
    assert lpt.divergence_step(reference.assign(loss=[4.1, np.inf, 2.6, 2.1]), reference, None) == 40
    assert lpt.divergence_step(close.iloc[:2], reference, 47) == 47  # a non-finite loss stopped the run


def lowprec_table(**gaps):
    """A runs table with the E/R pairs' validation gaps (a string value: diverged at that step)."""
    rows = []
    for pair in lpt.ER_PAIRS:
        for run in pair:
            value = gaps.get(run, 0.05)
            if isinstance(value, str):  # diverged: its last gap is whatever it was
                rows.append({"run": run, "val_gap": 9.0, "diverged_at": float(value[1:])})
            else:
                rows.append({"run": run, "val_gap": value, "diverged_at": np.nan})
    return pd.DataFrame(rows)


def test_er_claim_rules():
    better = {er: 0.01 for er, _ in lpt.ER_PAIRS}
    assert lpt.er_claim(lowprec_table(**better)).verdict == SUPPORTED
    claim = lpt.er_claim(lowprec_table(**{**better, "er_fp4": 0.2}))
    assert claim.verdict == NOT_SUPPORTED and claim.checks[0].value == pytest.approx(0.15)
    assert lpt.er_claim(lowprec_table(**{**better, "er_fp8_bwd": 0.2})).verdict == INCONCLUSIVE
    # a diverged run counts as DIVERGED_GAP: the channel run diverging makes the split the better one
    claim = lpt.er_claim(lowprec_table(**{**better, "fp4_channel": "@120"}))
    assert claim.checks[0].value == pytest.approx(0.01 - lpt.DIVERGED_GAP) and claim.verdict == SUPPORTED
    assert "fp4_channel diverged at step 120" in claim.checks[0].detail
    both = lpt.er_claim(lowprec_table(**{**better, "er_fp4": "@80", "fp4_channel": "@120"}))
    assert both.checks[0].holds is None and both.verdict == INCONCLUSIVE
    missing = lpt.er_claim(lowprec_table(**better).iloc[2:])
    assert np.isnan(missing.checks[0].value) and missing.verdict == INCONCLUSIVE
