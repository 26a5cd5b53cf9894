"""The QSM seeds' studies on anatomical heads: Oh et al. (2021)'s resolution and BFR mismatch
with a pilot and power analysis, and Graf et al. (2023)'s activation study with training seeds,
each by name at a tiny size; the mismatch datasets differ in one factor only."""

import json

import numpy as np
import pandas as pd
import pytest

from qmri_labels.data.definitions import get_definition
from qmri_labels.data.qsm import generate_qsm
from qmri_labels.data.qsm.phantom_set import _coarsen
from qmri_labels.physics.qsm import change_resolution
from qmri_labels.workflows import mismatch

RESOLUTION = [("qsm_anatomical_4mm", "qsm_anatomical_4x4x12mm"),
              ("tiny_qsm_anatomical", "tiny_qsm_anatomical_8x8x24mm")]
BFR = ["vsharp", "lbv", "pdf", "resharp"]


def _differing(a: dict, b: dict) -> set:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.parametrize("fine, coarse", RESOLUTION)
def test_anatomical_resolution_datasets_differ_only_in_resolution(fine, coarse):
    fine_def, coarse_def = get_definition(fine), get_definition(coarse)
    assert set(fine_def.splits) == set(coarse_def.splits)
    for split in fine_def.splits:
        assert _differing(fine_def.splits[split], coarse_def.splits[split]) == {"truncate_to"}, split
        assert fine_def.splits[split]["family"] == "anatomical" and fine_def.splits[split]["bfr"] is None


def test_tiny_anatomical_coarse_heads_are_the_fine_heads_truncated():
    fine_def, coarse_def = get_definition("tiny_qsm_anatomical"), get_definition("tiny_qsm_anatomical_8x8x24mm")
    fine, coarse = generate_qsm(fine_def.splits["test"]), generate_qsm(coarse_def.splits["test"])
    assert coarse.chi.shape[1:] == (24, 24, 8) and coarse.voxel_size == (8.0, 8.0, 24.0)
    mask = change_resolution(fine.mask.astype(np.float64), (8, 8, 8), (8, 8, 24)) > 0.5
    np.testing.assert_array_equal(coarse.mask, mask)
    np.testing.assert_allclose(coarse.chi, change_resolution(fine.chi.astype(np.float64), (8, 8, 8), (8, 8, 24)) * mask,
                               atol=1e-6)
    np.testing.assert_allclose(coarse.fields, change_resolution(fine.fields.astype(np.float64), (8, 8, 8),
                                                                (8, 8, 24)) * mask[:, None], atol=1e-6)
    for data in (fine, coarse):
        assert np.all(data.fields[:, 0][~data.mask] == 0)


@pytest.mark.parametrize("prefix", ["qsm_anatomical_bfr_", "tiny_qsm_anatomical_bfr_"])
def test_anatomical_bfr_datasets_differ_only_in_the_bfr_method(prefix):
    definitions = [get_definition(prefix + m) for m in BFR]
    for d in definitions:
        assert set(d.splits) == set(definitions[0].splits)
        for split, spec in d.splits.items():
            assert _differing(spec, definitions[0].splits[split]) <= {"bfr"}, (d.name, split)
            assert spec["family"] == "anatomical" and spec["field_kind"] == "total" and spec["resample_to"]
        assert d.splits["test"]["bfr"]["method"] == d.name.rsplit("_", 1)[1]


def test_tiny_anatomical_bfr_sets_are_one_set_of_heads_processed_four_ways():
    specs = [get_definition("tiny_qsm_anatomical_bfr_" + m).splits["test"] for m in BFR]
    # before the truncation: the same heads, chi agreeing wherever two eroded masks both hold
    at_bfr = [generate_qsm({k: v for k, v in s.items() if k != "resample_to"}) for s in specs]
    for d in at_bfr[1:]:
        both = d.mask & at_bfr[0].mask
        assert both.sum() > 0
        np.testing.assert_array_equal(d.chi[both], at_bfr[0].chi[both])
    # the sets are these, truncated from 6 to 12 mm after the BFR
    for spec, d in zip(specs, at_bfr):
        data = generate_qsm(spec)
        chi, mask, fields, _ = _coarsen(d.chi, d.mask, d.fields, None, (6, 6, 6), (12, 12, 12), True)
        assert data.chi.shape[1:] == (16, 16, 16) and data.voxel_size == (12.0, 12.0, 12.0)
        np.testing.assert_array_equal(data.mask, mask)
        np.testing.assert_allclose(data.chi, chi, atol=1e-6)
        np.testing.assert_allclose(data.fields, fields, atol=1e-6)
        assert data.recipe["resample_to"] == [12.0, 12.0, 12.0] and data.bfr["method"] == spec["bfr"]["method"]


def test_resample_to_is_refused_without_bfr_or_when_finer():
    base = {"name": "q", "kind": "qsm", "spec": {"shape": [16, 16, 16], "voxel_size": [2, 2, 2]},
            "splits": {"train": {"n": 1, "seed": 1}, "test": {"n": 1, "seed": 2}}}
    with pytest.raises(ValueError, match="without bfr use truncate_to"):
        get_definition({**base, "spec": {**base["spec"], "resample_to": [4, 4, 4]}})
    with pytest.raises(ValueError, match="must not be finer"):
        get_definition({**base, "spec": {**base["spec"], "field_kind": "total", "bfr": "sharp",
                                         "resample_to": [1, 1, 1]}})
    # a recipe without it has no such key, so the other datasets' fingerprints stay as they were
    assert "resample_to" not in get_definition("tiny_qsm_bfr_pdf").splits["test"]


def _check_power(out, n_comparisons, low, high):
    power = pd.read_csv(out / "power.csv")
    assert len(power) == n_comparisons and (power["pilot_n"] == 3).all()
    np.testing.assert_allclose(power["alpha_corrected"], 0.05 / n_comparisons)
    manifest = json.loads((out / "manifest.json").read_text())
    n_test = manifest["power"]["n_test"]
    assert low <= n_test <= high
    # the test heads are other heads than the pilot's
    for name, prints in manifest["data_fingerprints"].items():
        assert prints["pilot"] != prints["test"], name
    tt = pd.read_csv(out / "ttests.csv")
    assert (tt["n"] == n_test).all()
    np.testing.assert_allclose(tt["p_adjusted"], np.minimum(1.0, tt["p_value"] * n_comparisons))
    return power, tt


def test_tiny_anatomical_resolution_mismatch_by_name(tmp_path):
    from qmri_labels.cli import study

    out = tmp_path / "res"
    assert study.main(["--config", "tiny_mismatch_qsm_anatomical", "--out", str(out), "--quiet"]) == 0
    power, _ = _check_power(out, 2, 3, 4)
    # the named primary comparison, and only it, decides the number of test heads
    primary = power[power["primary"]]
    assert len(primary) == 1 and primary["test"].iloc[0] == "tiny_qsm_anatomical_8x8x24mm"
    matrix = pd.read_csv(out / "matrix.csv").set_index("train \\ test")
    assert matrix.shape == (2, 2) and np.all(np.isfinite(matrix.to_numpy()))
    assert "Power analysis" in (out / "report.md").read_text()


def test_tiny_anatomical_bfr_mismatch_by_name(tmp_path):
    from qmri_labels.cli import study

    out = tmp_path / "bfr"
    assert study.main(["--config", "tiny_mismatch_qsm_bfr_anatomical", "--out", str(out), "--quiet"]) == 0
    power, tt = _check_power(out, 12, 3, 4)
    assert power["primary"].all()
    assert len(tt) == 12 and all((r.train_a == r.test) or (r.train_b == r.test) for r in tt.itertuples())
    matrix = pd.read_csv(out / "matrix.csv").set_index("train \\ test")
    assert matrix.shape == (4, 4) and np.all(np.isfinite(matrix.to_numpy()))


def test_power_settings_are_checked():
    names = ["tiny_qsm_anatomical", "tiny_qsm_anatomical_8x8x24mm"]
    with pytest.raises(ValueError, match="n_test or power"):
        mismatch.run({"datasets": names, "n_test": 3, "power": {}}, "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="not a \\[test, train\\] pair"):
        mismatch.run({"datasets": names, "n_test": None, "power": {"primary": [["x", names[0]]]}}, "/tmp/unused",
                     quiet=True)
    with pytest.raises(ValueError, match="unknown keys"):
        mismatch.run({"datasets": names, "n_test": None, "power": {"pilot": 3}}, "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="made for QSM"):
        mismatch.run({"datasets": ["tiny_ivim_snr15", "tiny_ivim_snr30"], "power": {}}, "/tmp/unused", quiet=True)


def test_tiny_anatomical_activation_study_by_name(tmp_path):
    from qmri_labels.cli import study

    out = tmp_path / "act"
    assert study.main(["--config", "tiny_qsm_activation_anatomical", "--out", str(out), "--quiet"]) == 0
    convergence = pd.read_csv(out / "convergence.csv")
    assert len(convergence) == 4 and set(convergence["seed"]) == {0, 1}
    # every run reaches the default level (the worst run's best validation loss), some only at it
    reach = convergence["reach_loss"].iloc[0]
    assert reach == pytest.approx(convergence["best_val_loss"].max())
    assert convergence["epochs_to_reach"].between(1, 2).all()
    history = pd.read_csv(out / "history.csv")
    for r in convergence.itertuples():
        losses = history[history["network"] == r.run]["val_loss"].to_numpy()
        assert r.epochs_to_reach == 1 + np.flatnonzero(losses <= reach)[0]
        assert r.mean_val_loss == pytest.approx(losses.mean())
    summary = pd.read_csv(out / "seed_summary.csv")
    assert list(summary["n_seeds"]) == [2, 2]
    elu = pd.read_csv(out / "elu_tests.csv")
    assert set(elu["measure"]) == {"epochs_to_reach", "mean_val_loss"} and (elu["n_seeds"] == 2).all()
    results = pd.read_csv(out / "results.csv")
    assert {"relu-2-s0", "elu-2-s1", "tkd", "tv"} <= set(results["method"])


def test_tiny_anatomical_hparam_search_by_name(tmp_path):
    from scipy import stats

    from qmri_labels.cli import study
    from qmri_labels.data.registry import load_dataset
    from qmri_labels.estimators import QSMEstimator
    from qmri_labels.workflows.hparam import qsm_l2

    out = tmp_path / "hp"
    assert study.main(["--config", "tiny_hparam_qsm_anatomical", "--out", str(out), "--quiet"]) == 0
    best = json.loads((out / "best_params.json").read_text())
    assert set(best["params"]) == {"lr", "init_channels", "activation"}
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 2
    assert best["validation_l2"] == pytest.approx(trials["value"].min())
    # the saved networks are the compared ones: their per-head test L2 gives the recorded t-test
    test = load_dataset("tiny_qsm_anatomical", "test")
    l2 = {name: qsm_l2(QSMEstimator.load(out / "networks" / name), test) for name in ("reference", "tuned")}
    comparison = pd.read_csv(out / "comparison.csv").set_index("network")
    for name, values in l2.items():
        assert comparison.loc[name, "test_l2"] == pytest.approx(values.mean(), rel=1e-5)
    assert QSMEstimator.load(out / "networks" / "reference").network_.config.activation == "leaky_relu"
    ttest = pd.read_csv(out / "ttest.csv").iloc[0]
    if np.any(l2["tuned"] != l2["reference"]):
        assert ttest["p_value"] == pytest.approx(stats.ttest_rel(l2["tuned"], l2["reference"]).pvalue, rel=1e-4)


def test_a_qsm_search_takes_its_settings_under_qsm():
    from qmri_labels.workflows import hparam

    config = hparam.resolve_config({"dataset": "tiny_qsm_anatomical"})
    assert config["search_space"] == hparam.QSM_DEFAULTS["search_space"]
    with pytest.raises(ValueError, match="give its search_space under qsm.search_space"):
        hparam.resolve_config({"dataset": "tiny_qsm_anatomical", "search_space": {"width": [10, 20]}})
    with pytest.raises(ValueError, match="cannot search over 'width'"):
        hparam.resolve_config({"dataset": "tiny_qsm_anatomical", "qsm": {"search_space": {"width": [10, 20]}}})
    with pytest.raises(ValueError, match="not a QSM dataset"):
        hparam.resolve_config({"dataset": "tiny_ivim_snr30", "qsm": {}})


def test_seed_analysis_counts_epochs_and_gives_no_t_test_for_a_constant_difference():
    from qmri_labels.workflows.qsm.activation import seed_analysis

    curves = {  # validation loss per epoch; ELU reaches 0.5 one epoch before ReLU on every seed
        ("elu", 0): [0.9, 0.5, 0.4], ("relu", 0): [0.9, 0.6, 0.5],
        ("elu", 1): [0.8, 0.45, 0.42], ("relu", 1): [0.8, 0.7, 0.45],
        ("elu", 2): [0.7, 0.5, 0.3], ("relu", 2): [0.9, 0.55, 0.5],
    }
    histories = {f"{a}-4-s{s}": [{"epoch": i, "val_loss": v} for i, v in enumerate(c)] for (a, s), c in curves.items()}
    runs = {f"{a}-4-s{s}": {"activation": a, "channels": 4, "seed": s} for a, s in curves}
    results = pd.DataFrame([{"method": n, "nrmse": 40.0 + k, "ssim": 0.7} for k, n in enumerate(histories)])
    convergence, summary, elu = seed_analysis(histories, runs, results, {"reach_loss": None})
    assert convergence["reach_loss"].iloc[0] == pytest.approx(0.5)  # the worst run's best loss
    epochs = convergence.set_index("run")["epochs_to_reach"]
    assert list(epochs[[f"elu-4-s{s}" for s in range(3)]]) == [2, 2, 2]
    assert list(epochs[[f"relu-4-s{s}" for s in range(3)]]) == [3, 3, 3]
    row = elu[elu["measure"] == "epochs_to_reach"].iloc[0]
    assert row["mean_diff"] == -1 and np.isnan(row["t"]) and not row["significant"]
    assert row["wilcoxon_p"] == pytest.approx(0.25)  # the smallest two-sided exact p with 3 pairs
    loss = elu[elu["measure"] == "mean_val_loss"].iloc[0]
    assert np.isfinite(loss["t"]) and loss["p_adjusted"] == pytest.approx(min(1.0, 2 * loss["p_value"]))
    assert list(summary["n_seeds"]) == [3, 3]
