"""Train/test mismatch study on tiny IVIM datasets."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from qmri_labels.data.registry import load_dataset
from qmri_labels.paths import studies_dir
from qmri_labels.workflows import common, mismatch


def test_tiny_mismatch_by_name_from_the_study_command(tmp_path):
    from qmri_labels.cli import study
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
        rmse = np.sqrt(np.mean(common.per_sample_l2(net.predict(test.signals, signal_scale=1.0), test, ["f", "D", "Dstar"])))
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
    assert {"xsim", "hfen", "ssim"} <= set(cells.columns)


def test_qsm_resolution_datasets_differ_only_in_resolution():
    """Oh et al.'s premise: same phantoms, same masking, same BFR; only the resolution changes."""
    from qmri_labels.data.definitions import get_definition
    from qmri_labels.data.qsm import generate_qsm
    from qmri_labels.physics.qsm import change_resolution

    fine_def, coarse_def = get_definition("tiny_qsm_1mm"), get_definition("tiny_qsm_1x1x3mm")
    for split in ("train", "test"):
        fine_spec, coarse_spec = fine_def.splits[split], coarse_def.splits[split]
        differing = {k for k in fine_spec if fine_spec[k] != coarse_spec[k]}
        assert differing == {"truncate_to"}  # same seeds, noise, field kind (masked local), no BFR either way
    assert fine_def.splits["test"]["field_kind"] == "local" and fine_def.splits["test"]["bfr"] is None
    fine = generate_qsm(fine_def.splits["test"])
    coarse = generate_qsm(coarse_def.splits["test"])
    # both fields are masked local fields: zero outside their own masks
    for data in (fine, coarse):
        assert np.all(data.fields[:, 0][~data.mask] == 0) and np.all(data.chi[~data.mask] == 0)
    # the coarse set IS the fine set, k-space truncated and masked the same way
    mask = change_resolution(fine.mask.astype(np.float64), (1, 1, 1), (1, 1, 3)) > 0.5
    np.testing.assert_array_equal(coarse.mask, mask)
    np.testing.assert_allclose(coarse.chi, change_resolution(fine.chi.astype(np.float64), (1, 1, 1), (1, 1, 3)) * mask,
                               atol=1e-6)
    np.testing.assert_allclose(coarse.fields,
                               change_resolution(fine.fields.astype(np.float64), (1, 1, 1), (1, 1, 3)) * mask[:, None],
                               atol=1e-6)


def test_qsm_bfr_mismatch_by_name_gives_a_4x4_matrix_and_12_tests(tmp_path):
    from qmri_labels.data.definitions import get_definition
    from qmri_labels.data.qsm import generate_qsm

    names = ["tiny_qsm_bfr_vsharp", "tiny_qsm_bfr_lbv", "tiny_qsm_bfr_pdf", "tiny_qsm_bfr_resharp"]
    # the four datasets hold the same phantoms; only the BFR method differs
    specs = [get_definition(n).splits["test"] for n in names]
    assert all({k for k in s if s[k] != specs[0][k]} <= {"bfr"} for s in specs)
    data = [generate_qsm(s) for s in specs]
    assert len({d.fingerprint for d in data}) == 4
    for d in data[1:]:  # same objects: chi agrees wherever both eroded masks hold
        both = d.mask & data[0].mask
        np.testing.assert_array_equal(d.chi[both], data[0].chi[both])

    config = yaml.safe_load((studies_dir() / "tiny_mismatch_qsm_bfr.yaml").read_text())
    config["qsm"].update(max_epochs=1, samples_per_epoch=1, unet={"levels": 2, "init_channels": 2})
    result = mismatch.run(config, tmp_path / "bfr", quiet=True)
    matrix = result["matrix"]
    assert matrix.shape == (4, 4) and np.all(np.isfinite(matrix.to_numpy()))
    ttests = result["ttests"]
    assert len(ttests) == 12  # matched network vs each other one, in each of the 4 columns
    assert all((r.train_a == r.test) or (r.train_b == r.test) for r in ttests.itertuples())
    # Bonferroni over the 12 comparisons
    np.testing.assert_allclose(ttests["p_adjusted"], np.minimum(1.0, ttests["p_value"] * 12))
    assert "XSIM" in (tmp_path / "bfr" / "report.md").read_text()
    # each network records the BFR method of its training fields as its input kind (the fit command
    # refuses it on other inputs)
    for name in names:
        manifest = json.loads((tmp_path / "bfr" / "networks" / name / "manifest.json").read_text())
        assert manifest["input_kind"] == f"bfr:{name.rsplit('_', 1)[1]}", name


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
    with pytest.raises(ValueError, match="unknown configuration key .epochs."):
        mismatch.run({"epochs": 3}, "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="mix kinds"):
        mismatch.run({"datasets": ["tiny_ivim_snr30", "tiny_qsm_1mm"]}, "/tmp/unused", quiet=True)
