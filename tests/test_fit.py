"""Distribution fits against scipy.stats in float64, model selection on samples of known family, the
Hill tail index, and rows that cannot be fitted."""

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from tdyn_jax.analysis import fit

SCIPY = {
    "gaussian": scipy.stats.norm,
    "logistic": scipy.stats.logistic,
    "laplace": scipy.stats.laplace,
    "student_t": scipy.stats.t,
}


def _samples(family, rows, size, seed):
    rng = np.random.default_rng(seed)
    if family == "gaussian":
        return rng.normal(0.3, 2.0, (rows, size))
    if family == "logistic":
        return rng.logistic(-1.0, 0.5, (rows, size))
    if family == "laplace":
        return rng.laplace(0.2, 1.5, (rows, size))
    return 0.1 + 3.0 * rng.standard_t(4.0, (rows, size))


def _tight(func, x0, args=(), disp=0):
    """Nelder-Mead run to convergence: scipy's default tolerances stop near 1e-4."""
    return scipy.optimize.fmin(
        func, x0, args=args, xtol=1e-12, ftol=1e-14, maxiter=40_000, maxfun=80_000, disp=0
    )


def _scipy_params(family, x):
    """scipy's fit in fit.PARAMS order (loc, scale[, df])."""
    if family == "student_t":
        df, loc, scale = scipy.stats.t.fit(x, optimizer=_tight)
        return np.array([loc, scale, df])
    return np.array(SCIPY[family].fit(x))


@pytest.mark.parametrize("family", fit.FAMILIES)
def test_fit_matches_scipy(family):
    rows = 1 if family == "student_t" else 3  # scipy's Student-t fit takes seconds per row
    x = _samples(family, rows, 4096, seed=1)
    x = x.astype(np.float32).astype(np.float64)  # captured samples are float32
    padded = np.concatenate([x, np.full((rows, 100), np.nan)], axis=1)  # nan padding is ignored
    got = fit.fit(padded, family)
    k = len(fit.PARAMS[family])
    for i in range(rows):
        expected = _scipy_params(family, x[i])
        np.testing.assert_allclose(got.params[i], expected, rtol=1e-4, atol=1e-8)
        frozen = SCIPY[family](*((expected[2], *expected[:2]) if family == "student_t" else expected))
        loglik = frozen.logpdf(x[i]).sum()
        np.testing.assert_allclose(got.mean_loglik[i], loglik / x.shape[1], rtol=1e-8)
        np.testing.assert_allclose(got.aic[i], 2 * k - 2 * loglik, rtol=1e-8)
        np.testing.assert_allclose(got.bic[i], k * np.log(x.shape[1]) - 2 * loglik, rtol=1e-8)
        np.testing.assert_allclose(got.ks[i], scipy.stats.kstest(x[i], frozen.cdf).statistic, rtol=1e-6)
        assert got.n[i] == x.shape[1]


@pytest.mark.parametrize("family", fit.FAMILIES)
def test_synthetic_samples_are_classified_as_their_family(family):
    x = _samples(family, 10, 4096, seed=2)
    table = fit.fit_samples(x)
    table["step"], table["site"] = 0, table.pop("row")
    assert (fit.best_family(table, "bic") == family).all()


def test_aic_prefers_the_heavier_tail_on_a_student_t_sample():
    table = fit.fit_samples(_samples("student_t", 4, 4096, seed=3))
    table["step"], table["site"] = 0, table.pop("row")
    assert (fit.best_family(table, "aic") == "student_t").all()


def _hill_reference(x, k):
    a = np.sort(np.abs(x))[::-1]
    return 1 / (np.mean(np.log(a[:k])) - np.log(a[k]))


def test_hill_tail_index():
    rng = np.random.default_rng(4)
    pareto = rng.pareto(3.0, (3, 20_000)) + 1.0  # P(X > x) = x^-3
    got = fit.hill_tail_index(pareto)
    k = int(np.sqrt(20_000))
    np.testing.assert_allclose(got, [_hill_reference(row, k) for row in pareto], rtol=1e-12)
    np.testing.assert_allclose(got, 3.0, rtol=0.15)  # k = 141 order statistics: about 8% error
    x = rng.standard_t(2.0, (1, 4096))
    padded = np.concatenate([x, np.full((1, 50), np.nan)], axis=1)
    np.testing.assert_allclose(fit.hill_tail_index(padded, k=100), [_hill_reference(x[0], 100)], rtol=1e-12)


def test_rows_that_cannot_be_fitted_are_nan():
    constant = np.full((1, 100), 0.5)
    few = np.concatenate([np.arange(fit.MIN_COUNT - 1.0), np.full(93, np.nan)])[None]
    good = np.random.default_rng(5).normal(size=(1, 100))
    for family in fit.FAMILIES:
        result = fit.fit(np.concatenate([constant, few, good]), family)
        assert np.isnan(result.params[:2]).all() and np.isnan(result.aic[:2]).all()
        assert np.isfinite(result.params[2]).all() and np.isfinite(result.aic[2])
    with pytest.raises(ValueError, match="unknown family 'cauchy'"):
        fit.fit(good, "cauchy")


def test_student_t_df_is_capped_on_a_gaussian_sample():
    x = np.random.default_rng(6).normal(size=(2, 4096))
    result = fit.fit(x, "student_t")
    assert (result.params[:, 2] > 30).all() and (result.params[:, 2] <= fit.MAX_DF).all()
    gauss = fit.fit(x, "gaussian")
    np.testing.assert_allclose(result.mean_loglik, gauss.mean_loglik, atol=2e-3)


def _binned_nll(dist, counts, edges):
    """Negative binned log-likelihood given the histogram range, float64, straight from scipy."""

    def nll(theta):
        frozen = dist(theta[0], np.exp(theta[1]))
        p = np.diff(frozen.cdf(edges)) / (frozen.cdf(edges[-1]) - frozen.cdf(edges[0]))
        return -(counts * np.log(np.maximum(p, 1e-300))).sum()

    return nll


@pytest.mark.parametrize("family", fit.BINNED_FAMILIES)
def test_binned_fit_of_a_histogram_matches_scipy(family):
    x = _samples(family, 1, 200_000, seed=7)[0]
    counts, edges = np.histogram(x, bins=np.linspace(x.min(), x.max(), 65))
    got = fit.fit_histogram(counts[None], edges[None], family)
    nll = _binned_nll(SCIPY[family], counts, edges)
    options = {"xatol": 1e-12, "fatol": 1e-12, "maxiter": 20_000}
    best = scipy.optimize.minimize(nll, [x.mean(), np.log(x.std())], method="Nelder-Mead", options=options)
    np.testing.assert_allclose(got.params[0], [best.x[0], np.exp(best.x[1])], rtol=1e-4)
    np.testing.assert_allclose(got.mean_loglik[0] * counts.sum(), -best.fun, rtol=1e-9)
    np.testing.assert_allclose(got.params[0], _scipy_params(family, x), rtol=0.01)  # close to the sample fit
    cdf = SCIPY[family](*got.params[0]).cdf(edges)
    fitted = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    np.testing.assert_allclose(
        got.ks[0], np.abs(np.cumsum(counts) / counts.sum() - fitted[1:]).max(), atol=1e-9
    )


# Adam's second moment of an MLP kernel at step 0 of configs/small.py: a histogram that falls off
# steeply from its lower edge (64 bins on [1.02e-19, 3.46e-7]; here in units of the bin width)
NU_BINS = [*range(37), 38, 39, 42, 43, 44, 46, 55, 57, 58, 63]
NU_COUNTS = [
    123390,
    11821,
    4670,
    2489,
    1509,
    946,
    636,
    436,
    348,
    248,
    196,
    138,
    122,
    101,
    55,
    60,
    38,
    51,
    26,
    21,
    23,
    16,
    25,
    13,
    5,
    8,
    9,
    4,
    5,
    7,
    4,
    5,
    3,
    6,
    4,
    1,
    4,
    1,
    3,
    2,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
]


def test_binned_fit_of_a_one_sided_histogram_is_a_true_maximum():
    """On a histogram that only falls off, the likelihood of a fit is largest with the centre far
    below the range (a Laplace's tail is then exactly exponential, a Gaussian's nearly): each fit
    equals scipy's best binned log-likelihood from several starts (the Gaussian's supremum lies at the
    end of a ridge that leaves the range: it stops within 0.005 nats per count of it), and never
    exceeds it, as a fit whose range held no probability at all once did (mean log-likelihood 0)."""
    counts = np.zeros(64)
    counts[NU_BINS] = NU_COUNTS
    edges = np.linspace(1.0248964e-19, 3.461324e-07, 65)
    width = edges[1] - edges[0]
    for family in fit.BINNED_FAMILIES:
        dist = SCIPY[family]

        def nll(theta, dist=dist):  # in the upper tail (sf): exact with the centre far below the range
            sf = dist(edges[0] + theta[0] * width, np.exp(theta[1]) * width).sf(edges)
            inside = sf[0] - sf[-1]
            return (
                -(counts * np.log(np.maximum(-np.diff(sf) / inside, 1e-300))).sum() if inside > 0 else np.inf
            )

        options = {"xatol": 1e-10, "fatol": 1e-10, "maxiter": 20_000}
        starts = ([0.0, 0.0], [-2.0, 0.5], [1.0, 1.0], [0.0, -1.0])
        best = min(scipy.optimize.minimize(nll, x, method="Nelder-Mead", options=options).fun for x in starts)
        got = fit.fit_histogram(counts[None], edges[None], family)
        want = -best / counts.sum()
        assert got.mean_loglik[0] <= want + 1e-9, family
        tol = 5e-3 if family == "gaussian" else 1e-9
        np.testing.assert_allclose(got.mean_loglik[0], want, atol=tol, rtol=0, err_msg=family)


def test_binned_fit_tells_the_families_apart():
    for family in fit.BINNED_FAMILIES:
        x = _samples(family, 1, 100_000, seed=8)[0]
        counts, edges = np.histogram(x, bins=np.linspace(x.min(), x.max(), 65))
        aic = [fit.fit_histogram(counts[None], edges[None], f).aic[0] for f in fit.BINNED_FAMILIES]
        assert fit.BINNED_FAMILIES[int(np.argmin(aic))] == family
