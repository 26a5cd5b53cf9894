"""Cramer-Rao lower bound: Gaussian closed form, Rician information factor, Monte-Carlo checks."""

import numpy as np
import pytest
import torch
from scipy import special

from qmri_labels.analysis import (
    GridSpec,
    crlb,
    evaluate_grid,
    fisher_information,
    rician_information_factor,
    summarize,
)
from qmri_labels.physics import get_model


def gauss_newton_monoexp(signals, bvalues, iterations=8):
    """Unconstrained least squares for S = S0 exp(-b D): the Gaussian MLE, efficient at high SNR."""
    model = get_model("monoexp")
    b = torch.tensor(bvalues, dtype=torch.float64)
    y = torch.as_tensor(signals, dtype=torch.float64)
    theta = model.initial_estimate(y, b)
    for _ in range(iterations):
        r = y - model.forward(theta, b)
        jac = model.jacobian(theta, b)
        step = torch.linalg.solve(jac.transpose(-1, -2) @ jac, (jac.transpose(-1, -2) @ r[..., None]))[..., 0]
        theta = theta + step
    return theta.numpy()


def test_gaussian_crlb_matches_closed_form_for_one_parameter():
    # S = S0 exp(-bD) with S0 known would give var(D) = sigma^2 / sum((b S)^2); with S0 unknown,
    # the 2x2 inverse: var(D) = sigma^2 * sum(e^2) / det
    b = np.array([0.0, 300.0, 700.0, 1000.0])
    s0, d, sigma = 1.2, 1.1e-3, 0.02
    e = np.exp(-b * d)
    info = np.array([[e @ e, -(s0 * b * e) @ e], [-(s0 * b * e) @ e, (s0 * b * e) @ (s0 * b * e)]]) / sigma**2
    expected = np.sqrt(np.diag(np.linalg.inv(info)))
    np.testing.assert_allclose(fisher_information("monoexp", [s0, d], b, sigma), info, rtol=1e-12)
    np.testing.assert_allclose(crlb("monoexp", [s0, d], b, sigma), expected, rtol=1e-9)
    # the bound scales with sigma
    np.testing.assert_allclose(crlb("monoexp", [s0, d], b, 2 * sigma), 2 * expected, rtol=1e-9)


def test_crlb_matches_monte_carlo_sd_of_efficient_estimator():
    b = (0.0, 200.0, 400.0, 600.0, 800.0, 1000.0)
    grid = GridSpec(model="monoexp", protocol=b, axes={"D": [0.8e-3, 2.0e-3]}, fixed={"S0": 1.0},
                    repeats=2000, snr=100.0, noise="gaussian", seed=3)
    result = evaluate_grid({"lsq": lambda s: gauss_newton_monoexp(s, b)}, grid)
    # SE of a sample SD with R = 2000 is 1.6 %; the LSQ estimator is efficient to O(1/SNR^2)
    np.testing.assert_allclose(result.sd["lsq"], result.crlb_sd, rtol=0.05)
    eff = summarize(result).set_index("parameter")["efficiency"]
    assert eff["D"] == pytest.approx(1.0, abs=0.1)


def test_rician_information_factor_limits_and_monte_carlo():
    g = rician_information_factor(np.array([0.0, 1.0, 3.0, 20.0, 100.0]))
    assert g[0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(g) > 0) and g[-1] == 1.0
    assert 1 - g[3] < 3e-3
    rng = np.random.default_rng(0)
    n = 400_000
    for a in (0.7, 2.0):
        m = np.hypot(a + rng.standard_normal(n), rng.standard_normal(n))
        score = m * special.i1e(m * a) / special.i0e(m * a) - a  # d/dA log p at sigma = 1
        assert rician_information_factor(a) == pytest.approx(score.var(), rel=0.02)


def test_rician_bound_exceeds_gaussian_and_converges_at_high_snr():
    b = np.array([0, 10, 20, 50, 100, 200, 400, 800.0])
    theta = np.array([[1.0, 0.2, 1.5e-3, 0.05], [1.0, 0.4, 2.5e-3, 0.1]])
    low_g = crlb("ivim", theta, b, 1 / 5, "gaussian")
    low_r = crlb("ivim", theta, b, 1 / 5, "rician")
    assert np.all(low_r > low_g)
    high_g = crlb("ivim", theta, b, 1 / 2000, "gaussian")
    high_r = crlb("ivim", theta, b, 1 / 2000, "rician")
    np.testing.assert_allclose(high_r, high_g, rtol=0.01)


def test_unidentifiable_parameter_has_infinite_bound_and_bad_input_raises():
    b = np.array([0, 50, 100, 400, 800.0])
    theta = np.array([1.0, 0.0, 1e-3, 0.05])
    bound = crlb("ivim", theta, b, 0.01)  # f = 0: D* unidentifiable, S0, f and D are not
    assert np.isinf(bound[3]) and np.all(np.isfinite(bound[:3]))
    info = fisher_information("ivim", theta, b, 0.01)
    np.testing.assert_allclose(bound[:3], np.sqrt(np.diag(np.linalg.inv(info[:3, :3]))), rtol=1e-8)
    with pytest.raises(ValueError, match="columns"):
        crlb("ivim", [1.0, 0.1], b, 0.01)
    with pytest.raises(ValueError, match="sigma"):
        crlb("ivim", [1.0, 0.1, 1e-3, 0.05], b, 0.0)
    with pytest.raises(ValueError, match="noise"):
        crlb("ivim", [1.0, 0.1, 1e-3, 0.05], b, 0.01, noise="poisson")
