"""Random hyperparameter search with a shared Optuna store, reference vs tuned on the test set."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from qmri_labels.paths import studies_dir
from qmri_labels.workflows import hparam


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMRI_LABELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv(hparam.STORAGE_ENV, raising=False)


def tiny_config(**changes):
    config = yaml.safe_load((studies_dir() / "tiny_hparam.yaml").read_text())
    config["network"]["max_epochs"] = 2
    config.update(changes)
    return config


def test_search_picks_by_validation_and_compares_on_test(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    out = tmp_path / "w0"
    result = hparam.run(tiny_config(storage=storage, study_name="tiny"), out, quiet=True)
    for f in ("trials.csv", "best_params.json", "comparison.csv", "ttest.csv", "search.png", "report.md",
              "manifest.json", "networks/reference/manifest.json", "networks/tuned/manifest.json"):
        assert (out / f).is_file(), f
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and trials["state"].eq("COMPLETE").all()
    best = json.loads((out / "best_params.json").read_text())
    assert best["validation_l2"] == pytest.approx(trials["value"].min())
    comparison = result["comparison"].set_index("network")
    # retraining the best trial with the same seed reproduces its validation score exactly
    assert comparison.loc["tuned", "validation_l2"] == best["validation_l2"]
    for key, value in best["params"].items():
        assert comparison.loc["tuned", key] == value
    assert comparison.loc["reference", "lr"] == 1e-3 and comparison.loc["reference", "hidden_layers"] == 3
    tt = result["ttest"]
    assert tt["n"] == 256 and 0 <= tt["p_value"] <= 1
    assert np.isclose(tt["mean_diff"], comparison.loc["tuned", "test_l2"] - comparison.loc["reference", "test_l2"])
    # a second worker on the same store adds trials with other draws; the best is taken over all
    result2 = hparam.run(tiny_config(storage=storage, study_name="tiny", worker=1, n_trials=1), tmp_path / "w1",
                         quiet=True)
    trials2 = pd.read_csv(tmp_path / "w1" / "trials.csv")
    assert len(trials2) == 4
    assert trials2.drop_duplicates(subset=[c for c in trials2 if c.startswith("params_")]).shape[0] == 4
    assert result2["manifest"]["optuna"]["trials_in_study"] == 4


def test_default_storage_is_sqlite_in_the_output_folder(tmp_path):
    hparam.run(tiny_config(n_trials=1), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "optuna.db").is_file()


def test_bad_search_spaces():
    with pytest.raises(ValueError, match="cannot search over 'colour'"):
        hparam.run(tiny_config(search_space={"colour": ["red"]}), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="low < high"):
        hparam.run(tiny_config(search_space={"lr": {"low": 1, "high": 0.1}}), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="both fixed"):
        hparam.run(tiny_config(network={"lr": 0.1}), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="n_trials"):
        hparam.run(tiny_config(n_trials=0), "/tmp/unused", quiet=True)
