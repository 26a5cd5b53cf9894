"""Calibration analysis: coverage, sharpness, CRPS, reliability; a miscalibrated SD must fail."""

import numpy as np
import pytest

from qmri_labels.analysis import (
    GridSpec,
    calibration_statistics,
    empirical_crps,
    evaluate_calibration,
    gaussian_crps,
    plot_reliability,
    summarize_calibration,
)
from qmri_labels.estimators import MLEEstimator


def test_gaussian_crps_closed_form_against_quadrature_and_limits():
    from scipy import integrate, stats

    mean, sd, y = 0.3, 0.7, 1.1
    numeric, _ = integrate.quad(lambda x: (stats.norm.cdf(x, mean, sd) - (x >= y)) ** 2, -10, 10, points=[y])
    assert gaussian_crps(mean, sd, y) == pytest.approx(numeric, rel=1e-6)
    # a point forecast scores its absolute error; a NaN SD scores NaN
    assert gaussian_crps(0.3, 0.0, 1.1) == pytest.approx(0.8)
    assert np.isnan(gaussian_crps(0.3, np.nan, 1.1))


def test_empirical_crps_matches_gaussian_for_many_samples_and_pairs_formula():
    rng = np.random.default_rng(0)
    samples = rng.normal(0.3, 0.7, size=200_000)
    assert empirical_crps(samples, 1.1) == pytest.approx(gaussian_crps(0.3, 0.7, 1.1), rel=5e-3)
    small = rng.normal(size=(3, 7))
    y = rng.normal(size=3)
    brute = np.abs(small - y[:, None]).mean(1) - 0.5 * np.abs(small[:, :, None] - small[:, None, :]).mean((1, 2))
    np.testing.assert_allclose(empirical_crps(small, y), brute, rtol=1e-12)
    # one sample: the absolute error
    np.testing.assert_allclose(empirical_crps(small[:, :1], y), np.abs(small[:, 0] - y))


def _synthetic(scale, g=20, r=500, p=2, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(1, 2, size=(g, p))
    sd = rng.uniform(0.05, 0.2, size=(g, r, p))
    estimate = truth[:, None, :] + sd * rng.standard_normal((g, r, p))
    return estimate, scale * sd, truth


@pytest.mark.parametrize("scale, calibrated", [(1.0, True), (0.5, False), (2.0, False)])
def test_coverage_passes_only_for_calibrated_sd(scale, calibrated):
    estimate, sd, truth = _synthetic(scale)
    out = calibration_statistics(estimate, sd, truth, levels=(0.5, 0.9, 0.95))
    pooled = out["hits"].sum(0) / out["n_reported"].sum(0)[:, None]
    from scipy import stats

    for k, level in enumerate((0.5, 0.9, 0.95)):
        for i in range(2):
            p = stats.binomtest(int(out["hits"].sum(0)[i, k]), int(out["n_reported"].sum(0)[i]), level).pvalue
            assert (p >= 0.01) == calibrated, (scale, level, pooled[i, k], p)
    z = np.sqrt(np.mean(out["z_rms"] ** 2))
    assert z == pytest.approx(1 / scale, rel=0.03)
    np.testing.assert_allclose(out["halfwidth"][..., 2], 1.959964 * sd.mean(1), rtol=1e-6)


def test_unreported_repeats_are_left_out_and_counted():
    estimate, sd, truth = _synthetic(1.0, g=2, r=10)
    sd[0, :4, 0] = np.nan
    out = calibration_statistics(estimate, sd, truth)
    assert out["n_reported"][0, 0] == 6 and out["reported"][0, 0] == pytest.approx(0.6)
    assert out["reported"][1, 1] == 1.0
    with pytest.raises(ValueError, match="shape"):
        calibration_statistics(estimate[0], sd[0], truth)
    with pytest.raises(ValueError, match="level"):
        calibration_statistics(estimate, sd, truth, levels=(95,))


class _ScaledSD:
    """An MLE whose reported SD is multiplied by ``factor`` (a miscalibrated estimator)."""

    def __init__(self, inner, factor):
        self.inner, self.factor = inner, factor

    def predict(self, signals, return_sd=False):
        params, sd = self.inner.predict(signals, return_sd=True)
        return params, sd * self.factor


def test_grid_calibration_of_the_mle_passes_and_miscalibrated_copies_fail(tmp_path):
    # near-linear regime: mono-exponential decay, Gaussian noise, known sigma, SNR 100
    grid = GridSpec(model="monoexp", protocol=(0, 200, 400, 600, 800, 1000),
                    axes={"D": (0.5e-3, 1.0e-3, 1.5e-3, 2.0e-3)}, fixed={"S0": 1.0}, repeats=400, snr=100,
                    noise="gaussian", seed=1)
    mle = MLEEstimator(model="monoexp", protocol=grid.protocol, noise="gaussian", sigma=grid.sigma)
    result = evaluate_calibration({"mle": mle, "half": _ScaledSD(mle, 0.5), "double": _ScaledSD(mle, 2.0)}, grid)
    summary = summarize_calibration(result).set_index(["method", "parameter"])
    for name in ("S0", "D"):
        assert summary.loc[("mle", name), "calibrated_95"], summary.loc[("mle", name)]
        assert 0.93 < summary.loc[("mle", name), "coverage_95"] < 0.97
        for bad in ("half", "double"):
            assert not summary.loc[(bad, name), "calibrated_95"]
            assert not summary.loc[(bad, name), "calibrated_50"]
        assert summary.loc[("half", name), "z_rms"] == pytest.approx(2 * summary.loc[("mle", name), "z_rms"])
        assert summary.loc[("double", name), "mean_halfwidth_95"] == pytest.approx(
            2 * summary.loc[("mle", name), "mean_halfwidth_95"])
        # CRPS is a proper score: the calibrated SD scores best
        assert summary.loc[("mle", name), "crps"] < min(summary.loc[("half", name), "crps"],
                                                         summary.loc[("double", name), "crps"])
    frame = result.to_frame()
    assert {"coverage_95", "halfwidth_95", "crps", "z_rms", "reported"} <= set(frame.columns)
    assert len(frame) == 3 * grid.n_points * 2
    fig = plot_reliability(result)
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    lines = fig.axes[1].get_lines()
    assert len(lines) == 4  # diagonal + three methods
    # the calibrated method's line lies on the diagonal
    np.testing.assert_allclose(lines[1].get_ydata(), lines[1].get_xdata(), atol=0.04)


def test_estimator_without_sd_is_a_clear_error():
    grid = GridSpec(model="monoexp", protocol=(0, 500, 1000), axes={"D": (1e-3,)}, repeats=2, noise="gaussian")
    with pytest.raises(ValueError, match=r"\(params, sd\)"):
        evaluate_calibration({"bad": lambda s: np.zeros((s.shape[0], 2))}, grid)
