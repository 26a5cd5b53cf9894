import numpy as np
import pytest
import torch

from qmri_labels.physics import get_model
from qmri_labels.training import (
    LabelLoss,
    ParameterNormalisation,
    method_name,
    resolve_weights,
)


@pytest.fixture(scope="module")
def data(ivim_set):
    ds = ivim_set(n=512, seed=3)
    model = get_model("ivim")
    norm = ParameterNormalisation.from_support(ds.prior_support, model.param_names)
    g = torch.Generator().manual_seed(0)
    theta = torch.as_tensor(ds.theta_true)
    batch = {
        "signals": torch.as_tensor(ds.signals),
        "theta": theta,
        # MLE-like labels: the truth plus a perturbation that differs from the prediction's
        "mle": theta * (1 + 0.1 * torch.randn(theta.shape, generator=g)),
    }
    pred = theta * (1 + 0.2 * torch.randn(theta.shape, generator=g))
    return ds, norm, batch, pred


def make(ds, norm, label, alpha=None, weights=None):
    return LabelLoss(resolve_weights(label, alpha, weights), "ivim", ds.protocol, norm)


def test_gt_and_mle_are_normalised_mse(data):
    ds, norm, batch, pred = data
    scale = torch.tensor(norm.scale, dtype=torch.float32)
    gt, terms = make(ds, norm, "gt")(pred, batch)
    assert torch.allclose(gt, (((pred - batch["theta"]) / scale) ** 2).mean())
    assert set(terms) == {"gt"}
    mle, _ = make(ds, norm, "mle")(pred, batch)
    assert torch.allclose(mle, (((pred - batch["mle"]) / scale) ** 2).mean())
    assert not torch.isclose(gt, mle)


def test_normalisation_uses_prior_support_and_is_recorded(data):
    ds, norm, _, _ = data
    support = ds.prior_support
    np.testing.assert_allclose(norm.lower, support[0])
    np.testing.assert_allclose(norm.scale, support[1] - support[0])
    assert ParameterNormalisation.from_dict(norm.to_dict()) == norm
    assert norm.to_dict()["param_names"] == ["S0", "f", "D", "Dstar"]


def test_each_parameter_counts_equally(data):
    # the same relative error (10 % of the prior range) in any one parameter gives the same loss
    ds, norm, batch, _ = data
    loss = make(ds, norm, "gt")
    theta = batch["theta"]
    values = []
    for i in range(4):
        pred = theta.clone()
        pred[:, i] += 0.1 * norm.scale[i]
        values.append(float(loss(pred, batch)[0]))
    np.testing.assert_allclose(values, values[0], rtol=1e-4)


def test_hybrid_endpoints_are_exactly_the_pure_losses(data):
    ds, norm, batch, pred = data
    gt, _ = make(ds, norm, "gt")(pred, batch)
    mle, _ = make(ds, norm, "mle")(pred, batch)
    h0, terms0 = make(ds, norm, "hybrid", alpha=0.0)(pred, batch)
    h1, terms1 = make(ds, norm, "hybrid", alpha=1.0)(pred, batch)
    assert torch.equal(h0, gt) and set(terms0) == {"gt"}
    assert torch.equal(h1, mle) and set(terms1) == {"mle"}
    # the gt endpoint never reads MLE labels (which may be NaN for failed fits)
    no_mle = {k: v for k, v in batch.items() if k != "mle"}
    assert torch.equal(make(ds, norm, "hybrid", alpha=0.0)(pred, no_mle)[0], gt)


def test_hybrid_interpolates(data):
    ds, norm, batch, pred = data
    gt, _ = make(ds, norm, "gt")(pred, batch)
    mle, _ = make(ds, norm, "mle")(pred, batch)
    h, _ = make(ds, norm, "hybrid", alpha=0.3)(pred, batch)
    assert torch.allclose(h, 0.3 * mle + 0.7 * gt)


def test_self_loss_is_zero_on_noiseless_signals_at_the_truth(data):
    ds, norm, batch, _ = data
    model = get_model("ivim")
    theta = batch["theta"]
    clean = model.forward(theta, torch.as_tensor(ds.protocol, dtype=torch.float32))
    loss = make(ds, norm, "self")
    value, terms = loss(theta, {"signals": clean})
    assert float(value) == 0.0 and set(terms) == {"self"}
    # and positive away from the truth or on noisy signals
    assert float(loss(theta * 1.1, {"signals": clean})[0]) > 0
    noisy = float(loss(theta, {"signals": batch["signals"]})[0])
    assert noisy > 0
    # with Gaussian-like noise of sigma = 1/30 the signal MSE is about sigma^2
    assert 0.3 / 30**2 < noisy < 3 / 30**2


def test_weighted_sum_with_self_term(data):
    ds, norm, batch, pred = data
    w = {"gt": 0.5, "mle": 0.2, "self": 3.0}
    total, terms = make(ds, norm, "weighted", weights=w)(pred, batch)
    assert set(terms) == {"gt", "mle", "self"}
    assert torch.allclose(total, 0.5 * terms["gt"] + 0.2 * terms["mle"] + 3.0 * terms["self"])
    ref_self, _ = make(ds, norm, "self")(pred, batch)
    assert torch.allclose(terms["self"], ref_self)


@pytest.mark.parametrize(
    "label, alpha, weights, match",
    [
        ("mse", None, None, "label must be one of"),
        ("hybrid", None, None, "needs alpha"),
        ("hybrid", 1.5, None, r"\[0, 1\]"),
        ("hybrid", -0.1, None, r"\[0, 1\]"),
        ("weighted", None, None, "needs weights"),
        ("weighted", None, {"gt": 1, "tv": 1}, "unknown loss terms"),
        ("weighted", None, {"gt": -1}, ">= 0"),
        ("weighted", None, {"gt": 0, "mle": 0}, "at least one"),
    ],
)
def test_bad_label_settings_raise(label, alpha, weights, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(label, alpha, weights)


def test_method_names():
    assert method_name("gt") == "net-gt"
    assert method_name("self") == "net-self"
    assert method_name("hybrid", 0.5) == "net-hybrid-0.5"
    assert method_name("hybrid", 0.25) == "net-hybrid-0.25"


def test_loss_gradients_flow_through_forward_model(data):
    ds, norm, batch, pred = data
    pred = pred.clone().requires_grad_(True)
    total, _ = make(ds, norm, "self")(pred, batch)
    total.backward()
    assert torch.all(torch.isfinite(pred.grad)) and float(pred.grad.abs().sum()) > 0
