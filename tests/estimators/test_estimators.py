import json

import numpy as np
import pytest
import torch

from qmri_labels.estimators import MLEEstimator, NetworkEstimator, QSMEstimator, clone
from qmri_labels.estimators.bundle import MANIFEST_FILE, SAFETENSORS_FILE, load_bundle


@pytest.fixture(scope="module")
def tiny(ivim_set):
    return ivim_set(n=1000, seed=7)


@pytest.fixture(scope="module")
def mle_params(tiny):
    return MLEEstimator(sigma=tiny.spec.sigma, n_starts=1).fit(tiny).predict(tiny.signals)


def test_mle_estimator_any_leading_shape(tiny):
    est = MLEEstimator(sigma=tiny.spec.sigma, n_starts=1)
    assert est.fit(tiny) is est
    flat = est.predict(tiny.signals[:12])
    shaped = est.predict(tiny.signals[:12].reshape(3, 2, 2, 10))
    assert shaped.shape == (3, 2, 2, 4) and shaped.dtype == np.float32
    np.testing.assert_allclose(shaped.reshape(12, 4), flat, rtol=1e-5)
    assert est.param_names == ("S0", "f", "D", "Dstar") and est.model_name == "ivim"
    with pytest.raises(ValueError, match="protocol"):
        MLEEstimator().predict(tiny.signals)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 10\)"):
        est.predict(tiny.signals[:, :5])


def test_fit_returns_self_and_sets_learned_attributes(tiny, small_network):
    est = small_network()
    assert not hasattr(est, "network_")
    with pytest.raises(ValueError, match="not fitted"):
        est.predict(tiny.signals)
    assert est.fit(tiny) is est
    for attr in ("network_", "history_", "normalisation_", "train_fingerprint_", "best_epoch_", "n_train_"):
        assert hasattr(est, attr)
    assert est.train_fingerprint_ == tiny.fingerprint
    assert est.n_train_ == 900 and est.n_val_ == 100
    assert est.model_name == "ivim" and est.param_names == ("S0", "f", "D", "Dstar")
    np.testing.assert_array_equal(est.protocol, tiny.protocol)
    assert est.normalisation_["source"] == "prior_support"


def test_predict_any_leading_shape_within_bounds(tiny, small_network):
    est = small_network().fit(tiny)
    flat = est.predict(tiny.signals[:24])
    shaped = est.predict(tiny.signals[:24].reshape(2, 3, 4, 10))
    assert shaped.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(shaped.reshape(24, 4), flat)
    single = est.predict(tiny.signals[0])
    assert single.shape == (4,)
    bounds = est.network_.bounds
    assert np.all(flat >= bounds[0] - 1e-6) and np.all(flat <= bounds[1] + 1e-6)
    with pytest.raises(ValueError, match="one value per measurement"):
        est.predict(np.ones((3, 7)))


def test_save_load_round_trip_identical_predictions(tmp_path, tiny, mle_params, small_network):
    est = small_network(label="hybrid", alpha=0.3).fit(tiny, mle_labels=mle_params)
    path = est.save(tmp_path / "hybrid", metrics={"rmse_f": 0.1})
    loaded = NetworkEstimator.load(path)
    np.testing.assert_array_equal(loaded.predict(tiny.signals), est.predict(tiny.signals))
    # the loaded estimator carries everything needed to predict and to retrain alike
    assert loaded.model_name == "ivim" and loaded.param_names == est.param_names
    np.testing.assert_array_equal(loaded.protocol, tiny.protocol)
    assert loaded.get_params() == est.get_params()
    assert loaded.normalisation_ == est.normalisation_ and loaded.train_fingerprint_ == tiny.fingerprint
    assert loaded.metrics_ == {"rmse_f": 0.1} and loaded.method_name == "net-hybrid-0.3"
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for key in ("kind", "params", "network", "normalisation", "data", "versions", "device", "determinism",
                "metrics", "weights"):
        assert key in manifest
    assert manifest["loss_weights"] == {"gt": 0.7, "mle": 0.3, "self": 0.0}


def test_load_refuses_tampered_or_foreign_bundles(tmp_path, tiny, small_network):
    est = small_network().fit(tiny)
    path = est.save(tmp_path / "gt")
    data = bytearray((path / SAFETENSORS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (path / SAFETENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        NetworkEstimator.load(path)
    from qmri_labels.estimators.bundle import save_bundle

    other = save_bundle(tmp_path / "other", {"w": est.network_.body[0].weight}, {"kind": "unet"})
    with pytest.raises(ValueError, match="not a qmri_labels.NetworkEstimator"):
        NetworkEstimator.load(other)
    state, manifest = load_bundle(est.save(tmp_path / "gt2"))
    assert "body.0.weight" in state


def test_mle_label_rows_with_failed_fits_are_left_out(tiny, mle_params, small_network):
    labels = mle_params.copy()
    labels[:50] = np.nan
    est = small_network(label="mle").fit(tiny, mle_labels=labels)
    assert est.n_excluded_ == 50 and est.n_train_ + est.n_val_ == 950
    assert est.mle_labels_["n_excluded"] == 50
    with pytest.raises(ValueError, match="shape"):
        small_network(label="mle").fit(tiny, mle_labels=labels[:10])


def test_mle_network_learns_mle_labels_not_truth(tiny, mle_params, small_network):
    # fit to labels that are the truth shifted by +20 % of the prior range in f: the mle
    # network must follow the shift, the gt network must not
    shifted = tiny.theta_true.copy()
    shifted[:, 1] += 0.2 * (tiny.prior_support[1, 1] - tiny.prior_support[0, 1])
    kw = dict(max_epochs=15, lr=1e-2)
    f_mle = small_network(label="mle", **kw).fit(tiny, mle_labels=shifted).predict(tiny.signals)[:, 1]
    f_gt = small_network(label="gt", **kw).fit(tiny).predict(tiny.signals)[:, 1]
    assert np.mean(f_mle - f_gt) > 0.05


def test_sklearn_style_params(tiny):
    est = NetworkEstimator(label="self", lr=5e-3)
    assert est.get_params()["lr"] == 5e-3
    assert est.set_params(batch_size=32) is est and est.batch_size == 32
    with pytest.raises(ValueError, match="invalid parameter"):
        est.set_params(learning_rate=1)
    assert "label='self'" in repr(est)
    with pytest.raises(ValueError, match="alpha"):
        NetworkEstimator(label="hybrid", alpha=2).fit(tiny)
    with pytest.raises(ValueError, match="batch_size"):
        NetworkEstimator(batch_size=0).fit(tiny)
    with pytest.raises(ValueError, match="Dataset"):
        NetworkEstimator().fit(tiny.signals)


# --- design space, presets, fit(X, y) -------------------------------------------------
def test_design_options_round_trip_through_a_bundle(tmp_path, tiny, small_network):
    est = small_network(label="gt", parallel=True, batch_norm=True, dropout=0.1, bounds_margin=0.3, fit_s0=False,
              hidden_layers=2, lr_schedule="plateau", weight_decay=1e-5, output_bounds="prior").fit(tiny)
    assert len(est.network_.body.subnets) == 4
    pred = est.predict(tiny.signals[:200], signal_scale=1.0)  # simulated: at the training scale
    assert np.all(pred[:, 0] == 1.0)  # S0 fixed
    support = tiny.prior_support
    span = support[1] - support[0]
    assert np.all(pred[:, 1:] >= (support[0] - 0.3 * span)[1:] - 1e-6)
    est.save(tmp_path / "b")
    back = NetworkEstimator.load(tmp_path / "b")
    for key in ("parallel", "batch_norm", "dropout", "bounds_margin", "fit_s0", "lr_schedule", "output_bounds",
                "weight_decay"):
        assert back.get_params()[key] == est.get_params()[key], key
    np.testing.assert_array_equal(back.predict(tiny.signals[:200], signal_scale=1.0), pred)


@pytest.mark.parametrize("kwargs, match", [
    ({"dropout": 1.5}, "dropout"), ({"bounds_margin": 2.0}, "bounds_margin"), ({"lr_schedule": "step"}, "lr_schedule"),
    ({"output_bounds": "box"}, "output_bounds"), ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"),
])
def test_invalid_design_options_are_refused(tiny, kwargs, match, small_network):
    with pytest.raises(ValueError, match=match):
        small_network(**kwargs).fit(tiny)
    with pytest.raises(TypeError, match="batch_norm"):
        small_network(batch_norm=1).fit(tiny)
    with pytest.raises(ValueError, match="preset"):
        NetworkEstimator.from_preset("deepivim")


def test_ivimnet_preset_builds_its_design():
    est = NetworkEstimator.from_preset("ivimnet", label="self", max_epochs=3)
    assert est.parallel and est.batch_norm and est.dropout == 0.1 and est.bounds_margin == 0.3
    assert est.lr == 3e-5 and est.batch_size == 128 and est.max_epochs == 3 and est.label == "self"


def test_fit_from_arrays_matches_fit_from_dataset(tiny, small_network):
    kw = dict(label="gt", max_epochs=2)
    a = small_network(**kw).fit(tiny)
    b = small_network(**kw).fit(tiny.signals, tiny.theta_true, protocol=tiny.protocol, bounds=tiny.prior_support)
    np.testing.assert_array_equal(a.predict(tiny.signals[:100]), b.predict(tiny.signals[:100]))
    assert b.train_spec_["source"] == "arrays" and len(b.train_fingerprint_) == 64


def test_fit_from_arrays_self_supervised_and_label_checks(tiny, small_network):
    est = small_network(label="self").fit(tiny.signals, protocol=tiny.protocol)
    assert est.predict(tiny.signals[:3]).shape == (3, 4)
    with pytest.raises(ValueError, match="no labels"):
        small_network(label="self").fit(tiny.signals, tiny.theta_true, protocol=tiny.protocol)
    with pytest.raises(ValueError, match="true parameters"):
        small_network(label="gt").fit(tiny.signals, protocol=tiny.protocol)
    with pytest.raises(ValueError, match="dict"):
        small_network(label="hybrid", alpha=0.5).fit(tiny.signals, tiny.theta_true, protocol=tiny.protocol)
    with pytest.raises(ValueError, match="shape"):
        small_network(label="gt").fit(tiny.signals, tiny.theta_true[:10], protocol=tiny.protocol)
    with pytest.raises(ValueError, match="protocol"):
        small_network(label="self").fit(tiny.signals)


def test_fit_from_arrays_mle_labels_computed_or_given(tiny, mle_params, small_network):
    given = small_network(label="hybrid", alpha=0.5).fit(tiny.signals, {"gt": tiny.theta_true, "mle": mle_params},
                                               protocol=tiny.protocol, bounds=tiny.prior_support)
    assert given.mle_labels_["source"] == "given"
    computed = small_network(label="mle", mle_options={"n_starts": 1}).fit(tiny.signals[:300], protocol=tiny.protocol,
                                                                 sigma=tiny.spec.sigma)
    assert computed.mle_labels_["source"] == "computed"


def test_warm_start_fine_tunes_a_loaded_network(tmp_path, tiny, small_network):
    base = small_network(label="gt", max_epochs=1).fit(tiny)
    base.save(tmp_path / "base")
    loaded = NetworkEstimator.load(tmp_path / "base")
    before = loaded.predict(tiny.signals[:50])
    loaded.set_params(warm_start=True, label="self", max_epochs=1, lr=1e-4, progress=False, accelerator="cpu")
    loaded.fit(tiny.signals, protocol=tiny.protocol)
    after = loaded.predict(tiny.signals[:50])
    # fine-tuned from the loaded weights: changed, but close (a fresh init would be far)
    fresh = small_network(label="self", max_epochs=1, lr=1e-4, seed=3).fit(tiny.signals, protocol=tiny.protocol)
    assert not np.array_equal(before, after)
    assert np.abs(after - before).mean() < np.abs(fresh.predict(tiny.signals[:50]) - before).mean()
    with pytest.raises(ValueError, match="warm_start"):
        loaded.fit(tiny.signals[:, :8], protocol=tiny.protocol[:8])


def test_dropout_networks_are_reproducible_whatever_ran_before(tiny, small_network):
    import torch

    kw = dict(label="self", dropout=0.2, batch_norm=True, max_epochs=1)
    torch.manual_seed(1)
    a = small_network(**kw).fit(tiny).predict(tiny.signals[:100])
    torch.manual_seed(2)
    torch.rand(1000)
    state = torch.get_rng_state()
    b = small_network(**kw).fit(tiny).predict(tiny.signals[:100])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG state is untouched
    np.testing.assert_array_equal(a, b)
    c = small_network(shuffle_seed=5, **kw).fit(tiny).predict(tiny.signals[:100])
    assert not np.array_equal(a, c)


# -- scikit-learn's contract: get_params / set_params / clone ----------------------------------

def test_get_params_set_params_round_trip():
    est = NetworkEstimator(label="hybrid", alpha=0.3, width=7)
    params = est.get_params()
    assert params == est.get_params(deep=False) and params["alpha"] == 0.3 and params["width"] == 7
    assert set(params) == set(NetworkEstimator._param_names())
    assert est.set_params(alpha=0.8, max_epochs=3) is est
    assert est.alpha == 0.8 and est.max_epochs == 3
    with pytest.raises(ValueError, match="invalid parameter 'alphaa'"):
        est.set_params(alphaa=0.1)


def test_clone_is_unfitted_with_equal_params_and_independent(tiny, small_network):
    options = {"noise": "rician"}
    original = small_network(label="mle", mle_options=options).fit(tiny)
    weights = {k: v.clone() for k, v in original.network_.state_dict().items()}
    copy_ = clone(original)
    assert type(copy_) is NetworkEstimator and not hasattr(copy_, "network_")
    assert not any(k.endswith("_") for k in vars(copy_))
    assert copy_.get_params() == original.get_params()
    # no mutable parameter is shared
    assert copy_.mle_options == options and copy_.mle_options is not original.mle_options
    copy_.set_params(seed=5, max_epochs=1).fit(tiny)
    assert original.seed == 0 and original.max_epochs == 2 and original.mle_options is options
    for key, value in original.network_.state_dict().items():
        assert torch.equal(value, weights[key])
    assert copy_.network_ is not original.network_


def test_clone_of_every_estimator_kind():
    for est in (MLEEstimator(model="monoexp", sigma=0.1), NetworkEstimator(width=5), QSMEstimator(n_members=2)):
        copy_ = clone(est)
        assert type(copy_) is type(est) and copy_.get_params() == est.get_params() and copy_ is not est
    with pytest.raises(TypeError, match="estimator"):
        clone({"label": "gt"})


def test_mle_fit_leaves_its_parameters_unchanged(tiny):
    est = MLEEstimator(sigma=tiny.spec.sigma, n_starts=1)
    before = est.get_params()
    est.fit(tiny)
    # the protocol learned from the dataset is a fitted attribute, not the parameter
    assert est.protocol is None and est.get_params() == before
    np.testing.assert_array_equal(est.protocol_, tiny.protocol)
    assert clone(est).get_params() == before
    # a given protocol wins over the dataset's and is stored as given
    given = list(tiny.protocol)
    fixed = MLEEstimator(protocol=given, sigma=tiny.spec.sigma, n_starts=1).fit(tiny)
    assert fixed.protocol is given
    np.testing.assert_array_equal(fixed.predict(tiny.signals[:5]), est.predict(tiny.signals[:5]))
