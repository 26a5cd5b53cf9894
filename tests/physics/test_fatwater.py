"""The fat-water model, the default prior and literature protocol of every shipped model, and
the MLE fitter on fat-water's two likelihood optima."""

import numpy as np
import pytest
import torch

from qmri_labels.data import DatasetSpec, UniformPrior
from qmri_labels.data.priors import EPSTEIN_OFFSETS, EPSTEIN_RANGES
from qmri_labels.fitting import fit_mle
from qmri_labels.physics import FatWaterModel, available_models, get_model
from qmri_labels.physics.noise import add_noise

SHIPPED = ("ivim", "monoexp", "t2", "t2star", "fatwater", "fatwater_1.5t")


def test_fatwater_gradients_match_autograd():
    model = get_model("fatwater")
    te = torch.tensor(model.default_protocol, dtype=torch.float64)
    params = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.3, 150.0], [1.2, 0.95, 800.0]], dtype=torch.float64)
    signal, grads = model.forward_and_gradients(params, te)
    torch.testing.assert_close(signal, model.forward(params, te))
    auto = torch.autograd.functional.jacobian(lambda x: model.forward(x, te), params)
    torch.testing.assert_close(grads.transpose(-1, -2), torch.stack([auto[i, :, i] for i in range(3)]))


def test_fatwater_physics():
    model = get_model("fatwater")
    assert sum(model.spectrum["amplitudes"]) == pytest.approx(1.0)
    te = torch.tensor([0.0, 1.1, 2.2], dtype=torch.float64)
    water = model.forward(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), te)[0]
    torch.testing.assert_close(water, torch.ones(3, dtype=torch.float64))  # water alone does not beat
    mixed = model.forward(torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64), te)[0]
    assert mixed[0] == pytest.approx(1.0) and mixed[1] < 0.5 < mixed[2]  # ~opposed, ~in phase at 3 T
    # the field strength belongs to the model and is recorded; 1.5 T has its own name
    assert model.config["field_strength"] == 3.0
    assert get_model("fatwater_1.5t").config["field_strength"] == 1.5
    assert FatWaterModel(field_strength=7.0).config["field_strength"] == 7.0
    low = get_model("fatwater_1.5t").forward(torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64), te)[0]
    assert not torch.allclose(low, mixed)
    with pytest.raises(ValueError, match="field_strength"):
        FatWaterModel(field_strength=-1)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_has_a_prior_and_a_literature_protocol(name):
    assert name in available_models()
    model = get_model(name)
    assert len(model.default_protocol) >= 2 and model.protocol_reference
    model.validate_protocol(model.default_protocol)
    prior = UniformPrior(name)
    assert set(prior.ranges) == set(model.param_names)
    lower, upper = model.default_bounds
    assert np.all(prior.support[0] >= lower) and np.all(prior.support[1] <= upper)
    data = DatasetSpec(model=name, protocol=model.default_protocol, prior=prior.to_dict(), n=64, seed=0,
                       snr=model.default_snr or 30.0).generate()
    assert data.signals.shape == (64, len(model.default_protocol)) and np.all(np.isfinite(data.signals))


def test_the_default_prior_of_ivim_is_unchanged():
    assert UniformPrior().to_dict() == UniformPrior("ivim", ranges=dict(EPSTEIN_RANGES),
                                                    offsets=dict(EPSTEIN_OFFSETS)).to_dict()
    assert UniformPrior("monoexp").ranges == {"S0": EPSTEIN_RANGES["S0"], "D": EPSTEIN_RANGES["D"]}


class _FatFirst(FatWaterModel):
    """The fat-water model started on the fat-dominant side only (not registered)."""

    water_start = 0.9


def _voxels(model, pdff, r2star, n, snr=60.0, seed=1):
    te = np.asarray(model.default_protocol)
    clean = model.forward(torch.tensor(np.tile([1.0, pdff, r2star], (n, 1))), torch.tensor(te)).numpy()
    return add_noise(clean, 1.0 / snr, "rician", rng=seed), te


@pytest.mark.parametrize("pdff", [0.1, 0.9])
def test_fitter_finds_the_global_optimum_of_the_two(pdff):
    """At MAGORINO's protocol and SNR (3 T, 12 echoes, SNR 60), R2* 100 1/s: the default fit keeps
    the lower NLL of a water- and a fat-dominant start, so it lands on the truth's side in every
    voxel whichever side that is; a single (water-dominant) start swaps every fat voxel."""
    model = get_model("fatwater")
    y, te = _voxels(model, pdff, 100.0, 400)
    fit = fit_mle(y, te, model=model, sigma=1 / 60)
    water_only = fit_mle(y, te, model=model, sigma=1 / 60, n_starts=1)
    fat_only = fit_mle(y, te, model=_FatFirst(), sigma=1 / 60, n_starts=1)
    best = np.minimum(water_only.nll, fat_only.nll)
    assert np.all(fit.nll <= best + 1e-6 * np.abs(best) + 1e-9)
    assert np.all((fit.params[:, 1] > 0.5) == (pdff > 0.5))
    single_swaps = np.mean((water_only.params[:, 1] > 0.5) != (pdff > 0.5))
    assert single_swaps == (1.0 if pdff > 0.5 else 0.0)


def test_more_starts_swap_less_than_one_at_high_r2star():
    """R2* 300 1/s, PDFF 0.9, SNR 60: a single start swaps all voxels (measured 1.0), the
    default fit 12.5 % (2000 voxels; the global optimum itself sits on the water side there)."""
    model = get_model("fatwater")
    y, te = _voxels(model, 0.9, 300.0, 2000)
    single = np.mean(fit_mle(y, te, model=model, sigma=1 / 60, n_starts=1).params[:, 1] < 0.5)
    default = np.mean(fit_mle(y, te, model=model, sigma=1 / 60).params[:, 1] < 0.5)
    assert single > 0.99 and default < 0.2
