"""Train/test mismatch study on tiny IVIM datasets."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from qmri_labels.data.registry import load_dataset
from qmri_labels.paths import studies_dir
from qmri_labels.workflows import common, mismatch


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMRI_LABELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_tiny_mismatch_by_name_from_the_study_command(tmp_path):
    from qmri_labels import study
    from qmri_labels.estimators import NetworkEstimator

    out = tmp_path / "run"
    assert study.main(["--config", "tiny_mismatch", "--out", str(out), "--quiet", "--set", "network.max_epochs=3"]) == 0
    names = ["tiny_ivim_snr15", "tiny_ivim_snr30"]
    for f in ("matrix.csv", "matrix.md", "cells.csv", "ttests.csv", "findings.csv", "heatmap.png", "report.md",
              "manifest.json", "config.yaml"):
        assert (out / f).is_file(), f
    matrix = pd.read_csv(out / "matrix.csv").set_index("train \\ test")
    assert list(matrix.index) == names and list(matrix.columns) == names
    assert np.all(np.isfinite(matrix.to_numpy())) and np.all(matrix.to_numpy() > 0)
    # one paired test per column (2 training sets), Bonferroni over the 2
    tt = pd.read_csv(out / "ttests.csv")
    assert len(tt) == 2 and set(tt["test"]) == set(names)
    np.testing.assert_allclose(tt["p_adjusted"], np.minimum(1, 2 * tt["p_value"]))
    # every network reloads from its bundle and reproduces its cell of the matrix
    test = load_dataset("tiny_ivim_snr30", "test")
    for train_name in names:
        net = NetworkEstimator.load(out / "networks" / train_name)
        rmse = np.sqrt(np.mean(common.per_sample_l2(net.predict(test.signals), test, ["f", "D", "Dstar"])))
        assert rmse == pytest.approx(matrix.loc[train_name, "tiny_ivim_snr30"], rel=1e-6)
        assert net.manifest_["data_fingerprints"]["tests"]["tiny_ivim_snr30"] == test.fingerprint
        assert net.training_config()["max_epochs"] == 3
    cells = pd.read_csv(out / "cells.csv")
    assert cells.groupby("test")["test_fingerprint"].nunique().max() == 1
    report = (out / "report.md").read_text()
    assert "Paired t-tests" in report and "tiny_ivim_snr15" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_fingerprints"]["tiny_ivim_snr30"]["test"] == test.fingerprint
    assert manifest["kind"] == "mismatch" and "command" in manifest


def test_qsm_resolution_mismatch_tiny(tmp_path):
    config = yaml.safe_load((studies_dir() / "tiny_mismatch_qsm.yaml").read_text())
    config["qsm"].update(max_epochs=1, samples_per_epoch=1, unet={"levels": 2, "init_channels": 2})
    result = mismatch.run(config, tmp_path / "qsm", quiet=True)
    matrix = result["matrix"]
    assert matrix.shape == (2, 2) and np.all(np.isfinite(matrix.to_numpy())) and np.all(matrix.to_numpy() > 0)
    cells = pd.read_csv(tmp_path / "qsm" / "cells.csv")
    assert "nrmse" in cells and cells.groupby("test")["test_fingerprint"].nunique().max() == 1
    assert "NRMSE (%)" in (tmp_path / "qsm" / "report.md").read_text()
    assert (tmp_path / "qsm" / "networks" / "tiny_qsm_1x1x3mm").is_dir()


def test_incompatible_protocols_are_skipped_with_a_reason(tmp_path):
    six_b = {"name": "six_b", "spec": {"protocol": [0, 20, 50, 100, 300, 800], "snr": 30},
             "splits": {"train": {"n": 300, "seed": 11}, "test": {"n": 64, "seed": 12}}}
    config = {"datasets": ["tiny_ivim_snr30", six_b], "n_train": 300,
              "network": {"hidden_layers": 1, "batch_size": 64, "max_epochs": 1, "patience": 0}}
    result = mismatch.run(config, tmp_path / "run", quiet=True)
    matrix = result["matrix"]
    assert np.isnan(matrix.loc["six_b", "tiny_ivim_snr30"]) and np.isnan(matrix.loc["tiny_ivim_snr30", "six_b"])
    assert np.isfinite(matrix.loc["six_b", "six_b"])
    assert "10 inputs vs 6 measurements" in (tmp_path / "run" / "report.md").read_text()
    assert len(result["ttests"]) == 0


def test_bad_configs():
    with pytest.raises(ValueError, match="at least two datasets"):
        mismatch.run({"datasets": ["tiny_ivim_snr30"]}, "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="unknown config keys.*epochs"):
        mismatch.run({"epochs": 3}, "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="mix kinds"):
        mismatch.run({"datasets": ["tiny_ivim_snr30", "tiny_qsm_1mm"]}, "/tmp/unused", quiet=True)
