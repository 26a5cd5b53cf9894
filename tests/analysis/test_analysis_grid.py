"""Evaluation grid, per-point statistics and beyond-RMSE summaries."""

import numpy as np
import pandas as pd
import pytest
import torch

from qmri_labels.analysis import (
    GridResult,
    GridSpec,
    evaluate_grid,
    marginal_curves,
    sensitivity,
    spearman_table,
    summarize,
)
from qmri_labels.data import UniformPrior
from qmri_labels.physics import get_model


class ConstantEstimator:
    """Ignores the data: sensitivity 0, SD 0."""

    def __init__(self, value):
        self.value = np.asarray(value, dtype=np.float32)

    def predict(self, signals):
        return np.broadcast_to(self.value, signals.shape[:-1] + self.value.shape).copy()


class NoiseOracle:
    """Knows the grid order; returns truth + c * (mean noise of the signal): unbiased, SD known.

    With Gaussian noise the residual ``signal - clean`` is pure noise, so the estimate of every
    parameter is ``truth + scale * mean(noise)`` with SD ``scale * sigma / sqrt(M)``. ``D*`` gets
    the negative of f's noise term so that their estimates are perfectly anti-correlated.
    """

    def __init__(self, grid, scale):
        self.truth = grid.truth
        self.repeats = grid.repeats
        self.scale = np.asarray(scale)
        self.clean = get_model(grid.model).forward(torch.from_numpy(self.truth),
                                                   torch.tensor(grid.protocol, dtype=torch.float64)).numpy()
        self.cursor = 0
        self.calls = []

    def predict(self, signals):
        n = signals.shape[0]
        self.calls.append(n)
        point = (self.cursor + np.arange(n)) // self.repeats
        self.cursor += n
        noise = (signals - self.clean[point]).mean(-1, keepdims=True)
        est = self.truth[point] + self.scale * noise
        return est


def small_grid(**kw):
    kw.setdefault("repeats", 40)
    kw.setdefault("points_per_axis", 4)
    kw.setdefault("snr", 30.0)
    kw.setdefault("noise", "gaussian")
    return GridSpec.for_prior(UniformPrior().support, (0, 10, 20, 50, 100, 200, 400, 800), **kw)


def test_default_grid_matches_epstein_prior():
    grid = GridSpec()
    assert grid.shape == (10, 10, 10) and grid.n_points == 1000
    truth = grid.truth
    support = UniformPrior().support
    assert np.all(truth[:, 0] == 1.0)  # S0 fixed
    np.testing.assert_allclose(truth[:, 1:].min(0), support[0, 1:])
    np.testing.assert_allclose(truth[:, 1:].max(0), support[1, 1:])
    assert grid.varied == ("f", "D", "Dstar")
    # every combination once
    assert len(np.unique(truth, axis=0)) == 1000


def test_for_prior_options_and_validation():
    support = UniformPrior().support
    grid = GridSpec.for_prior(support, (0, 100, 800), points_per_axis={"f": 3, "D": 2, "Dstar": 5}, margin=0.1)
    assert grid.shape == (3, 2, 5)
    f = np.asarray(grid.axes["f"])
    assert f.min() > support[0, 1] and f.max() < support[1, 1]
    mono = GridSpec.for_prior(np.array([[0.5, 1e-3], [1.5, 2e-3]]), (0, 500, 1000), model="monoexp",
                              vary=["S0", "D"], points_per_axis=3)
    assert mono.shape == (3, 3) and mono.truth.shape == (9, 2)
    with pytest.raises(ValueError, match="support"):
        GridSpec.for_prior(support[:, :3], (0, 100))
    with pytest.raises(ValueError, match="unknown"):
        GridSpec.for_prior(support, (0, 100), vary=["T2"])
    with pytest.raises(ValueError, match="noise"):
        GridSpec.for_prior(support, (0, 100), noise="poisson")
    with pytest.raises(ValueError, match="repeats"):
        GridSpec.for_prior(support, (0, 100), repeats=1)
    with pytest.raises(ValueError, match="neither"):
        GridSpec(axes={"f": [0.1]}, fixed={"S0": 1.0})
    with pytest.raises(ValueError, match="both"):
        GridSpec(axes={"f": [0.1], "D": [1e-3], "Dstar": [0.05]}, fixed={"S0": 1.0, "f": 0.2})
    round_trip = GridSpec.from_dict(grid.to_dict())
    assert round_trip == grid


def test_noise_is_deterministic_and_independent_of_chunking():
    grid = small_grid(noise="rician")
    a = grid.signals()
    b = grid.signals(slice(5, 9))
    np.testing.assert_array_equal(a[5:9], b)
    assert not np.array_equal(a, grid.replace(seed=1).signals())
    est = {"oracle": ConstantEstimator([1, 0.2, 1e-3, 0.05])}
    # a signal-dependent estimator: log of the last b-value signal
    est["logfit"] = lambda s: np.stack([s[:, 0], s[:, 1] / s[:, 0], -np.log(np.abs(s[:, -1]) + 1e-3) / 800,
                                        s[:, 2]], -1)
    r1 = evaluate_grid(est, grid.replace(chunk_size=100))
    r2 = evaluate_grid(est, grid.replace(chunk_size=10_000))
    for m in est:
        np.testing.assert_array_equal(r1.mean[m], r2.mean[m])
        np.testing.assert_array_equal(r1.sd[m], r2.sd[m])


def test_unbiased_oracle_has_unit_sensitivity_and_known_sd():
    grid = small_grid(repeats=400, chunk_size=2000)
    scale = np.array([1.0, 0.5, 1e-3, -0.5])
    oracle = NoiseOracle(grid, scale)
    result = evaluate_grid({"oracle": oracle}, grid)
    # chunks hold whole points and never more than chunk_size signals
    assert max(oracle.calls) <= 2000 and sum(oracle.calls) == grid.n_points * grid.repeats
    expected_sd = np.abs(scale) * grid.sigma / np.sqrt(len(grid.protocol))
    summary = summarize(result).set_index("parameter")
    for i, name in enumerate(result.param_names):
        assert summary.loc[name, "mean_sd"] == pytest.approx(expected_sd[i], rel=0.03)
        # bias is pure Monte-Carlo error: well below the SD
        assert summary.loc[name, "mean_abs_bias"] < 0.2 * expected_sd[i]
        np.testing.assert_allclose(summary.loc[name, "rmse"], np.sqrt(np.mean(result.rmse["oracle"][:, i] ** 2)))
    for name in ("f", "D", "Dstar"):
        assert summary.loc[name, "sensitivity"] == pytest.approx(1.0, abs=0.01)
        assert summary.loc[name, "pearson_r"] > 0.99
    assert np.isnan(summary.loc["S0", "sensitivity"]) and not summary.loc["S0", "varied"]
    rho = spearman_table(result).set_index(["param_a", "param_b"])
    assert rho.loc[("f", "Dstar"), "noise_rho"] == pytest.approx(-1.0, abs=1e-9)
    assert rho.loc[("f", "D"), "noise_rho"] == pytest.approx(1.0, abs=1e-9)
    assert abs(rho.loc[("f", "D"), "true_rho"]) < 1e-12  # factorial grid


def test_constant_estimator_has_zero_sensitivity_and_infinite_efficiency():
    grid = small_grid()
    value = np.array([1.0, 0.3, 1.5e-3, 0.08])
    result = evaluate_grid({"const": ConstantEstimator(value)}, grid)
    summary = summarize(result, parameters=["f", "D", "Dstar"]).set_index("parameter")
    truth = grid.truth
    for i, name in [(1, "f"), (2, "D"), (3, "Dstar")]:
        row = summary.loc[name]
        assert row["sensitivity"] == pytest.approx(0.0, abs=1e-9)
        assert row["mean_sd"] == 0.0
        assert np.isinf(row["efficiency"])
        const = np.float32(value[i])  # the estimator works in float32
        assert row["mean_abs_bias"] == pytest.approx(np.mean(np.abs(const - truth[:, i])), rel=1e-9)
        assert row["rmse"] == pytest.approx(np.sqrt(np.mean((const - truth[:, i]) ** 2)), rel=1e-9)
    assert set(summary.columns) >= {"method", "mean_abs_bias", "mean_sd", "rmse", "sensitivity", "efficiency"}
    curves = marginal_curves(result, "f")
    f_curve = curves[(curves.parameter == "f")]
    np.testing.assert_allclose(f_curve["rmse"], np.abs(np.float32(0.3) - np.asarray(grid.axes["f"])), rtol=1e-9)
    np.testing.assert_allclose(f_curve["bias"], np.float32(0.3) - np.asarray(grid.axes["f"]), rtol=1e-9)
    assert len(curves) == 4 * 4  # 4 estimated parameters x 4 values of f
    with pytest.raises(ValueError, match="varied"):
        marginal_curves(result, "S0")


def test_sensitivity_function():
    x = np.linspace(0, 1, 11)
    assert sensitivity(x, 0.5 * x + 3) == pytest.approx(0.5)
    assert np.isnan(sensitivity(np.ones(5), x[:5]))
    assert sensitivity(x, np.where(x > 0.5, np.nan, x)) == pytest.approx(1.0)


def test_invalid_estimates_are_counted_and_excluded():
    grid = small_grid(repeats=20)

    def half_nan(signals):
        est = np.tile([1.0, 0.2, 1e-3, 0.05], (len(signals), 1))
        est[::2] = np.nan
        return est

    result = evaluate_grid({"half": half_nan}, grid)
    np.testing.assert_allclose(result.valid_fraction["half"], 0.5)
    assert np.all(np.isfinite(result.mean["half"]))
    assert summarize(result)["valid_fraction"].iloc[0] == pytest.approx(0.5)


def test_bad_estimators_are_rejected():
    grid = small_grid(repeats=5)
    with pytest.raises(ValueError, match="shape"):
        evaluate_grid({"bad": lambda s: np.zeros((len(s), 2))}, grid)
    with pytest.raises(ValueError, match="predict"):
        evaluate_grid({"bad": object()}, grid)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_grid({}, grid)
    with pytest.raises(ValueError, match="GridSpec"):
        evaluate_grid({"c": ConstantEstimator([1, 0.2, 1e-3, 0.05])}, {"repeats": 3})


def test_frame_round_trip():
    grid = small_grid(repeats=10)
    result = evaluate_grid({"a": ConstantEstimator([1, 0.2, 1e-3, 0.05]), "b": NoiseOracle(grid, 1.0)}, grid)
    frame = result.to_frame()
    assert len(frame) == 2 * grid.n_points * 4
    assert {"true_f", "true_D", "true_Dstar", "crlb_sd"} <= set(frame.columns)
    back = GridResult.from_frame(frame, grid)
    assert back.methods == ["a", "b"]
    for key in ("mean", "bias", "sd", "rmse"):
        for m in ("a", "b"):
            np.testing.assert_allclose(getattr(back, key)[m], getattr(result, key)[m])
    np.testing.assert_allclose(back.crlb_sd, result.crlb_sd)
    pd.testing.assert_frame_equal(summarize(back), summarize(result))


# --- several SNRs ---------------------------------------------------------------------
def test_evaluate_snrs_scales_the_sd_and_stacks_an_snr_column(tmp_path):
    from qmri_labels.analysis.grid import evaluate_snrs, grid_snrs
    from qmri_labels import load_results
    from qmri_labels.analysis.report import write_report

    grid = small_grid(repeats=200, points_per_axis=2)
    scale = np.array([1.0, 0.5, 1e-3, -0.5])
    seen = []

    def estimators(g):  # a noise-level-aware estimator set, as the MLE fitter with known sigma
        seen.append(g.snr)
        return {"oracle": NoiseOracle(g, scale), "const": ConstantEstimator([1.0, 0.3, 1e-3, 0.05])}

    results = evaluate_snrs(estimators, grid, [15, 60])
    assert seen == [15.0, 60.0] and list(results) == [15.0, 60.0]
    sd15 = summarize(results[15.0]).set_index(["method", "parameter"])["mean_sd"]
    sd60 = summarize(results[60.0]).set_index(["method", "parameter"])["mean_sd"]
    # the same standard-normal draws at each SNR: the oracle's SD scales exactly with 1 / SNR
    assert sd15.loc[("oracle", "f")] / sd60.loc[("oracle", "f")] == pytest.approx(4.0, rel=1e-6)
    frame = results[15.0].to_frame()
    assert (frame["snr"] == 15.0).all()
    with pytest.raises(ValueError, match="SNR"):
        GridResult.from_frame(frame, grid.replace(snr=60.0))
    both = pd.concat([results[15.0].to_frame(), results[60.0].to_frame()])
    with pytest.raises(ValueError, match="several SNRs"):
        GridResult.from_frame(both, grid)
    sub = results[15.0].select(["const"])
    assert sub.methods == ["const"] and set(sub.rmse) == {"const"}
    with pytest.raises(ValueError, match="not in this result"):
        results[15.0].select(["mle"])
    write_report(tmp_path, results[60.0], results_by_snr=results, figures=True)
    grid_csv = pd.read_csv(tmp_path / "grid.csv")
    assert sorted(set(grid_csv["snr"])) == [15.0, 60.0]
    assert (tmp_path / "figures" / "snr-15" / "bias_sd_rmse.png").exists()
    assert "## Across SNRs" in (tmp_path / "report.md").read_text()
    back = load_results(tmp_path)
    assert back.grid.grid.snr == 60.0 and sorted(back.grids) == [15.0, 60.0]
    np.testing.assert_allclose(back.grids[15.0].sd["oracle"], results[15.0].sd["oracle"])
    with pytest.raises(ValueError, match="SNRs"):
        grid_snrs([20, 0])


def test_chunks_cover_the_grid_in_order_with_the_signals_of_each_point():
    grid = GridSpec(model="monoexp", protocol=(0, 500, 1000), axes={"D": np.linspace(5e-4, 3e-3, 7)}, repeats=4,
                    chunk_size=9)
    chunks = list(grid.chunks())
    assert [(lo, hi) for lo, hi, _ in chunks] == [(0, 2), (2, 4), (4, 6), (6, 7)]  # 2 points = 8 signals <= 9
    assert all(signals.shape == ((hi - lo) * 4, 3) and signals.dtype == np.float32 for lo, hi, signals in chunks)
    whole = np.concatenate([signals for _, _, signals in chunks])
    np.testing.assert_array_equal(whole, grid.signals().astype(np.float32).reshape(-1, 3))
    assert grid.replace(chunk_size=1).fingerprint == grid.replace(chunk_size=1).fingerprint != grid.fingerprint
    with pytest.raises(ValueError, match="one SNR"):
        GridSpec(snr=(10, 20))
