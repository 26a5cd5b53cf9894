"""Standard errors and intervals of MLE fits (fit_mle(..., uncertainty=True))."""

import numpy as np
import pytest
import torch

from qmri_labels.analysis import crlb
from qmri_labels.estimators import MLEEstimator
from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.bootstrap import bootstrap_interval
from qmri_labels.physics import get_model

B_MONO = np.array([0.0, 200.0, 400.0, 600.0, 800.0, 1000.0])
B_IVIM = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])


def _simulate(model, theta, b, sigma, noise, seed):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        clean = get_model(model).forward(torch.as_tensor(theta), torch.as_tensor(b)).numpy()
    noisy = clean + sigma * rng.standard_normal(clean.shape)
    if noise == "rician":
        noisy = np.hypot(noisy, sigma * rng.standard_normal(clean.shape))
    return noisy


def _coverage(fit, truth, level=0.95):
    low, high = fit.interval(level)
    return ((truth >= low) & (truth <= high)).mean(0)


def test_wald_intervals_cover_at_nominal_rate_gaussian_known_sigma():
    n = 4000
    theta = np.tile([1.0, 1.2e-3], (n, 1))
    signals = _simulate("monoexp", theta, B_MONO, 0.02, "gaussian", seed=1)
    fit = fit_mle(signals, B_MONO, model="monoexp", noise="gaussian", sigma=0.02, uncertainty=True, dtype=torch.float64)
    assert fit.sd.shape == (n, 2) and np.all(fit.sd_reason == "")
    cov = _coverage(fit, theta)
    # binomial SE at n = 4000 is 0.0034: 0.94-0.96 is about 3 SE
    assert np.all((cov > 0.94) & (cov < 0.96)), cov
    # the SE is the SD of the estimates (efficient estimator at high SNR)
    np.testing.assert_allclose(np.median(fit.sd, 0), fit.params.std(0), rtol=0.05)
    # and a 50 % interval covers half of the time
    assert np.all(np.abs(_coverage(fit, theta, 0.5) - 0.5) < 0.03)


def test_residual_sigma_uses_m_minus_p_and_t_quantiles():
    n = 4000
    theta = np.tile([1.0, 1.2e-3], (n, 1))
    signals = _simulate("monoexp", theta, B_MONO, 0.02, "gaussian", seed=2)
    fit = fit_mle(signals, B_MONO, model="monoexp", noise="gaussian", uncertainty=True, dtype=torch.float64)
    assert fit.uncertainty.dof == B_MONO.size - 2
    cov = _coverage(fit, theta)
    assert np.all((cov > 0.94) & (cov < 0.96)), cov
    # with sigma^2 = RSS / M and normal quantiles the same fits under-cover badly
    naive_half = 1.96 * fit.sd * np.sqrt((B_MONO.size - 2) / B_MONO.size)
    naive = (np.abs(fit.params - theta) <= naive_half).mean(0)
    assert np.all(naive < 0.9), naive


def test_rician_sd_is_the_shared_fisher_information_at_the_estimate():
    rng = np.random.default_rng(3)
    theta = np.column_stack([np.ones(50), rng.uniform(0.1, 0.4, 50), rng.uniform(0.8e-3, 2e-3, 50),
                             rng.uniform(0.02, 0.08, 50)])
    signals = _simulate("ivim", theta, B_IVIM, 1 / 50, "rician", seed=4)
    fit = fit_mle(signals, B_IVIM, sigma=1 / 50, uncertainty=True)
    ok = np.all(fit.sd_reason == "", axis=-1)
    assert ok.mean() > 0.8
    expected = crlb("ivim", fit.params[ok], B_IVIM, 1 / 50, noise="rician")
    np.testing.assert_allclose(fit.sd[ok], expected, rtol=1e-10)
    assert not np.allclose(expected, crlb("ivim", fit.params[ok], B_IVIM, 1 / 50, noise="gaussian"), rtol=1e-4)


def test_intervals_stay_in_the_box_and_bound_voxels_say_so():
    n = 400
    rng = np.random.default_rng(5)
    theta = np.column_stack([np.ones(n), rng.uniform(0.0, 0.1, n), rng.uniform(0.5e-3, 3e-3, n),
                             rng.uniform(0.005, 0.2, n)])
    signals = _simulate("ivim", theta, B_IVIM, 1 / 10, "rician", seed=6)  # SNR 10: many bound hits
    fit = fit_mle(signals, B_IVIM, sigma=1 / 10, uncertainty=True)
    low, high = fit.interval(0.95)
    lower, upper = fit.uncertainty.lower, fit.uncertainty.upper
    reported = np.isfinite(fit.sd)
    assert np.all(low[reported] >= lower[reported]) and np.all(high[reported] <= upper[reported])
    assert np.all(np.isnan(low[~reported])) and np.all(np.isnan(high[~reported]))
    # S0's box is relative to the voxel's signal (2 x the mean at the lowest b-value)
    np.testing.assert_allclose(upper[:, 0], 2 * signals[:, 0])
    at_low = fit.params - lower <= 1e-6 * (upper - lower)
    assert at_low[:, 1].sum() > 5  # f = 0 happens at this SNR
    assert np.all(fit.sd_reason[at_low] == "at lower bound")
    assert set(np.unique(fit.sd_reason)) <= {"", "at lower bound", "at upper bound", "singular information"}
    # f on its bound at 0: D* cannot be identified, and says so
    f_zero = at_low[:, 1] & ~at_low[:, 3] & ~(upper[:, 3] - fit.params[:, 3] <= 1e-6 * (upper[:, 3] - lower[:, 3]))
    assert np.all(fit.sd_reason[f_zero, 3] == "singular information")
    # a reported interval contains its estimate
    assert np.all((low[reported] <= fit.params[reported]) & (fit.params[reported] <= high[reported]))


def test_invalid_voxels_and_fits_without_uncertainty():
    signals = _simulate("ivim", np.tile([1.0, 0.2, 1e-3, 0.05], (3, 1)), B_IVIM, 0.02, "rician", seed=7)
    signals[1] = np.nan
    fit = fit_mle(signals, B_IVIM, sigma=0.02, uncertainty=True)
    assert np.all(np.isnan(fit.sd[1])) and np.all(fit.sd_reason[1] == "invalid voxel")
    assert np.all(np.isfinite(fit.sd[0]))
    plain = fit_mle(signals, B_IVIM, sigma=0.02)
    with pytest.raises(ValueError, match="uncertainty=True"):
        plain.sd
    with pytest.raises(ValueError, match="level"):
        fit.interval(1.5)
    # the estimates do not depend on the flag
    np.testing.assert_array_equal(plain.params, fit.params)


def test_estimator_returns_sd_of_the_fit():
    signals = _simulate("ivim", np.tile([1.0, 0.2, 1e-3, 0.05], (2, 3, 1)), B_IVIM, 0.02, "rician", seed=8)
    est = MLEEstimator(protocol=B_IVIM, sigma=0.02)
    params, sd = est.predict(signals, return_sd=True)
    assert params.shape == sd.shape == (2, 3, 4) and sd.dtype == np.float32
    fit = fit_mle(signals, B_IVIM, sigma=0.02, uncertainty=True)
    np.testing.assert_allclose(sd, fit.sd.astype(np.float32))
    np.testing.assert_array_equal(est.predict(signals), params)


def test_bootstrap_intervals_are_seeded_inside_the_box_and_cover():
    n = 300
    theta = np.tile([1.0, 1.2e-3], (n, 1))
    signals = _simulate("monoexp", theta, B_MONO, 0.05, "gaussian", seed=9)
    fit = fit_mle(signals, B_MONO, model="monoexp", noise="gaussian", sigma=0.05, uncertainty=True)
    low, high = bootstrap_interval(fit, B_MONO, level=0.9, n_boot=60, seed=3)
    low2, high2 = bootstrap_interval(fit, B_MONO, level=0.9, n_boot=60, seed=3)
    np.testing.assert_array_equal(low, low2)
    np.testing.assert_array_equal(high, high2)
    assert np.all(low >= fit.uncertainty.lower) and np.all(high <= fit.uncertainty.upper)
    cov = ((theta >= low) & (theta <= high)).mean(0)
    assert np.all((cov > 0.84) & (cov < 0.96)), cov  # n = 300: SE 0.017
    # the bootstrap width agrees with the Wald width here (near-linear regime)
    wald_low, wald_high = fit.interval(0.9)
    np.testing.assert_allclose(np.median(high - low, 0), np.median(wald_high - wald_low, 0), rtol=0.15)
    basic_low, basic_high = bootstrap_interval(fit, B_MONO, level=0.9, n_boot=60, seed=3, kind="basic")
    np.testing.assert_allclose(basic_high - basic_low, high - low, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        bootstrap_interval(fit, B_MONO, kind="bca")
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval(fit, B_MONO, n_boot=1)
