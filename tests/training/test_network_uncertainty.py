"""NetworkEstimator with a heteroscedastic head or as a deep ensemble, and the calibration
columns and report section of the study."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest

from qmri_labels.analysis import GridSpec, evaluate_grid, summarize
from qmri_labels.analysis.calibration import summarize_calibration
from qmri_labels.analysis.report import (
    CALIBRATION_COLUMNS,
    add_calibration,
    overconfidence_sentences,
    write_report,
)
from qmri_labels.estimators.bundle import SAFETENSORS_FILE, load_bundle
from qmri_labels.data import DatasetSpec, UniformPrior
from qmri_labels.estimators import MLEEstimator, NetworkEstimator


@pytest.fixture(scope="module")
def data(ivim_set):
    return ivim_set(n=500, seed=11)


@pytest.fixture(scope="module")
def hetero_gt(data, small_network):
    return small_network(seed=3, label="gt", uncertainty="heteroscedastic").fit(data)


@pytest.fixture(scope="module")
def hetero_self(data, small_network):
    return small_network(seed=3, label="self", uncertainty="heteroscedastic").fit(data)


@pytest.fixture(scope="module")
def vh_gt(data, small_network):
    return small_network(seed=3, label="gt", uncertainty="variance_head").fit(data)


@pytest.fixture(scope="module")
def ensemble(data, small_network):
    return small_network(seed=3, label="gt", n_members=2).fit(data)


def _weights(est):
    return {k: v.clone() for k, v in est.network_.state_dict().items()}


@pytest.mark.parametrize("name", ["hetero_gt", "hetero_self", "vh_gt", "ensemble"])
def test_predict_with_sd_shape_positivity_and_unchanged_point_estimate(name, request, data):
    est = request.getfixturevalue(name)
    assert est.reports_sd
    signals = data.signals[:24].reshape(2, 3, 4, -1)
    params, sd = est.predict(signals, return_sd=True)
    assert params.shape == sd.shape == (2, 3, 4, 4) and sd.dtype == np.float32
    assert np.all(sd > 0) and not np.any(np.isnan(sd))
    np.testing.assert_array_equal(est.predict(signals), params)
    # the SD varies from voxel to voxel (a head or a spread, not a constant)
    assert np.ptp(sd.reshape(-1, 4), axis=0).min() > 0


def test_heteroscedastic_gt_sd_is_in_parameter_units(hetero_gt, data):
    # the raw head (the label's spread), on signals at the training scale
    _, sd = hetero_gt.predict(data.signals[:50], return_sd=True, sd_kind="label", signal_scale=1.0)
    head = hetero_gt.network_
    mean, log_var = head(__import__("torch").as_tensor(data.signals[:50]))
    np.testing.assert_allclose(sd, (head.scale * (0.5 * log_var).exp()).detach().numpy(), rtol=1e-6)


def test_self_label_sd_is_the_fisher_sd_at_the_learned_noise(hetero_self, data):
    import torch

    from qmri_labels.analysis.crlb import crlb

    assert hetero_self.network_.config["n_variances"] == 1
    signals = data.signals[:20]
    params, sd = hetero_self.predict(signals, return_sd=True, sd_kind="label", signal_scale=1.0)
    _, log_var = hetero_self.network_(torch.as_tensor(signals))
    sigma = np.exp(0.5 * log_var.detach().numpy()[:, 0].astype(np.float64))
    expected = np.stack([crlb("ivim", params[i:i + 1].astype(np.float64), data.protocol, sigma[i], "rician")[0]
                         for i in range(len(params))])
    np.testing.assert_allclose(sd, expected, rtol=2e-3)


def test_ensemble_members_are_independently_seeded_and_combined(ensemble, data):
    import torch

    from qmri_labels.nets.ensemble import DeepEnsemble

    assert isinstance(ensemble.network_, DeepEnsemble) and len(ensemble.network_.members) == 2
    a, b = ensemble.network_.members
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    x = torch.as_tensor(data.signals[:30])
    outs = np.stack([m(x).detach().numpy() for m in (a, b)]).astype(np.float64)
    params, sd = ensemble.predict(data.signals[:30], return_sd=True, sd_kind="label", signal_scale=1.0)
    np.testing.assert_allclose(params, outs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sd, np.abs(outs[0] - outs[1]) / 2, rtol=1e-5, atol=1e-12)
    assert [m["init_seed"] for m in ensemble.seeds_["members"]] == [3, 4]
    assert [m["shuffle_seed"] for m in ensemble.seeds_["members"]] == [3, 4]


@pytest.mark.parametrize("name", ["hetero_gt", "hetero_self", "vh_gt", "ensemble"])
def test_bundle_round_trip_identical_predictions_and_sds(name, request, data, tmp_path):
    est = request.getfixturevalue(name)
    path = est.save(tmp_path / name)
    state, manifest = load_bundle(path)
    if name == "ensemble":
        # one weights file, member-prefixed keys
        assert (path / SAFETENSORS_FILE).is_file()
        assert {k.split(".")[1] for k in state} == {"0", "1"} and all(k.startswith("members.") for k in state)
        assert manifest["network"]["kind"] == "ensemble" and len(manifest["network"]["members"]) == 2
        assert len(manifest["training"]["members"]) == 2
    else:
        assert manifest["network"]["kind"] == est.uncertainty
    assert manifest["params"]["uncertainty"] == est.uncertainty
    assert manifest["params"]["n_members"] == est.n_members
    back = NetworkEstimator.load(path)
    assert back.get_params() == est.get_params()
    p0, s0 = est.predict(data.signals[:40], return_sd=True)
    p1, s1 = back.predict(data.signals[:40], return_sd=True)
    np.testing.assert_array_equal(p0, p1)
    np.testing.assert_array_equal(s0, s1)


def test_same_seed_same_weights_and_clone(hetero_gt, ensemble, data):
    for est in (hetero_gt, ensemble):
        again = type(est)(**est.get_params()).fit(data)
        first, second = _weights(est), _weights(again)
        assert first.keys() == second.keys()
        assert all(bool((first[k] == second[k]).all()) for k in first)
    assert NetworkEstimator(**ensemble.get_params()).n_members == 2


def test_invalid_combinations_are_refused(data, hetero_gt, small_network):
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="n_members"):
            small_network(seed=3, n_members=bad).fit(data)
    with pytest.raises(ValueError, match="uncertainty"):
        small_network(seed=3, uncertainty="bayesian").fit(data)
    with pytest.raises(ValueError, match="self-supervised"):
        small_network(seed=3, label="weighted", weights={"gt": 1.0, "self": 0.1}, uncertainty="heteroscedastic").fit(data)
    plain = small_network(seed=3, max_epochs=1).fit(data)
    assert not plain.reports_sd
    with pytest.raises(ValueError, match="reports no standard deviations"):
        plain.predict(data.signals[:3], return_sd=True)
    with pytest.raises(ValueError, match="warm_start"):
        hetero_gt.set_params(warm_start=True, n_members=2)
        try:
            hetero_gt.fit(data)
        finally:
            hetero_gt.set_params(warm_start=False, n_members=1)


class ScaledSD:
    """A network estimator whose reported SDs are multiplied by ``factor`` (deliberately
    miscalibrated)."""

    def __init__(self, estimator, factor):
        self.estimator, self.factor = estimator, factor

    def predict(self, signals, return_sd=False):
        params, sd = self.estimator.predict(signals, return_sd=True)
        return (params, sd * self.factor) if return_sd else params


@pytest.fixture(scope="module")
def grid():
    return GridSpec.for_prior(UniformPrior().support, DatasetSpec().protocol, points_per_axis=2, repeats=40, snr=30,
                              margin=0.1, seed=5)


def test_miscalibrated_network_fails_the_calibration_check(hetero_gt, grid):
    simulated = hetero_gt.at_training_scale()
    estimators = {"net": simulated, "net-sd-x0.05": ScaledSD(simulated, 0.05), "net-sd-x20": ScaledSD(simulated, 20)}
    result = evaluate_grid(estimators, grid, with_sd=list(estimators), crlb=False)
    table = summarize_calibration(result.calibration).set_index(["method", "parameter"])
    for p in ("f", "D", "Dstar"):
        # z_rms scales exactly with 1 / factor; coverage falls when the SDs shrink
        z = table.loc[("net", p), "z_rms"]
        assert table.loc[("net-sd-x0.05", p), "z_rms"] == pytest.approx(z / 0.05, rel=1e-5)
        assert table.loc[("net-sd-x0.05", p), "coverage_95"] < 0.5
        assert not table.loc[("net-sd-x0.05", p), "calibrated_95"]
        assert table.loc[("net-sd-x20", p), "coverage_95"] == 1.0
    summary = add_calibration(summarize(result), result)
    sentences = overconfidence_sentences(summary, list(estimators), ["f", "D", "Dstar"])
    assert "**net-sd-x0.05** is over-confident for f" in sentences[1]
    assert "is not over-confident" in sentences[2]


def test_methods_without_sd_get_nan_columns_and_not_reported(data, grid, tmp_path, small_network):
    plain = small_network(seed=3, max_epochs=1).fit(data)
    mle = MLEEstimator(sigma=grid.sigma, n_starts=1, protocol=grid.protocol)
    result = evaluate_grid({"fit-mle": mle, "net-gt": plain}, grid, with_sd=["fit-mle"])
    summary = add_calibration(summarize(result), result)
    assert set(CALIBRATION_COLUMNS) <= set(summary.columns)
    rows = summary.set_index(["method", "parameter"])
    assert rows.loc[("net-gt", "D"), ["coverage_95", "crps", "z_rms"]].isna().all()
    assert np.isfinite(rows.loc[("fit-mle", "D"), ["coverage_95", "mean_halfwidth_95", "crps", "z_rms"]]).all()
    path = write_report(tmp_path, result, summary, figures=True)
    text = path.read_text()
    assert "## Calibration of the reported uncertainty" in text and "figures/reliability.png" in text
    assert "**net-gt**: SD not reported" in text
    assert (tmp_path / "figures" / "reliability.png").is_file()
    with pytest.raises(ValueError, match="with_sd names methods"):
        evaluate_grid({"fit-mle": mle}, grid, with_sd=["nope"])


def test_study_config_uncertainty_keys_reach_the_networks():
    from qmri_labels.workflows.ivim import resolve_config, make_estimators

    cfg = resolve_config({})
    # the default study adds variance heads that leave the point estimates those of plain networks
    assert cfg["uncertainty"] == "variance_head" and cfg["n_members"] == 1
    assert {(e.uncertainty, e.n_members) for e in make_estimators(cfg).values()} == {("variance_head", 1)}
    assert {e.uncertainty for e in make_estimators(resolve_config({"uncertainty": None})).values()} == {None}
    nets = make_estimators(resolve_config({"uncertainty": "heteroscedastic", "n_members": 3}))
    assert {(e.uncertainty, e.n_members) for e in nets.values()} == {("heteroscedastic", 3)}
    with pytest.raises(ValueError, match="n_members"):
        resolve_config({"n_members": 0})
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        resolve_config({"uncertainty": "mc-dropout"})


# -- variance_head: the point estimates of the plain network, plus an SD -----------------------

@pytest.fixture(scope="module")
def small_data(ivim_set):
    return ivim_set(n=240, seed=5)


@pytest.mark.parametrize("label", ["gt", "mle", "self", "hybrid"])
def test_variance_head_point_estimates_are_bit_identical_to_the_plain_network(label, small_data, small_network):
    # 3 epochs with patience 1 and a large step: early stopping and the kept epoch take part
    args = dict(label=label, max_epochs=3, patience=1, lr=5e-3, batch_size=64, val_fraction=0.25)
    plain = small_network(seed=3, **args).fit(small_data)
    head = small_network(seed=3, uncertainty="variance_head", **args).fit(small_data)
    signals = small_data.signals[:60]
    np.testing.assert_array_equal(head.predict(signals), plain.predict(signals))
    params, sd = head.predict(signals, return_sd=True)
    np.testing.assert_array_equal(params, plain.predict(signals))
    assert head.best_epoch_ == plain.best_epoch_ and head.n_epochs_ == plain.n_epochs_
    assert [h["val_loss"] for h in head.history_] == [h["val_loss"] for h in plain.history_]
    # the mean network's weights are the plain network's, bit for bit
    mean_state = head.network_.mean_network.state_dict()
    assert all(bool((mean_state[k] == v).all()) for k, v in plain.network_.state_dict().items())
    # the variance branch did learn: its NLL is logged and its SDs are positive and vary by voxel
    assert all(np.isfinite(h["train_variance_nll"]) for h in head.history_)
    finite = sd[np.isfinite(sd)]
    assert finite.size and np.all(finite > 0) and np.unique(finite).size > 1
    if label == "self":
        assert head.network_.config["n_variances"] == 1


def test_heteroscedastic_changes_the_point_estimates_variance_head_does_not(data, hetero_gt, vh_gt, small_network):
    # the contrast the variance head exists for (the same seeds as the fixtures)
    plain = small_network(seed=3, label="gt").fit(data)
    signals = data.signals[:80]
    np.testing.assert_array_equal(vh_gt.predict(signals), plain.predict(signals))
    assert not np.array_equal(hetero_gt.predict(signals), plain.predict(signals))
    assert vh_gt._fitted_uncertainty() == "variance_head" and hetero_gt._fitted_uncertainty() == "heteroscedastic"


def test_variance_head_ensemble_clone_and_warm_start(small_data, small_network):
    args = dict(label="gt", max_epochs=2, batch_size=64, n_members=2)
    plain = small_network(seed=3, **args).fit(small_data)
    head = small_network(seed=3, uncertainty="variance_head", **args).fit(small_data)
    signals = small_data.signals[:30]
    np.testing.assert_array_equal(head.predict(signals), plain.predict(signals))
    _, sd_plain = plain.predict(signals, return_sd=True, sd_kind="label")
    _, sd_head = head.predict(signals, return_sd=True, sd_kind="label")
    # the mixture adds the members' own variances to their spread (raw, before the calibration)
    assert np.all(sd_head > sd_plain)
    clone = NetworkEstimator(**head.get_params())
    assert clone.uncertainty == "variance_head" and clone.n_members == 2
    with pytest.raises(ValueError, match="warm_start"):
        head.set_params(warm_start=True, uncertainty="heteroscedastic").fit(small_data)
