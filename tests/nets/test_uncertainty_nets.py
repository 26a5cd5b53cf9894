"""Heteroscedastic head, likelihood losses and the deep-ensemble combiner."""

import numpy as np
import pytest
import torch
from torch import nn

from qmri_labels.analysis import crlb
from qmri_labels.fitting.likelihood import full_nll
from qmri_labels.nets import MLP
from qmri_labels.nets.ensemble import DeepEnsemble, combine_members
from qmri_labels.nets.heteroscedastic import HeteroscedasticNet
from qmri_labels.physics import get_model
from qmri_labels.training import ParameterNormalisation, resolve_weights
from qmri_labels.training.likelihood_losses import (
    HeteroscedasticLabelLoss,
    gaussian_nll,
    signal_space_nll,
    signal_space_sd,
)

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
BOUNDS = get_model("ivim").default_bounds


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(10, 4, bounds=BOUNDS, input_shift=np.full(10, 0.5), input_scale=np.full(10, 0.2))


def test_head_wraps_the_mean_network_and_bounds_log_variance():
    mean_net = _mlp()
    net = HeteroscedasticNet(mean_net, n_inputs=10, n_variances=4, scale=[1.0, 0.4, 3e-3, 0.15])
    x = torch.rand(7, 10)
    mean, log_var = net(x)
    assert mean.shape == (7, 4) and log_var.shape == (7, 4)
    torch.testing.assert_close(mean, mean_net(x))
    # the variance branch standardises its inputs like the mean network
    torch.testing.assert_close(net.variance_network.input_shift, mean_net.input_shift)
    raw = torch.tensor([-1e3, -18.0, 0.0, 5.0, 1e3])
    bounded = net.bounded_log_var(raw)
    assert torch.all(bounded >= -18.0) and torch.all(bounded <= 6.0)
    assert bounded[2] == pytest.approx(0.0, abs=3e-3)  # nearly the identity well inside the bounds
    sd = net.sd(torch.zeros(4))
    torch.testing.assert_close(sd, torch.tensor([1.0, 0.4, 3e-3, 0.15]))
    rebuilt = HeteroscedasticNet.from_config(net.config)
    rebuilt.load_state_dict(net.state_dict())
    for a, b in zip(rebuilt(x), net(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="scale"):
        HeteroscedasticNet(mean_net, 10, 4, scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="n_variances"):
        HeteroscedasticNet(mean_net, 10, 0)


def test_gaussian_nll_formula_and_minimum_at_squared_error():
    pred, target = torch.tensor([[0.2, 1.0]]), torch.tensor([[0.5, 0.0]])
    scale = torch.tensor([0.5, 2.0])
    log_var = torch.zeros(1, 2, requires_grad=True)
    value = gaussian_nll(pred, log_var, target, scale)
    expected = 0.5 * np.mean([(0.3 / 0.5) ** 2, (1.0 / 2.0) ** 2])
    assert float(value.detach()) == pytest.approx(expected)
    at_min = torch.log(((pred - target) / scale) ** 2).requires_grad_(True)
    gaussian_nll(pred, at_min, target, scale).backward()
    assert torch.allclose(at_min.grad, torch.zeros(2), atol=1e-7)


def test_heteroscedastic_training_learns_input_dependent_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 1, generator=gen)
    true_sd = 0.02 + 0.2 * x
    y = 2 * x + true_sd * torch.randn(2000, 1, generator=gen)
    torch.manual_seed(0)
    net = HeteroscedasticNet(nn.Linear(1, 1), n_inputs=1, n_variances=1, hidden_layers=1, width=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(1500):
        opt.zero_grad()
        mean, log_var = net(x)
        loss = gaussian_nll(mean, log_var, y, torch.ones(1))
        loss.backward()
        opt.step()
    with torch.no_grad():
        probe = torch.tensor([[0.1], [0.5], [0.9]])
        _, sd = net.predict_mean_sd(probe)
    np.testing.assert_allclose(sd.numpy().ravel(), (0.02 + 0.2 * probe).numpy().ravel(), rtol=0.2)


def test_signal_space_nll_matches_the_fitters_likelihood_and_sd_is_the_crlb():
    theta = torch.tensor([[1.0, 0.2, 1e-3, 0.05], [0.9, 0.3, 2e-3, 0.02]], dtype=torch.float64)
    b = torch.as_tensor(B)
    forward = get_model("ivim").forward
    gen = torch.Generator().manual_seed(1)
    signals = (forward(theta, b) + 0.03 * torch.randn(2, 10, generator=gen, dtype=torch.float64)).abs()
    log_var = torch.log(torch.tensor([[0.03**2], [0.05**2]], dtype=torch.float64))
    sigma = torch.exp(0.5 * log_var)
    rician = signal_space_nll(theta, log_var, signals, forward, b, "rician")
    reference = full_nll(signals, forward(theta, b), sigma, "rician").sum() + torch.log(signals).sum()
    assert float(rician) * signals.numel() == pytest.approx(float(reference), rel=1e-10)
    gauss = signal_space_nll(theta, log_var, signals, forward, b, "gaussian")
    reference = full_nll(signals, forward(theta, b), sigma, "gaussian").sum() - 0.5 * np.log(2 * np.pi) * 20
    assert float(gauss) * signals.numel() == pytest.approx(float(reference), rel=1e-10)
    sd = signal_space_sd("ivim", theta.numpy(), B, log_var.numpy(), "rician")
    np.testing.assert_allclose(sd, crlb("ivim", theta.numpy(), B, np.array([0.03, 0.05]), "rician"), rtol=1e-12)
    with pytest.raises(ValueError, match="one value per voxel"):
        signal_space_nll(theta, log_var.repeat(1, 4), signals, forward, b)


def test_label_loss_terms_and_mixing_rules():
    norm = ParameterNormalisation.from_support(np.array([[0.8, 0.1, 4e-4, 1e-2], [1.2, 0.5, 3e-3, 0.15]]),
                                               ("S0", "f", "D", "Dstar"))
    gen = torch.Generator().manual_seed(2)
    pred, theta, mle = (torch.rand(5, 4, generator=gen) for _ in range(3))
    log_var = torch.randn(5, 4, generator=gen)
    batch = {"signals": torch.rand(5, 10, generator=gen), "theta": theta, "mle": mle}
    scale = torch.tensor(norm.scale, dtype=torch.float32)
    loss = HeteroscedasticLabelLoss(resolve_weights("hybrid", 0.3), "ivim", B, norm)
    total, terms = loss((pred, log_var), batch)
    expected = 0.3 * gaussian_nll(pred, log_var, mle, scale) + 0.7 * gaussian_nll(pred, log_var, theta, scale)
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"gt", "mle"}
    self_loss = HeteroscedasticLabelLoss(resolve_weights("self"), "ivim", B, norm, noise="rician")
    assert self_loss.n_variances == 1
    with pytest.raises(ValueError, match="log-variance"):
        self_loss((pred, log_var), batch)
    with pytest.raises(ValueError, match="mix"):
        HeteroscedasticLabelLoss({"gt": 0.5, "self": 0.5}, "ivim", B, norm)
    with pytest.raises(ValueError, match=r"\(mean, log_var\)"):
        loss(pred, batch)


def test_combine_members_is_the_mixture_mean_and_variance():
    rng = np.random.default_rng(3)
    means = rng.normal(size=(5, 3, 4))
    variances = rng.uniform(0.1, 1.0, size=(5, 3, 4))
    mean, sd = combine_members(means, variances)
    np.testing.assert_allclose(mean, means.mean(0))
    np.testing.assert_allclose(sd**2, variances.mean(0) + means.var(0))
    t_mean, t_sd = combine_members(torch.as_tensor(means), torch.as_tensor(variances))
    np.testing.assert_allclose(t_sd.numpy(), sd)
    # the law of total variance: the SD of samples drawn from the equal-weight mixture
    member = rng.integers(0, 5, size=400_000)
    draws = means[member, 0, 0] + np.sqrt(variances[member, 0, 0]) * rng.standard_normal(400_000)
    assert draws.std() == pytest.approx(sd[0, 0], rel=0.01)
    # plain members: their spread only; one plain member: no spread at all
    np.testing.assert_allclose(combine_members(means)[1], means.std(0))
    assert np.all(combine_members(means[:1])[1] == 0)
    with pytest.raises(ValueError, match="shape"):
        combine_members(means, variances[:2])


def test_deep_ensemble_members_are_seeded_and_combined():
    state = torch.random.get_rng_state()
    ens = DeepEnsemble.from_factory(lambda: MLP(10, 4, bounds=BOUNDS), seeds=[0, 1, 2])
    assert torch.equal(state, torch.random.get_rng_state())
    again = DeepEnsemble.from_factory(lambda: MLP(10, 4, bounds=BOUNDS), seeds=[0, 1, 2])
    x = torch.rand(6, 10)
    member_means, variances = ens.member_outputs(x)
    assert variances is None and member_means.shape == (3, 6, 4)
    assert not torch.allclose(member_means[0], member_means[1])
    mean, sd = ens(x)
    torch.testing.assert_close(mean, again(x)[0])
    torch.testing.assert_close(sd, member_means.std(0, unbiased=False))
    hetero = DeepEnsemble.from_factory(lambda: HeteroscedasticNet(MLP(10, 4, bounds=BOUNDS), 10, 4), seeds=[4, 5])
    means, variances = hetero.member_outputs(x)
    mean, sd = hetero(x)
    torch.testing.assert_close(sd**2, variances.mean(0) + means.var(0, unbiased=False))


@pytest.mark.parametrize("label", ["gt", "self"])
def test_heteroscedastic_loss_is_a_drop_in_for_the_lightning_module(label):
    import lightning as L

    from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
    from qmri_labels.training import InMemoryDataModule, LabelRegressor

    ds = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, n=512, seed=0).generate()
    norm = ParameterNormalisation.from_support(ds.prior_support, ("S0", "f", "D", "Dstar"))
    n_var = 1 if label == "self" else 4
    torch.manual_seed(0)
    net = HeteroscedasticNet(MLP(10, 4, bounds=BOUNDS, input_shift=ds.signals.mean(0), input_scale=ds.signals.std(0)),
                             10, n_var, scale=None if label == "self" else norm.scale)
    loss = HeteroscedasticLabelLoss(resolve_weights(label), "ivim", ds.protocol, norm, noise="rician")
    module = LabelRegressor(net, loss, lr=3e-3)
    data = InMemoryDataModule({"signals": ds.signals, "theta": ds.theta_true}, batch_size=64, val_fraction=0.25,
                              split_seed=0, shuffle_seed=0)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    history = [h["val_loss"] for h in module.history]
    assert history[-1] < history[0], history
