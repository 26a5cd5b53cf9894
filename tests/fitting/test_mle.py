import warnings

import numpy as np
import pytest
import torch

from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec, UniformPrior
from qmri_labels.fitting import fit_mle
from qmri_labels.physics import get_model

B = np.array(EPSTEIN_BVALUES)


@pytest.fixture(scope="module")
def data(ivim_set):
    return ivim_set(n=2000, seed=11, snr=30)


def test_fit_object_named_access_and_shapes(data):
    fit = fit_mle(data.signals[:50].reshape(5, 10, 10), B, sigma=data.sigma[0])
    assert fit.params.shape == (5, 10, 4) and fit.nll.shape == (5, 10)
    np.testing.assert_array_equal(fit["f"], fit.params[..., 1])
    np.testing.assert_array_equal(fit.Dstar, fit.params[..., 3])
    assert set(fit.as_dict()) == {"S0", "f", "D", "Dstar"}
    assert fit.converged.all() and fit.valid.all() and not fit.sigma_estimated
    with pytest.raises(KeyError, match="no parameter 'T2'"):
        fit["T2"]


def test_estimates_track_the_truth_at_high_snr():
    data = DatasetSpec(n=500, seed=3, snr=400).generate()
    fit = fit_mle(data.signals, B, sigma=data.sigma)
    err = np.abs(fit.params - data.theta_true)
    assert np.median(err[:, 1]) < 0.01  # f
    assert np.median(err[:, 2]) < 2e-5  # D
    assert np.median(err[:, 3] / data.theta_true[:, 3]) < 0.05  # Dstar, relative


def test_nll_is_minimal_near_the_estimate(data):
    from qmri_labels.fitting.likelihood import full_nll

    fit = fit_mle(data.signals[:100], B, sigma=data.sigma[:100])
    model = get_model("ivim")
    y = torch.as_tensor(data.signals[:100], dtype=torch.float64)
    s = torch.as_tensor(data.sigma[:100], dtype=torch.float64)[:, None]
    bt = torch.as_tensor(B)
    rng = np.random.default_rng(0)
    for _ in range(5):
        moved = fit.params * (1 + 0.01 * rng.standard_normal(fit.params.shape))
        moved = np.clip(moved, [0, 0, 0, 0.003], [2, 1, 0.005, 0.3])
        nll_moved = full_nll(y, model.forward(torch.as_tensor(moved), bt), s, "rician").numpy()
        assert np.mean(nll_moved >= fit.nll - 1e-6) > 0.98


def test_chunking_does_not_change_results(data, monkeypatch):
    import qmri_labels.fitting.mle as mle

    sizes = []
    real_fit_chunk = mle.fit_chunk

    def counting_fit_chunk(model, y, *args):
        sizes.append(y.shape[0])
        return real_fit_chunk(model, y, *args)

    monkeypatch.setattr(mle, "fit_chunk", counting_fit_chunk)
    whole = fit_mle(data.signals[:600], B, sigma=data.sigma[:600])
    assert sizes == [600]
    sizes.clear()
    chunked = fit_mle(data.signals[:600], B, sigma=data.sigma[:600], chunk_size=90)
    assert sizes == [90] * 6 + [60]  # 7 chunks, the last one ragged
    np.testing.assert_allclose(chunked.params, whole.params, rtol=1e-6)
    np.testing.assert_array_equal(chunked.converged, whole.converged)
    np.testing.assert_allclose(chunked.nll, whole.nll, rtol=1e-9)


def test_bounds_respected_and_dict_bounds(data):
    with pytest.warns(UserWarning, match="Dstar sits on its upper bound"):  # the box is too tight for these data
        fit = fit_mle(data.signals[:300], B, sigma=data.sigma[0], bounds={"Dstar": (0.02, 0.05), "f": (0.2, 0.3)})
    assert fit.Dstar.min() >= 0.02 and fit.Dstar.max() <= 0.05
    assert fit.f.min() >= 0.2 and fit.f.max() <= 0.3
    with pytest.raises(ValueError, match="shape"):
        fit_mle(data.signals[:3], B, sigma=0.03, bounds=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lower bound must be below"):
        fit_mle(data.signals[:3], B, sigma=0.03, bounds={"f": (0.5, 0.1)})


def test_unnormalised_signals_give_scaled_s0(data):
    fit1 = fit_mle(data.signals[:200], B, sigma=data.sigma[0])
    fit1000 = fit_mle(1000 * data.signals[:200], B, sigma=1000 * data.sigma[0])
    # the same optimum up to float32 rounding of the input (the likelihood is flat in f, D*)
    np.testing.assert_allclose(fit1000.S0, 1000 * fit1.S0, rtol=1e-3)
    np.testing.assert_allclose(fit1000.f, fit1.f, atol=2e-3)
    # NLL transforms with the density: + M log(1000) per voxel
    np.testing.assert_allclose(fit1000.nll, fit1.nll + 10 * np.log(1000), atol=1e-3)


def test_gaussian_noise_without_sigma_estimates_it():
    data = DatasetSpec(n=400, seed=5, snr=50, noise="gaussian").generate()
    fit = fit_mle(data.signals, B, noise="gaussian")
    assert fit.sigma_estimated
    # RSS / M underestimates sigma by the degrees of freedom used (M - P of M)
    assert np.sqrt(np.mean(fit.sigma**2) * 10 / 6) == pytest.approx(1 / 50, rel=0.1)


def test_rician_sigma_missing_is_an_error_unless_repeats():
    data = DatasetSpec(n=50, seed=1).generate()
    with pytest.raises(ValueError, match="sigma is required for Rician"):
        fit_mle(data.signals, B)
    protocol = (0, 0, 0, 10, 20, 50, 100, 200, 400, 800)
    rep = DatasetSpec(n=3000, seed=1, protocol=protocol, snr=30).generate()
    with pytest.warns(UserWarning, match="sigma estimated"):
        fit = fit_mle(rep.signals, protocol)
    assert fit.sigma_estimated and fit.sigma_method.startswith("repeated")
    assert fit.sigma[0] == pytest.approx(1 / 30, rel=0.05)


def test_bad_voxels_are_flagged_not_fatal(data):
    signals = data.signals[:6].copy()
    signals[1, 3] = np.nan
    signals[2] = 0.0
    signals[3, 5] = -0.1
    signals[4, 0] = np.inf
    fit = fit_mle(signals, B, sigma=0.03)
    assert fit.valid.tolist() == [True, False, False, False, False, True]
    assert np.isnan(fit.params[~fit.valid]).all() and np.isfinite(fit.params[fit.valid]).all()
    assert "non-finite" in fit.invalid_reason[1] and "all-zero" in fit.invalid_reason[2]
    assert "negative" in fit.invalid_reason[3]


def test_bad_input_raises_clear_errors(data):
    with pytest.raises(ValueError, match=r"number of bvalues \(10\) differs"):
        fit_mle(data.signals[:5, :8], B, sigma=0.03)
    with pytest.raises(ValueError, match="sigma contains NaN"):
        fit_mle(data.signals[:5], B, sigma=np.nan)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        fit_mle(data.signals[:5], B, sigma=0)
    with pytest.raises(ValueError, match="no voxel can be fitted"):
        fit_mle(np.full((3, 10), np.nan), B, sigma=0.03)
    with pytest.raises(ValueError, match="noise must be"):
        fit_mle(data.signals[:5], B, noise="poisson", sigma=0.03)
    with pytest.raises(ValueError, match="bvalues"):
        fit_mle(data.signals[:5], -B, sigma=0.03)


def test_monoexp_fit():
    prior = UniformPrior("monoexp", ranges={"S0": (0.8, 1.2), "D": (0.5e-3, 2.5e-3)})
    data = DatasetSpec(model="monoexp", prior=prior, n=300, seed=2, snr=100,
                       protocol=(0, 200, 400, 600, 800, 1000)).generate()
    fit = fit_mle(data.signals, data.protocol, model="monoexp", sigma=data.sigma)
    assert fit.param_names == ("S0", "D")
    assert np.median(np.abs(fit.D - data.theta_true[:, 1])) < 5e-5


def test_float64_and_float32_agree(data):
    f32 = fit_mle(data.signals[:200], B, sigma=data.sigma[0])
    f64 = fit_mle(data.signals[:200], B, sigma=data.sigma[0], dtype=torch.float64)
    assert np.mean(np.abs(f32.nll - f64.nll) < 1e-4) > 0.97


@pytest.mark.parametrize("name", ["t2", "t2star"])
def test_relaxation_fit_in_ms_within_2_percent_at_snr_100(name):
    model = get_model(name)
    tname = model.param_names[1]
    echo_times = (10.0, 20, 30, 40, 60, 80, 120, 160) if name == "t2" else (2.0, 5, 10, 15, 20, 30, 40)
    ranges = {"S0": (500.0, 2000.0), tname: (30.0, 150.0) if name == "t2" else (8.0, 60.0)}
    data = DatasetSpec(model=name, prior=UniformPrior(name, ranges=ranges, offsets={}), n=1000, seed=4, snr=100,
                       protocol=echo_times, s0_reference=1000.0).generate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no estimate on a bound
        fit = fit_mle(data.signals, echo_times, model=name, sigma=data.sigma)
    assert fit.param_names == ("S0", tname)
    rel = np.abs(fit[tname] / data.theta_true[:, 1] - 1)
    assert np.median(rel) < 0.02 and np.percentile(rel, 90) < 0.05
    assert np.median(np.abs(fit.S0 / data.theta_true[:, 0] - 1)) < 0.02
    assert fit.converged.mean() > 0.99


def test_estimates_on_a_bound_for_most_voxels_warn():
    # T2 data (echo times in ms) fitted with the diffusion model: the rate 1/T2 (0.007-0.03 per ms)
    # lies beyond monoexp's D bound (0.005 mm^2/s), so D ends on the bound; that must not be silent
    prior = UniformPrior("t2", ranges={"S0": (0.8, 1.2), "T2": (30.0, 150.0)}, offsets={})
    echo_times = (10.0, 20, 30, 40, 60, 80, 120, 160)
    data = DatasetSpec(model="t2", prior=prior, n=300, seed=4, snr=100, protocol=echo_times).generate()
    with pytest.warns(UserWarning, match=r"D sits on its upper bound \(0.005 mm\^2/s\) in \d+% of voxels"):
        fit_mle(data.signals, echo_times, model="monoexp", sigma=data.sigma)


def test_converged_means_tolerance_met_and_stalled_is_separate(data):
    fit = fit_mle(data.signals[:300], B, sigma=data.sigma[:300])
    assert fit.stalled.shape == fit.converged.shape == (300,)
    assert not (fit.converged & fit.stalled).any() and fit.converged.mean() > 0.95
    # a tolerance no fit can meet: every voxel stops because no step helps, and none is "converged"
    never = fit_mle(data.signals[:300], B, sigma=data.sigma[:300], tol=0.0, max_iter=400)
    assert not never.converged.any()
    assert never.stalled.mean() > 0.95
    np.testing.assert_array_less(never.nll, fit.nll + 1e-3)  # stalling at the optimum, not before it


def test_fast_i0e_matches_the_exact_function_and_leaves_its_input_alone():
    from qmri_labels.fitting.likelihood import fast_i0e

    z = torch.cat([torch.linspace(0.0, 10.0, 20001), torch.logspace(1, 5, 20001)])
    kept = z.clone()
    exact = torch.special.i0e(z.double())
    rel = ((fast_i0e(z).double() - exact).abs() / exact).max()
    assert rel < 6e-7, float(rel)
    assert torch.equal(z, kept)  # it works in place on its temporaries only


def test_voxels_on_a_bound_go_on_with_more_starts_than_the_race_had(data, monkeypatch):
    """With n_starts=2 the rescue of voxels on a bound continues the race's two starts and adds
    new ones up to _RESCUE_STARTS; no rescued voxel ends worse than the race's choice."""
    import qmri_labels.fitting.lm as lm

    seen = []
    original = lm._rescue_batch

    def spy(*args):
        rescue = original(*args)
        seen.append((args[3].numel(), rescue.theta.shape[0], rescue.converged.clone()))
        return rescue

    monkeypatch.setattr(lm, "_rescue_batch", spy)
    fit = fit_mle(data.signals[:400], B, sigma=data.sigma[:400], n_starts=2)
    (redo, rows, converged), = seen
    assert redo > 0 and rows == redo * lm._RESCUE_STARTS
    # the race's choice comes in converged, the new starts do not
    assert converged.reshape(redo, -1)[:, 2:].sum() == 0 and converged.reshape(redo, -1)[:, :2].any(-1).all()
    monkeypatch.setattr(lm, "_RESCUE_STARTS", 2)  # no new starts: only the race's own
    fewer = fit_mle(data.signals[:400], B, sigma=data.sigma[:400], n_starts=2)
    # never worse than without new starts (float32 iterations: 1e-5), and here better in a voxel
    assert np.all(fit.nll <= fewer.nll + 1e-5) and fit.converged.all()
    assert np.any(fit.nll < fewer.nll - 1.0)
