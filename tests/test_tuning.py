import math

import numpy as np
import pytest

from qmri_labels.estimators import NetworkEstimator
from qmri_labels.tuning import DEFAULT_SPACE, tune

BASE = dict(max_epochs=3, patience=0, accelerator="cpu", devices=1, progress=False, num_threads=1)
#: a deliberately bad default: a learning rate so small that 3 epochs barely move the weights
BAD = dict(BASE, lr=1e-6, hidden_layers=1, batch_size=512)
SPACE = {"lr": ("logfloat", 1e-4, 1e-2), "hidden_layers": ("int", 1, 3), "batch_size": ("categorical", [64, 512])}


@pytest.fixture(scope="module")
def data(ivim_set):
    return ivim_set(n=1500, seed=11, snr=30)


@pytest.mark.parametrize("label, criterion", [("gt", "val_loss"), ("self", "param_rmse")])
def test_small_search_beats_a_bad_default(data, label, criterion):
    space = dict(SPACE, lr=("logfloat", 1e-6, 1e-2))  # the bad default lies inside the space
    est = tune(label, data, n_trials=5, seed=0, criterion=criterion, base=BAD, space=space)
    info = est.tuning_
    default = info["default"]
    assert default["number"] == 0 and default["params"]["lr"] == 1e-6  # the untuned design was trial 0
    assert info["best_value"] < 0.8 * default[criterion]
    assert info["best_params"] != default["params"]
    assert len(info["trials"]) == 5 and all(math.isfinite(t["val_loss"]) and math.isfinite(t["param_rmse"])
                                            for t in info["trials"])
    # the returned network is the best trial's, fitted
    assert est.lr == info["best_params"]["lr"] and est.predict(data.signals[:4]).shape == (4, 4)
    assert info["split"]["n_validation"] == 300 and info["split"]["n_fit"] == 1200


def test_tuning_is_deterministic_and_recorded_in_the_bundle(tmp_path, data):
    a = tune("gt", data, n_trials=2, seed=3, base=BASE, space=SPACE, include_default=False)
    b = tune("gt", data, n_trials=2, seed=3, base=BASE, space=SPACE, include_default=False)
    assert a.tuning_["best_params"] == b.tuning_["best_params"]
    np.testing.assert_array_equal(a.predict(data.signals[:50]), b.predict(data.signals[:50]))
    a.save(tmp_path / "tuned")
    back = NetworkEstimator.load(tmp_path / "tuned")
    assert back.tuning_["best_params"] == a.tuning_["best_params"] and back.tuning_["criterion"] == "val_loss"


def test_tune_refuses_bad_arguments(data):
    with pytest.raises(ValueError, match="criterion"):
        tune("gt", data, n_trials=1, criterion="grid_rmse")
    with pytest.raises(ValueError, match="search space"):
        tune("gt", data, n_trials=1, space={"colour": ("categorical", ["red"])})
    with pytest.raises(ValueError, match="low < high"):
        tune("gt", data, n_trials=1, space={"lr": ("logfloat", 1e-2, 1e-4)})
    with pytest.raises(ValueError, match="n_trials"):
        tune("gt", data, n_trials=0)
    with pytest.raises(ValueError, match="base"):
        tune("gt", data, n_trials=1, base={"seed": 1})
    assert "parallel" in DEFAULT_SPACE and "batch_norm" in DEFAULT_SPACE


def test_pruning_stops_trials_that_fall_behind_and_keeps_the_best_design(data):
    from qmri_labels.tuning import PRUNE_STARTUP_TRIALS, PRUNE_WARMUP_EPOCHS

    base = dict(BASE, max_epochs=PRUNE_WARMUP_EPOCHS + 4)
    # a learning rate that cannot learn in 14 epochs against one that can
    space = {"lr": ("categorical", [3e-3, 1e-9]), "hidden_layers": ("int", 1, 2)}
    pruned = tune("gt", data, n_trials=10, seed=0, base=base, space=space).tuning_
    full = tune("gt", data, n_trials=10, seed=0, base=base, space=space, prune=False).tuning_
    assert pruned["prune"] is True and full["prune"] is False and full["n_pruned"] == 0
    stopped = [t for t in pruned["trials"] if t["pruned"]]
    assert pruned["n_pruned"] == len(stopped) >= 1
    for t in stopped:
        # only after the startup trials and the warm-up epochs, and only the design that cannot learn
        assert t["number"] >= PRUNE_STARTUP_TRIALS and PRUNE_WARMUP_EPOCHS < t["epochs"] < base["max_epochs"]
        assert t["params"]["lr"] == 1e-9
    assert sum(t["epochs"] for t in pruned["trials"]) < sum(t["epochs"] for t in full["trials"])
    assert pruned["best_params"] == full["best_params"] and pruned["best_value"] == full["best_value"]
    # pruning follows the label's loss, so it is off for the parameter criterion
    assert tune("gt", data, n_trials=1, base=BASE, space=space, criterion="param_rmse").tuning_["prune"] is False
    with pytest.raises(ValueError, match="prune=True needs criterion 'val_loss'"):
        tune("gt", data, n_trials=1, criterion="param_rmse", prune=True)


def test_trials_leave_out_the_variance_head_without_changing_a_score(data):
    # dropout and batch norm draw on the RNG and on the batch: the head must not change either
    space = {"lr": ("logfloat", 1e-4, 1e-2), "dropout": ("categorical", [0.0, 0.1]),
             "batch_norm": ("categorical", [False, True])}
    with_head = tune("gt", data, n_trials=3, seed=2, base=dict(BASE, uncertainty="variance_head"), space=space)
    plain = tune("gt", data, n_trials=3, seed=2, base=dict(BASE, uncertainty=None), space=space)
    assert with_head.tuning_["trials_without_variance_head"] and not plain.tuning_["trials_without_variance_head"]
    pairs = list(zip(with_head.tuning_["trials"], plain.tuning_["trials"]))
    assert len(pairs) == 3 and any(a["params"]["dropout"] > 0 for a, _ in pairs)
    for a, b in pairs:
        assert (a["params"], a["val_loss"], a["param_rmse"]) == (b["params"], b["val_loss"], b["param_rmse"])
    # refit (the default): the best design again, with its head; the same point estimates
    assert with_head.uncertainty == "variance_head"
    mean, sd = with_head.predict(data.signals[:50], return_sd=True)
    np.testing.assert_array_equal(mean, plain.predict(data.signals[:50]))
    assert np.all(sd[:, 1:] > 0)
    searched = tune("gt", data, n_trials=3, seed=2, base=dict(BASE, uncertainty="variance_head"), space=space,
                    refit=False)
    assert searched.uncertainty is None and searched.tuning_["best_params"] == with_head.tuning_["best_params"]
    np.testing.assert_array_equal(searched.predict(data.signals[:50]), mean)
    with pytest.raises(ValueError, match="refit must be True or False"):
        tune("gt", data, n_trials=1, refit="yes")
