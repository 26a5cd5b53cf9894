import math

import numpy as np
import pytest
import torch

from qmri_labels.physics import add_noise, available_models, get_model, sigma_from_snr
from qmri_labels.physics.base import SignalModel

B = torch.tensor([0.0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=torch.float64)


def test_registry_lists_models_and_rejects_unknown():
    assert {"ivim", "monoexp"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown signal model 'nope'"):
        get_model("nope")


def test_ivim_formula_and_parameter_order():
    model = get_model("ivim")
    assert model.param_names == ("S0", "f", "D", "Dstar")
    assert model.units["D"] == "mm^2/s"
    theta = torch.tensor([[1.2, 0.3, 1e-3, 0.05]], dtype=torch.float64)
    expected = 1.2 * (0.3 * np.exp(-B.numpy() * 0.05) + 0.7 * np.exp(-B.numpy() * 1e-3))
    np.testing.assert_allclose(model.forward(theta, B)[0].numpy(), expected, rtol=1e-12)


def test_forward_batched_over_any_leading_shape():
    model = get_model("ivim")
    theta = torch.rand(3, 5, 4, dtype=torch.float64) * torch.tensor([1, 0.5, 3e-3, 0.1], dtype=torch.float64)
    out = model.forward(theta, B)
    assert out.shape == (3, 5, 10)
    np.testing.assert_allclose(out[1, 2].numpy(), model.forward(theta[1, 2][None], B)[0].numpy())


@pytest.mark.parametrize("name", ["ivim", "monoexp"])
def test_closed_form_jacobian_matches_autograd(name):
    model = get_model(name)
    lo, hi = (torch.as_tensor(r) for r in model.default_bounds)
    theta = lo + (hi - lo) * torch.rand(7, model.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    closed = model.jacobian(theta, B)
    auto = SignalModel.jacobian(model, theta, B)
    np.testing.assert_allclose(closed.numpy(), auto.numpy(), rtol=1e-10, atol=1e-12)


def test_forward_is_differentiable():
    model = get_model("ivim")
    theta = torch.tensor([[1.0, 0.2, 1e-3, 0.03]], requires_grad=True)
    model.forward(theta, B.float()).sum().backward()
    assert theta.grad is not None and torch.all(torch.isfinite(theta.grad))


def test_monoexp_is_ivim_without_perfusion():
    theta = torch.tensor([[0.9, 0.0, 1.5e-3, 0.05]], dtype=torch.float64)
    mono = get_model("monoexp").forward(torch.tensor([[0.9, 1.5e-3]], dtype=torch.float64), B)
    np.testing.assert_allclose(get_model("ivim").forward(theta, B).numpy(), mono.numpy(), rtol=1e-12)


def test_segmented_initial_estimate_is_close_on_clean_signals():
    model = get_model("ivim")
    theta = torch.tensor([[1.0, 0.25, 1.2e-3, 0.06], [1.0, 0.4, 2e-3, 0.1]], dtype=torch.float64)
    init = model.initial_estimate(model.forward(theta, B), B)
    np.testing.assert_allclose(init[:, 2].numpy(), theta[:, 2].numpy(), rtol=0.15)
    np.testing.assert_allclose(init[:, 1].numpy(), theta[:, 1].numpy(), atol=0.05)


def test_gaussian_noise_sd_and_snr_definition():
    assert sigma_from_snr(20) == pytest.approx(0.05)
    assert sigma_from_snr(10, s0=200) == pytest.approx(20)
    with pytest.raises(ValueError, match="SNR"):
        sigma_from_snr(0)
    noisy = add_noise(np.ones((20000, 4)), 0.1, "gaussian", rng=0)
    assert noisy.std() == pytest.approx(0.1, rel=0.02)
    assert noisy.mean() == pytest.approx(1.0, abs=0.002)


def test_rician_noise_mean_matches_theory():
    from scipy.special import i0e, i1e

    sigma, a = 0.5, 0.5  # SNR 1: strong Rician bias
    noisy = add_noise(np.full((200000, 1), a), sigma, "rician", rng=1)
    x = a * a / (4 * sigma * sigma)
    mean = sigma * np.sqrt(np.pi / 2) * ((1 + 2 * x) * i0e(x) + 2 * x * i1e(x))
    assert noisy.min() >= 0
    assert noisy.mean() == pytest.approx(mean, rel=0.005)


def test_noise_rejects_bad_input():
    with pytest.raises(ValueError, match="noise must be"):
        add_noise(np.ones(3), 0.1, "poisson")
    with pytest.raises(ValueError, match="sigma"):
        add_noise(np.ones(3), np.nan)


@pytest.mark.parametrize("name, tname", [("t2", "T2"), ("t2star", "T2star")])
def test_relaxation_models_in_ms(name, tname):
    model = get_model(name)
    assert model.param_names == ("S0", tname) and model.units[tname] == "ms"
    assert model.protocol_name == "echo_times" and model.protocol_unit == "ms"
    lo, hi = model.default_bounds[:, 1]
    assert lo <= 1.0 and hi >= 2000.0  # brain T2 (~80 ms) to fluid (~2000 ms) fit the box
    te = torch.tensor([10.0, 20, 40, 80, 160], dtype=torch.float64)
    theta = torch.tensor([[1.5, 80.0], [0.7, 25.0]], dtype=torch.float64)
    np.testing.assert_allclose(model.forward(theta, te).numpy(),
                               theta[:, :1].numpy() * np.exp(-te.numpy() / theta[:, 1:].numpy()), rtol=1e-12)
    np.testing.assert_allclose(model.jacobian(theta, te).numpy(), SignalModel.jacobian(model, theta, te).numpy(),
                               rtol=1e-10)
    signals, grads = model.forward_and_gradients(theta, te)
    np.testing.assert_allclose(grads.transpose(-1, -2).numpy(), model.jacobian(theta, te).numpy())
    init = model.initial_estimate(signals, te)
    np.testing.assert_allclose(init.numpy(), theta.numpy(), rtol=1e-8)  # exact on clean signals
    starts = model.starting_points(init, torch.as_tensor(model.default_bounds[0]).expand(2, 2),
                                   torch.as_tensor(model.default_bounds[1]).expand(2, 2), 4)
    assert starts.shape == (2, 4, 2) and torch.all(starts[:, :, 0] == init[:, None, 0])
    assert torch.all((starts[:, 1:, 1] >= lo) & (starts[:, 1:, 1] <= hi))


def test_monoexp_claims_diffusion_only():
    import qmri_labels.physics.monoexp as monoexp

    assert "T2 relaxation" not in monoexp.__doc__ and "t2" in monoexp.__doc__
    assert get_model("monoexp").protocol_unit == "s/mm^2"


def test_decay_stops_at_the_smallest_normal_number_instead_of_subnormals():
    from qmri_labels.physics.base import decay

    for dtype in (torch.float32, torch.float64):
        tiny = torch.finfo(dtype).tiny
        exponent = torch.tensor([0.0, -1.0, -50.0, -200.0, -1000.0], dtype=dtype)
        out = decay(exponent)
        # exact where exp is a normal number; never a subnormal (0 < x < tiny) or zero
        normal = exponent > math.log(tiny) + 0.01
        assert torch.equal(out[normal], torch.exp(exponent[normal]))
        assert torch.all(out >= tiny) and torch.all(out[~normal] < 1.02 * tiny)
    # IVIM at b * D* = 96 (b 800, D* 0.12): the signal and derivatives hold no subnormal number
    model = get_model("ivim")
    signal, grads = model.forward_and_gradients(torch.tensor([[1.0, 0.3, 1e-3, 0.12]]), torch.tensor([0.0, 800.0]))
    values = torch.cat([signal.flatten(), grads.flatten()]).abs()
    assert not torch.any((values > 0) & (values < torch.finfo(torch.float32).tiny))
