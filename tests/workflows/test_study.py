import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from qmri_labels.cli import study
from qmri_labels.workflows import run
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.workflows.registry import Workflow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    # alpha 0 and 1 are the pure losses: their networks must equal net-gt and net-mle; the
    # networks carry the default variance heads, so every method reports SDs for the calibration section
    assert study.main(["--config", "tiny_ivim", "--alpha", "0", "1", "--out", str(out), "--quiet"]) == 0
    return out


def test_results_folder_is_complete(tiny_run):
    for name in ("config.yaml", "manifest.json", "summary.csv", "heldout.csv", "report.md", "grid.csv"):
        assert (tiny_run / name).is_file(), name
    summary = pd.read_csv(tiny_run / "summary.csv")
    for col in ("method", "parameter", "mean_abs_bias", "mean_sd", "rmse", "sensitivity"):
        assert col in summary.columns
    assert list(dict.fromkeys(summary["method"])) == ["fit-mle", "net-gt", "net-mle", "net-self", "net-hybrid-0",
                                                      "net-hybrid-1"]
    assert set(summary["parameter"]) == {"S0", "f", "D", "Dstar"}
    assert np.all(np.isfinite(summary[["mean_abs_bias", "mean_sd", "rmse"]].to_numpy()))
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["kind"] == "ivim_labels" and config["alpha"] == [0.0, 1.0] and config["n_train"] == 1500


def test_summary_has_calibration_for_every_method(tiny_run):
    from qmri_labels.analysis.report import CALIBRATION_COLUMNS

    summary = pd.read_csv(tiny_run / "summary.csv")
    assert {"coverage_95", "mean_halfwidth_95", "crps", "coverage_50", "coverage_90", "z_rms"} <= set(summary.columns)
    assert set(CALIBRATION_COLUMNS) <= set(summary.columns)
    methods = list(dict.fromkeys(summary["method"]))
    assert len(methods) == 6
    # every method reports an SD (MLE: Fisher SEs; networks: the study's default variance heads)
    varied = summary[summary["parameter"].isin(["f", "D", "Dstar"])]
    values = varied[["coverage_95", "mean_halfwidth_95", "crps", "z_rms"]].to_numpy()
    assert np.all(np.isfinite(values)) and np.all(values[:, 1:] > 0)
    assert np.all((values[:, 0] >= 0) & (values[:, 0] <= 1))
    report = (tiny_run / "report.md").read_text()
    assert "## Calibration of the reported uncertainty" in report
    for method in methods:
        assert f"- **{method}**" in report
    net = NetworkEstimator.load(tiny_run / "networks" / "net-gt")
    assert net.uncertainty == "variance_head" and net.reports_sd


def test_manifest_records_seeds_fingerprints_versions_timings(tiny_run):
    m = json.loads((tiny_run / "manifest.json").read_text())
    assert len(m["data"]["train"]["fingerprint"]) == 64 and len(m["data"]["heldout"]["fingerprint"]) == 64
    assert m["data"]["train"]["fingerprint"] != m["data"]["heldout"]["fingerprint"]
    assert len(m["data"]["grid"]["fingerprint"]) == 64
    assert m["seeds"]["seed"] == 0 and "torch" in m["versions"] and "device" in m["device"]
    assert m["determinism"]["deterministic"] is True
    assert m["timings"]["total"] > 0 and m["command"]["wall_seconds"] >= m["timings"]["total"]
    assert m["command"]["argv"][-1] == "--quiet"
    assert m["mle_labels"]["dataset_fingerprint"] == m["data"]["train"]["fingerprint"]


def test_hybrid_endpoints_reproduce_pure_label_networks(tiny_run):
    s = pd.read_csv(tiny_run / "summary.csv").set_index(["method", "parameter"])
    cols = ["mean_abs_bias", "mean_sd", "rmse"]
    for param in ("f", "D", "Dstar"):
        np.testing.assert_array_equal(s.loc[("net-hybrid-0", param), cols], s.loc[("net-gt", param), cols])
        np.testing.assert_array_equal(s.loc[("net-hybrid-1", param), cols], s.loc[("net-mle", param), cols])
    assert not np.array_equal(s.loc[("net-gt", "f"), cols], s.loc[("net-mle", "f"), cols])


def test_saved_networks_predict_alone_and_match_their_manifest(tiny_run):
    from qmri_labels.data import DatasetSpec
    from qmri_labels.workflows.ivim import heldout_metrics

    net = NetworkEstimator.load(tiny_run / "networks" / "net-self")
    assert net.method_name == "net-self" and net.model_name == "ivim"
    heldout = net.metrics_["heldout"]
    data = DatasetSpec.from_dict(heldout["spec"]).generate()
    assert data.fingerprint == heldout["fingerprint"]
    metrics = heldout_metrics(net.predict(data.signals, signal_scale=1.0), data)
    for p, value in heldout["rmse"].items():
        assert metrics["rmse"][p] == pytest.approx(value, rel=1e-6)


def args(*argv):
    return study.build_parser().parse_args(list(argv))


def test_default_config_and_flag_overrides():
    kind, config, module, name = study.resolve(args())
    assert kind == "ivim_labels" and name == "default"
    assert config["snr"] == 30 and config["model"] == "ivim" and len(config["bvalues"]) == 10
    kind, config, _, _ = study.resolve(args("--alpha", "0.2", "0.8", "--snr", "15", "--bvalues", "0", "100", "800",
                                            "--n-train", "500", "--max-epochs", "3", "--seed", "4", "--device", "cpu",
                                            "--set", "grid.repeats=20", "--set", "labels=[gt]"))
    assert config["alpha"] == [0.2, 0.8] and config["snr"] == 15 and config["bvalues"] == [0, 100, 800]
    assert config["n_train"] == 500 and config["max_epochs"] == 3 and config["seed"] == 4
    assert config["grid"]["repeats"] == 20 and config["labels"] == ["gt"]
    assert config["grid"]["points_per_axis"] == 10  # nested defaults survive a partial override


def test_model_flag_selects_the_study_kind(monkeypatch):
    calls = []

    def fake_workflow(kind):
        calls.append(kind)
        return Workflow(kind, None, {"kind": kind, "seed": 0, "training": {"max_epochs": 5}}, lambda *a: {})

    monkeypatch.setattr(run, "get_workflow", fake_workflow)
    monkeypatch.setattr(run, "available_configs", lambda: {})
    kind, config, _, _ = study.resolve(args("--model", "qsm", "--max-epochs", "7"))
    assert kind == "qsm_labels" and calls == ["qsm_labels"]
    assert config["training"]["max_epochs"] == 7  # a flag finds its key in one nested section
    with pytest.raises(ValueError, match="--alpha does not apply"):
        study.resolve(args("--model", "qsm", "--alpha", "0.5"))


def test_model_qsm_uses_the_named_qsm_configuration():
    kind, config, workflow, name = study.resolve(args("--model", "qsm"))
    assert kind == "qsm_labels" and name == "qsm_labels"
    assert workflow.module.__name__ == "qmri_labels.workflows.qsm.labels"


def test_model_flag_with_a_voxel_model():
    kind, config, _, _ = study.resolve(args("--model", "monoexp", "--config", "tiny_ivim"))
    assert kind == "ivim_labels" and config["model"] == "monoexp"


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown study kind 'nonsense'; known kinds: hparam, ivim_labels"):
        run.get_workflow("nonsense")
    with pytest.raises(ValueError, match="no study configuration"):
        study.load_config("no_such_study")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: ivim_labels\nsnr_db: 30\n")
    with pytest.raises(ValueError, match="snr_db"):
        study.resolve(args("--config", str(bad)))
    with pytest.raises(ValueError, match="selects study kind"):
        study.resolve(args("--model", "qsm", "--config", "tiny_ivim"))
    with pytest.raises(ValueError, match="unknown signal model"):
        study.resolve(args("--model", "t2star_magic"))
    with pytest.raises(SystemExit):
        study.main(["--config", "tiny_ivim", "--set", "n_train"])


def test_same_seed_same_results_on_cpu(tmp_path):
    argv = ["--config", "tiny_ivim", "--set", "labels=[self]", "--set", "alpha=[]", "--n-train", "600",
            "--set", "n_test=100", "--quiet"]
    assert study.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert study.main(argv + ["--out", str(tmp_path / "b")]) == 0
    a, b = (pd.read_csv(tmp_path / x / "summary.csv") for x in "ab")
    pd.testing.assert_frame_equal(a, b)
    wa, wb = (NetworkEstimator.load(tmp_path / x / "networks" / "net-self") for x in "ab")
    assert wa.manifest_["weights"]["sha256"] == wb.manifest_["weights"]["sha256"]


def test_export_networks_as_shipped_bundles(tiny_run, tmp_path):
    from qmri_labels.workflows.ivim_models import export_networks

    written = export_networks(tiny_run, tmp_path / "models", methods=["net-gt", "net-hybrid-0"])
    assert sorted(p.name for p in written) == ["ivim_epstein_snr30_gt", "ivim_epstein_snr30_hybrid0"]
    original = NetworkEstimator.load(tiny_run / "networks" / "net-gt")
    copied = NetworkEstimator.load(written[0])
    signals = np.random.default_rng(0).uniform(0.2, 1.1, size=(50, 10)).astype(np.float32)
    np.testing.assert_array_equal(original.predict(signals), copied.predict(signals))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(p.name for p in written)
    assert "training prior" in (written[0] / "MODEL_CARD.md").read_text()  # shipped with its card


def test_figure_format_is_checked():
    from qmri_labels.workflows.ivim import resolve_config

    assert resolve_config({"figure_format": "pdf"})["figure_format"] == "pdf"
    with pytest.raises(ValueError, match="figure_format"):
        resolve_config({"figure_format": "gif"})


# --- a fair comparison: SNR ranges and lists, tuning, seeds, named protocols ---------
def test_snr_range_tune_and_seeds_flags_resolve():
    _, config, _, _ = study.resolve(args("--snr", "10", "50", "--snr-test", "10", "30", "--tune", "3", "--seeds", "2"))
    assert config["snr"] == [10.0, 50.0] and config["grid"]["snr"] == [10.0, 30.0]
    assert config["tune"]["n_trials"] == 3 and config["seeds"] == 2
    assert config["tune"]["storage"] is None
    _, config, _, _ = study.resolve(args("--tune", "3", "--storage", "sqlite:///tune.db", "--study-name", "s1"))
    assert (config["tune"]["storage"], config["tune"]["study_name"]) == ("sqlite:///tune.db", "s1")
    with pytest.raises(ValueError, match="--snr"):
        study.resolve(args("--snr", "10", "20", "30"))
    from qmri_labels.workflows.ivim import resolve_config

    cfg = resolve_config({"snr": [10, 50]})
    assert cfg["snr"] == {"low": 10.0, "high": 50.0, "distribution": "uniform"} and cfg["grid"]["snr"] == [10.0, 50.0]
    for bad, match in [({"seeds": 0}, "seeds"), ({"tune": {"n_trials": -1}}, "n_trials"),
                       ({"tune": {"criterion": "grid"}}, "criterion"), ({"tune": {"trials": 3}}, "unknown configuration key .tune.trials."),
                       ({"network": {"depth": 3}}, "network options"), ({"network": {"preset": "x"}}, "preset"),
                       ({"grid": {"snr": [20, -1]}}, "SNR"), ({"tune": {"storage": "tune.db"}}, "database URL"), ({"grid": {"snrs": [20]}}, "unknown configuration key .grid.snrs.")]:
        with pytest.raises(ValueError, match=match):
            resolve_config(bad)


def test_named_literature_protocols_resolve():
    _, config, _, name = study.resolve(args("--config", "ivimnet_sim"))
    assert name == "ivimnet_sim" and config["noise"] == "gaussian" and config["snr"] == 20
    assert config["bvalues"] == [0, 5, 10, 20, 30, 40, 60, 150, 300, 500, 700]
    assert config["prior"]["ranges"]["Dstar"] == [0.01, 0.1] and config["grid"]["snr"] == [15, 20, 50, 100]
    _, config, _, _ = study.resolve(args("--config", "epstein_snr15"))
    assert config["snr"] == 15 and config["noise"] == "rician"
    from qmri_labels.workflows.ivim import make_estimators, resolve_config

    est = make_estimators(resolve_config({"network": {"preset": "ivimnet"}, "labels": ["self"], "alpha": []}))
    e = est["net-self"]
    assert e.parallel and e.batch_norm and e.dropout == 0.1 and e.lr == 3e-5 and e.batch_size == 128
    # an explicit study entry overrides the preset
    est = make_estimators(resolve_config({"network": {"preset": "ivimnet"}, "lr": 1e-4, "labels": ["self"],
                                          "alpha": []}))
    assert est["net-self"].lr == 1e-4 and est["net-self"].parallel


def test_study_with_tuning_seeds_and_snr_list(tmp_path):
    out = tmp_path / "fair"
    argv = ["--config", "tiny_ivim", "--set", "labels=[gt, self]", "--set", "alpha=[]", "--n-train", "800",
            "--set", "n_test=100", "--snr", "20", "40", "--snr-test", "20", "40", "--tune", "2", "--seeds", "2",
            "--set", "tune.max_epochs=1", "--out", str(out), "--quiet"]
    assert study.main(argv) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(set(summary["snr"])) == [20.0, 40.0]
    assert {"net-gt", "net-gt-tuned", "net-self-tuned", "net-gt@s1", "net-self-tuned@s1"} <= set(summary["method"])
    grid = pd.read_csv(out / "grid.csv")
    assert sorted(set(grid["snr"])) == [20.0, 40.0]
    # a higher test SNR gives a smaller SD for every method and varied parameter
    varied = summary[summary["parameter"].isin(["f", "D", "Dstar"])]
    sd = varied.pivot_table(index=["method", "parameter"], columns="snr", values="mean_sd")
    assert (sd[40.0] < sd[20.0]).all()
    report = (out / "report.md").read_text()
    for heading in ("## Across SNRs", "## Tuned vs default design per label", "### Label ranking",
                    "## Over 2 training seeds", "### Findings"):
        assert heading in report
    ranking = pd.read_csv(out / "label_ranking.csv")
    assert set(ranking["metric"]) == {"mean_abs_bias", "mean_sd", "sensitivity", "rmse"}
    tests = pd.read_csv(out / "tuned_vs_default_tests.csv")
    assert set(tests["metric"]) == {"abs_bias", "sd", "rmse"}
    # the tuned-vs-default tests, redone from the per-point values in grid.csv with scipy: a paired
    # t-test of tuned against default at the SNR the study reports on, Bonferroni over all the tests
    primary = json.loads((out / "grid_spec.json").read_text())["snr"]
    points = grid[grid["snr"] == primary].assign(abs_bias=lambda g: g["bias"].abs())
    expected_p = []
    for row in tests.itertuples():
        pick = points[points["parameter"] == row.parameter]
        tuned, default = (pick[pick["method"] == m].sort_values("point")[row.metric].to_numpy() for m in (row.a, row.b))
        assert row.a == row.b + "-tuned" and len(tuned) == len(default) == row.n > 1
        expected_p.append(scipy.stats.ttest_rel(tuned, default).pvalue)
    np.testing.assert_allclose(tests["p_value"], expected_p, rtol=1e-6)
    np.testing.assert_allclose(tests["p_adjusted"], np.minimum(1.0, len(tests) * np.asarray(expected_p)), rtol=1e-6)
    assert (tests["significant"] == (tests["p_adjusted"] < 0.05)).all()
    seeds = pd.read_csv(out / "seeds.csv")
    assert (seeds["n_seeds"] == 2).all() and (seeds["rmse_sd"] > 0).all()
    # the seed findings, redone from the two seeds' rows of summary.csv: the mean paired difference
    # against the larger of the two methods' SDs over seeds (ddof 1)
    findings = pd.read_csv(out / "seed_findings.csv")
    assert len(findings) > 0 and findings["finding"].dtype == bool
    at_primary = summary[summary["snr"] == primary]
    for row in findings.itertuples():
        metric = "sensitivity" if row.metric == "abs(1 - sensitivity)" else row.metric

        def over_seeds(method):
            rows = at_primary[at_primary["parameter"] == row.parameter].set_index("method")
            values = rows.loc[[method, f"{method}@s1"], metric].to_numpy(float)
            return np.abs(1.0 - values) if metric == "sensitivity" else values

        a, b = over_seeds(row.a), over_seeds(row.b)
        spread = max(np.std(a, ddof=1), np.std(b, ddof=1))
        assert row.mean_diff == pytest.approx(np.mean(a - b), rel=1e-9, abs=1e-15)
        assert row.seed_spread == pytest.approx(spread, rel=1e-9, abs=1e-15)
        assert row.finding == (abs(np.mean(a - b)) > spread)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuning"]["net-gt"]["n_trials"] == 2 == manifest["tuning"]["net-self"]["n_trials"]
    # seed copies differ in init and batch order only
    s0, s1 = manifest["seeds"]["networks"]["net-gt"], manifest["seeds"]["networks"]["net-gt@s1"]
    assert s0["split_seed"] == s1["split_seed"] and s0["init_seed"] != s1["init_seed"]
    train = manifest["data"]["train"]["spec"]
    assert train["snr"] == {"low": 20.0, "high": 40.0, "distribution": "uniform"}
