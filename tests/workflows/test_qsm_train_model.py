"""The shipped-model workflow (qmri_labels.workflows.qsm train-model / evaluate-model) on tiny
volumes: training on the local fields a BFR method leaves, the input kind it records, and
side-by-side evaluation."""

import json
import shlex

import numpy as np
import pytest

from qmri_labels.data.qsm import QSMPhantomSet, QSMPhantomSpec
from qmri_labels.estimators.bundle import manifest_kind
from qmri_labels.paths import models_dir

QSM_KIND = "qmri_labels.QSMEstimator"

#: a few seconds: 20^3 heads, a 2-level U-Net with 2 channels, 2 epochs of 2 patches
TINY = {"phantom": {"shape": [20, 20, 20]}, "n_train": 2, "n_val": 1, "n_test": 2,
        "training": {"unet": {"levels": 2, "init_channels": 2}, "max_epochs": 2, "patch_size": 8,
                     "samples_per_epoch": 2},
        "tv_lambdas": [4e-4, 8e-4], "tikhonov_lambdas": [0.01]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One tiny network trained on masked local fields and one on fields after V-SHARP."""
    from qmri_labels.workflows.qsm.model import train_model

    root = tmp_path_factory.mktemp("qsm_models")
    train_model(root / "local_net", minutes=1, config=TINY, quiet=True)
    train_model(root / "vsharp_net", minutes=1, config=TINY, quiet=True, bfr="vsharp")
    return root / "local_net", root / "vsharp_net"


def _command_paths(command: str) -> list[str]:
    return [t for t in shlex.split(command) if t.startswith("/")]


def test_train_model_with_bfr_trains_on_the_methods_local_fields(bundles):
    from qmri_labels.estimators import QSMEstimator
    from qmri_labels.workflows.qsm.common import make_phantom_sets
    from qmri_labels.workflows.qsm.model import MODEL_CONFIG
    from qmri_labels.workflows.common import merge_config

    local_path, vsharp_path = bundles
    net = QSMEstimator.load(vsharp_path)
    manifest = net.manifest_
    assert manifest["input_kind"] == net.input_kind_ == "bfr:vsharp"
    assert manifest["train_spec"]["bfr"] == {"method": "vsharp", "max_radius": "8vox", "min_radius": "1vox",
                                             "step": "1vox", "threshold": 0.05}
    assert QSMEstimator.load(local_path).manifest_["input_kind"] == "local"
    # the training and held-out data are the V-SHARP sets of the same seeds: total field, background
    # removed, masks eroded, chi restricted to them
    train, _, test = make_phantom_sets(merge_config(MODEL_CONFIG, TINY, ("phantom", "training")), "vsharp")
    assert manifest["train_fingerprint"] == train.fingerprint and manifest["test_fingerprint"] == test.fingerprint
    local_train = QSMPhantomSpec.from_dict({k: v for k, v in manifest["train_spec"].items() if k != "bfr"}).replace(
        field_kind="local").generate()
    assert train.mask.sum() < local_train.mask.sum() and np.all(train.mask <= local_train.mask)
    assert np.all(train.chi[~train.mask] == 0) and np.all(train.field[~train.mask] == 0)
    assert not np.allclose(train.field[train.mask], local_train.field[train.mask], atol=1e-3)
    # the held-out rows are scored on the same V-SHARP phantoms, with each phantom's values
    rows = {r["method"]: r for r in manifest["heldout_metrics"]}
    assert set(rows) == {"tkd", "tikhonov", "tv", "unet"} and "after vsharp" in manifest["heldout_input"]
    for row in rows.values():
        assert len(row["per_phantom"]["nrmse"]) == len(test)
        assert row["nrmse"] == pytest.approx(np.mean(row["per_phantom"]["nrmse"]))
    # the recorded command reruns it: no absolute path (the bundle lies in a /tmp folder here)
    command = manifest["command"]
    assert "--bfr vsharp" in command and not _command_paths(command), command


def test_a_network_refuses_the_other_input_kind_unless_told(bundles):
    from qmri_labels.cli.common import InputError
    from qmri_labels.cli.fit_qsm import invert_field
    from qmri_labels.workflows.qsm.common import bfr_phantom_set

    local_path, vsharp_path = bundles
    data = bfr_phantom_set(QSMPhantomSpec(shape=(20, 20, 20), n=1, seed=5), "vsharp")
    field, mask = data.field[0], data.mask[0]
    args = (field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), "cpu")
    for path, trained, given in ((vsharp_path, "bfr:vsharp", "local"), (local_path, "local", "bfr:vsharp")):
        with pytest.raises(InputError, match=f"trained on '{trained}' fields but is given '{given}'"):
            invert_field(str(path), *args, input_kind=given)
        chi, _, info = invert_field(str(path), *args, input_kind=given, allow_input_mismatch=True)
        assert info["trained_input_kind"] == trained and "input mismatch allowed" in info["notes"][0]
        chi, _, info = invert_field(str(path), *args, input_kind=trained)
        assert info["notes"] == [] and np.all(chi[~mask] == 0)


def test_evaluate_model_scores_bundles_side_by_side(bundles, tmp_path):
    import shutil

    from qmri_labels.workflows.qsm.model import evaluate_model

    local_path, vsharp_path = (shutil.copytree(p, tmp_path / p.name) for p in bundles)
    by_kind = evaluate_model([local_path, vsharp_path], ("vsharp",), quiet=True)
    assert list(by_kind) == ["local", "bfr:vsharp"]
    local_m = json.loads((local_path / "manifest.json").read_text())
    vsharp_m = json.loads((vsharp_path / "manifest.json").read_text())
    for kind, rows in by_kind.items():
        assert [r["method"] for r in rows] == ["tkd", "tikhonov", "tv", "local_net", "vsharp_net"]
    # each manifest holds the baselines and its own network (as "unet"), on its own input kind first
    table = {kind: {r["method"]: r for r in rows} for kind, rows in by_kind.items()}
    assert local_m["heldout_metrics"] == [*by_kind["local"][:3], {**table["local"]["local_net"], "method": "unet"}]
    assert vsharp_m["heldout_metrics"] == [*by_kind["bfr:vsharp"][:3],
                                           {**table["bfr:vsharp"]["vsharp_net"], "method": "unet"}]
    assert vsharp_m["heldout_metrics_after_bfr"]["vsharp"] == vsharp_m["heldout_metrics"]
    assert local_m["heldout_metrics_after_bfr"]["vsharp"][:3] == vsharp_m["heldout_metrics"][:3]
    assert vsharp_m["heldout_metrics_local_fields"][3]["nrmse"] == table["local"]["vsharp_net"]["nrmse"]
    assert "heldout_metrics_local_fields" not in local_m
    # V-SHARP's eroded masks and lost harmonic part make every method worse than on the true local field
    assert table["bfr:vsharp"]["tv"]["nrmse"] > table["local"]["tv"]["nrmse"]
    assert local_m["evaluate_command"] == vsharp_m["evaluate_command"]
    assert not _command_paths(local_m["evaluate_command"]) and "--bfr vsharp" in local_m["evaluate_command"]
    with pytest.raises(ValueError, match="same folder name"):
        evaluate_model([local_path, local_path], ("vsharp",), quiet=True)


def test_phantom_set_bfr_record_is_checked_kept_and_fingerprinted(tmp_path):
    from qmri_labels.workflows.qsm.common import bfr_phantom_set

    spec = QSMPhantomSpec(shape=(16, 16, 16), n=1, seed=3)
    data = bfr_phantom_set(spec, "lbv", tol=1e-5)
    assert data.bfr == {"method": "lbv", "max_iter": 2000, "tol": 1e-5}
    assert data.spec_record()["bfr"] == data.bfr and "bfr" not in spec.generate().spec_record()
    back = QSMPhantomSet.load(data.save(tmp_path / "set.npz"))
    assert back.bfr == data.bfr and back.fingerprint == data.fingerprint
    unrecorded = QSMPhantomSet(spec=data.spec, chi=data.chi, mask=data.mask, fields=data.fields,
                               orientations=data.orientations)
    assert unrecorded.fingerprint != data.fingerprint
    with pytest.raises(ValueError, match="field_kind is 'local'"):
        QSMPhantomSet(spec=spec, chi=data.chi, mask=data.mask, fields=data.fields, orientations=data.orientations,
                      bfr={"method": "lbv"})
    with pytest.raises(ValueError, match="unknown option"):
        bfr_phantom_set(spec, "vsharp", radius=3.0)


def test_shipped_qsm_manifests_record_rerunnable_commands():
    bundles = [p for p in sorted(models_dir().iterdir()) if (p / "manifest.json").is_file()]
    qsm = [p for p in bundles if manifest_kind(json.loads((p / "manifest.json").read_text())) == QSM_KIND]
    assert qsm
    for path in qsm:
        manifest = json.loads((path / "manifest.json").read_text())
        for key in ("command", "evaluate_command"):
            assert manifest[key].startswith("python -m qmri_labels.workflows.qsm "), (path.name, key)
            assert not _command_paths(manifest[key]) and "/tmp" not in manifest[key], (path.name, manifest[key])


def _rows(per_method):
    return [{"method": m, "per_phantom": {"nrmse": list(v[0]), "xsim": list(v[1])}} for m, v in per_method.items()]


def test_compare_with_baselines_tells_a_margin_from_the_spread():
    from qmri_labels.workflows.qsm.model import compare_with_baselines

    rng = np.random.default_rng(0)
    heads = rng.uniform(40, 120, size=16)  # the spread between phantoms is far larger than any margin
    xs = rng.uniform(0.05, 0.3, size=16)
    noise = rng.normal(0, 1.0, size=16)
    noise = (noise - noise.mean()) / noise.std(ddof=1)  # mean 0, SD 1: the margins below are exact
    by_kind = {"bfr:vsharp": _rows({
        "tkd": (heads + 10, xs - 0.05),                                   # the network is better in both
        "tikhonov": (heads - 1.0 + noise, xs + 0.02 + noise / 1000),      # the network is worse in both
        "tv": (heads + 0.3 + 3 * noise, xs - 0.001 + noise / 100),        # better means, within the noise
        "net": (heads, xs)})}
    rows = compare_with_baselines(by_kind, ["net"])
    assert len(rows) == 6 and all(r["n"] == 16 for r in rows)
    verdict = {(r["baseline"], r["metric"]): r["verdict"] for r in rows}
    assert verdict == {("tkd", "nrmse"): "network", ("tkd", "xsim"): "network",
                       ("tikhonov", "nrmse"): "baseline", ("tikhonov", "xsim"): "baseline",
                       ("tv", "nrmse"): "tie", ("tv", "xsim"): "tie"}
    tv = next(r for r in rows if r["baseline"] == "tv" and r["metric"] == "nrmse")
    assert tv["network_mean"] < tv["baseline_mean"] and tv["mean_diff"] == pytest.approx(-0.3)
    assert tv["p_adjusted"] == pytest.approx(min(1.0, 6 * tv["p_value"]))
    assert next(r for r in rows if r["baseline"] == "tkd" and r["metric"] == "xsim")["wins"] == 16
    with pytest.raises(ValueError, match="no direction for metrics"):
        compare_with_baselines(by_kind, ["net"], metrics=("psnr_typo",))
    with pytest.raises(ValueError, match="no rows for 'other'"):
        compare_with_baselines(by_kind, ["other"])


def test_evaluate_model_scores_more_heldout_phantoms_and_tests_the_margins(bundles, tmp_path):
    import shutil

    from qmri_labels.workflows.qsm.model import evaluate_model

    local_path = shutil.copytree(bundles[0], tmp_path / "local_net")
    default = evaluate_model([local_path], ("vsharp",), quiet=True)
    more = evaluate_model([local_path], ("vsharp",), quiet=True, n_test=3)
    for kind in ("local", "bfr:vsharp"):
        for base, extended in zip(default[kind], more[kind]):
            values = extended["per_phantom"]["nrmse"]
            # the first phantoms are the same heads with the same noise: the same scores
            # (to float32 rounding: a batch of another size sums in another order)
            assert len(values) == 3 and values[:2] == pytest.approx(base["per_phantom"]["nrmse"], rel=1e-4)
    manifest = json.loads((local_path / "manifest.json").read_text())
    comparisons = manifest["heldout_comparisons"]
    assert {(r["input"], r["baseline"], r["metric"]) for r in comparisons} == {
        (k, b, m) for k in ("local", "bfr:vsharp") for b in ("tkd", "tikhonov", "tv") for m in ("nrmse", "xsim")}
    assert all(r["n"] == 3 and r["verdict"] in ("network", "baseline", "tie") for r in comparisons)
    assert "of 3 held-out phantoms" in manifest["heldout_input"] and "--n-test 3" in manifest["evaluate_command"]
    with pytest.raises(ValueError, match="n_test must be an integer >= 2"):
        evaluate_model([local_path], ("vsharp",), quiet=True, n_test=1)


def test_train_model_takes_more_training_heads(bundles, tmp_path):
    import shutil

    from qmri_labels.workflows.qsm.model import evaluate_model, train_model

    train_model(tmp_path / "net", minutes=1, config=TINY, quiet=True, n_train=3)
    manifest = json.loads((tmp_path / "net" / "manifest.json").read_text())
    assert manifest["train_spec"]["n"] == manifest["model_config"]["n_train"] == 3
    # the validation and held-out heads stay those of the default: only the training set grows
    assert manifest["test_spec"]["n"] == TINY["n_test"] and manifest["test_spec"]["seed"] == manifest["model_config"]["seed"] + 2
    assert manifest["command"].endswith("--n-train 3")
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        train_model(tmp_path / "bad", minutes=1, config=TINY, quiet=True, n_train=0)
    assert not (tmp_path / "bad").exists()
    # scored side by side with a network of the default heads: the same seed gives the same first heads,
    # on which the baselines are tuned; another seed is other phantoms and is refused
    local_path = shutil.copytree(bundles[0], tmp_path / "local_net")
    by_kind = evaluate_model([local_path, tmp_path / "net"], ("vsharp",), quiet=True)
    assert [r["method"] for r in by_kind["local"]] == ["tkd", "tikhonov", "tv", "local_net", "net"]
    manifest["train_spec"]["seed"] += 1
    (tmp_path / "net" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="other train_spec phantoms"):
        evaluate_model([local_path, tmp_path / "net"], ("vsharp",), quiet=True)
