"""load_results reads a study's folder back by name: tables, figures, networks, manifest."""

import json

import numpy as np
import pandas as pd
import pytest

from qmri_labels.workflows.results import StudyResult, load_results


def test_a_folder_reads_back_by_name(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "ivim_labels", "seeds": {"seed": 3}}))
    (tmp_path / "config.yaml").write_text("kind: ivim_labels\nsnr: 30\n")
    pd.DataFrame({"method": ["a", "b"], "rmse": [0.1, 0.2]}).to_csv(tmp_path / "summary.csv", index=False)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "grid.csv", index=False)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "bias_sd_rmse.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("# report\n")
    result = load_results(tmp_path)
    assert isinstance(result, StudyResult) and result.kind == "ivim_labels" and result.config["snr"] == 30
    assert sorted(result.tables) == ["grid", "summary"]
    assert result.summary["rmse"].tolist() == [0.1, 0.2]
    assert result.figures["bias_sd_rmse"] == tmp_path / "figures" / "bias_sd_rmse.png"
    assert result.report == "# report\n" and result.networks == {}
    with pytest.raises(KeyError, match="no table 'nope'.*grid, summary|no table 'nope'"):
        result.tables["nope"]
    with pytest.raises(KeyError, match="no network"):
        result.network("net-gt")


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json, summary.csv or grid.csv"):
        load_results(tmp_path)


def test_a_study_s_networks_load_and_predict(tmp_path):
    from qmri_labels.cli.study import main

    out = tmp_path / "run"
    assert main(["--config", "tiny_ivim", "--out", str(out), "--quiet", "--set", "labels=[gt]", "--alpha", "0.5"]) == 0
    result = load_results(out)
    assert "net-gt" in result.networks and set(result.summary["method"]) >= {"fit-mle", "net-gt"}
    signals = np.ones((3, len(result.config["bvalues"])), dtype=np.float32)
    assert result.network("net-gt").predict(signals).shape == (3, 4)
