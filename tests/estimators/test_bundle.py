import hashlib
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch

from qmri_labels.estimators import NetworkEstimator, QSMEstimator, load
from qmri_labels.estimators.bundle import (
    MANIFEST_FILE,
    SAFETENSORS_FILE,
    build_manifest,
    estimator_manifest,
    load_bundle,
    manifest_kind,
    read_manifest,
    save_bundle,
    save_estimator,
    verify_bundle,
)
from qmri_labels.paths import models_dir
from qmri_labels.provenance import package_versions

SHIPPED = sorted(p for p in models_dir().iterdir() if (p / MANIFEST_FILE).is_file())
#: what every estimator bundle's manifest holds, whatever its kind
CORE_KEYS = {"kind", "params", "network", "versions", "device", "format", "format_version", "created", "weights"}


@pytest.fixture()
def state():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=g))
    return {**lin.state_dict(), "buffer": torch.arange(5, dtype=torch.float32)}


def test_round_trip_and_manifest(tmp_path, state):
    path = save_bundle(tmp_path / "net", state, {"config": {"width": 10}, "metrics": {"rmse": 0.5}})
    assert (path / SAFETENSORS_FILE).is_file() and (path / MANIFEST_FILE).is_file()
    loaded, manifest = load_bundle(path)
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])
    assert manifest["config"] == {"width": 10} and manifest["metrics"] == {"rmse": 0.5}
    assert len(manifest["weights"]["sha256"]) == 64
    assert manifest["versions"]["torch"] == torch.__version__ == package_versions()["torch"]
    assert "deterministic_algorithms" in manifest["device"]
    # nothing but the bundle's two files is left behind (no temporary folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_tampered_weights_are_refused_before_loading(tmp_path, state):
    path = save_bundle(tmp_path / "net", state, {})
    data = bytearray((path / SAFETENSORS_FILE).read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a weight
    (path / SAFETENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_bundle(path)


def test_truncated_weights_are_refused(tmp_path, state):
    path = save_bundle(tmp_path / "net", state, {})
    data = (path / SAFETENSORS_FILE).read_bytes()
    (path / SAFETENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_bundle(path)


def test_checksum_in_manifest_must_match(tmp_path, state):
    path = save_bundle(tmp_path / "net", state, {})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["weights"]["sha256"] = "0" * 64
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tampered"):
        verify_bundle(path)


def test_missing_pieces_give_clear_errors(tmp_path, state):
    with pytest.raises(ValueError, match="does not exist"):
        load_bundle(tmp_path / "nothing")
    path = save_bundle(tmp_path / "net", state, {})
    (path / SAFETENSORS_FILE).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_bundle(path)
    path = save_bundle(tmp_path / "net2", state, {})
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        load_bundle(path)
    path = save_bundle(tmp_path / "net3", state, {})
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(path)
    (path / MANIFEST_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a qmri_labels.bundle manifest"):
        read_manifest(path)


def test_pickle_payload_is_never_executed(tmp_path, state):
    # a torch.save file smuggling a pickle that would run code, with a matching checksum:
    # weights_only=True must refuse it
    path = save_bundle(tmp_path / "net", state, {})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"weight": Evil()}, buffer)
    data = buffer.getvalue()
    (path / SAFETENSORS_FILE).unlink()
    (path / "weights.pt").write_bytes(data)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["weights"].update(file="weights.pt", format="torch", sha256=hashlib.sha256(data).hexdigest(),
                               bytes=len(data))
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="could not be read"):
        load_bundle(path)
    assert not marker.exists()


def test_overwrite_replaces_whole_bundle(tmp_path, state):
    path = save_bundle(tmp_path / "net", state, {"version": 1})
    new_state = {k: v + 1 for k, v in state.items()}
    save_bundle(path, new_state, {"version": 2})
    loaded, manifest = load_bundle(path)
    assert manifest["version"] == 2 and torch.equal(loaded["buffer"], state["buffer"] + 1)
    with pytest.raises(FileExistsError):
        save_bundle(path, state, {}, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_failed_write_leaves_existing_bundle_intact(tmp_path, state):
    path = save_bundle(tmp_path / "net", state, {"version": 1})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_bundle(path, state, {"bad": object()})
    with pytest.raises(ValueError, match="not a tensor"):
        save_bundle(path, {"w": [1, 2]}, {})
    loaded, manifest = load_bundle(path)
    assert manifest["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_bundle_files_are_readable_like_ordinary_files(tmp_path, state):
    mask = os.umask(0o022)
    try:
        path = save_bundle(tmp_path / "net", state, {})
    finally:
        os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o755
    assert ((path / SAFETENSORS_FILE).stat().st_mode & 0o777) == 0o644


# -- one layout for every estimator bundle ---------------------------------------------------

def _shipped(kind: str):
    return next(p for p in SHIPPED if manifest_kind(read_manifest(p)) == kind)


def test_shipped_bundles_load_byte_for_byte_the_same_weights():
    assert {manifest_kind(read_manifest(p)) for p in SHIPPED} == {"qmri_labels.NetworkEstimator",
                                                                 "qmri_labels.QSMEstimator"}
    for path in SHIPPED:
        raw = (path / SAFETENSORS_FILE).read_bytes()
        # the shipped files are read, never rewritten: their checksums are those recorded
        assert hashlib.sha256(raw).hexdigest() == json.loads((path / MANIFEST_FILE).read_text())["weights"]["sha256"]
        estimator = load(path)
        expected = safetensors.torch.load(raw)
        state = estimator.network_.state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert state[key].dtype == value.dtype and state[key].numpy().tobytes() == value.numpy().tobytes(), key
        # the loaded manifest is in the one layout, whichever format version wrote it
        assert CORE_KEYS <= set(estimator.manifest_) and "training_config" not in estimator.manifest_
        assert estimator.manifest_["kind"] == "qmri_labels." + type(estimator).__name__


def test_network_and_qsm_bundles_share_one_layout(tmp_path):
    network = load(_shipped("qmri_labels.NetworkEstimator"))
    qsm = load(_shipped("qmri_labels.QSMEstimator"))
    manifests = {}
    for name, estimator in (("network", network), ("qsm", qsm)):
        path = estimator.save(tmp_path / name)
        manifests[name] = json.loads((path / MANIFEST_FILE).read_text())
        manifest = manifests[name]
        assert CORE_KEYS <= set(manifest) and manifest["format_version"] == 2
        assert manifest["kind"] == "qmri_labels." + type(estimator).__name__
        assert not {"training_config", "unet", "estimator"} & set(manifest)
        again = type(estimator).load(path)
        assert again.get_params() == estimator.get_params()
        for key, value in estimator.network_.state_dict().items():
            assert torch.equal(again.network_.state_dict()[key], value), key
    assert manifests["network"]["params"]["label"] == network.label
    assert manifests["qsm"]["params"]["inputs"] == list(qsm.inputs)
    assert manifests["qsm"]["network"] == qsm.manifest_["network"]
    signals = np.linspace(0.2, 1.0, 10)[None].repeat(3, 0)
    np.testing.assert_array_equal(load(tmp_path / "network").predict(signals), network.predict(signals))


def test_a_version_1_manifest_reads_into_the_layout():
    old = {"kind": "qsm_unet", "estimator": "QSMEstimator", "params": {"seed": 1}, "unet": {"levels": 2},
           "history": []}
    assert estimator_manifest(old) == {"kind": "qmri_labels.QSMEstimator", "params": {"seed": 1},
                                       "network": {"levels": 2}, "history": []}
    assert estimator_manifest({"kind": "qmri_labels.NetworkEstimator", "training_config": {"label": "gt"},
                               "network": {}})["params"] == {"label": "gt"}


def test_one_save_function_keeps_the_layout(tmp_path):
    network = load(_shipped("qmri_labels.NetworkEstimator"))
    # an older manifest carried over as extra entries cannot change kind, params or network
    manifest = network.manifest(extra={"kind": "qsm_unet", "training_config": {"label": "self"}, "note": 1})
    assert manifest["kind"] == "qmri_labels.NetworkEstimator" and manifest["params"]["label"] == network.label
    assert "training_config" not in manifest and manifest["note"] == 1
    with pytest.raises(ValueError, match="kind qmri_labels.NetworkEstimator"):
        save_estimator(network, tmp_path / "bad", build_manifest(QSMEstimator, {}, {}, {}))
    with pytest.raises(ValueError, match="not a qmri_labels.QSMEstimator"):
        QSMEstimator.load(save_estimator(network, tmp_path / "net", manifest))
    with pytest.raises(ValueError, match="kind 'unet'"):
        load(save_bundle(tmp_path / "other", {"w": torch.zeros(1)}, {"kind": "unet"}))
    assert isinstance(NetworkEstimator.load(tmp_path / "net"), NetworkEstimator)


def test_a_resaved_qsm_bundle_is_still_described_as_a_qsm_network(tmp_path):
    from qmri_labels.estimators.shipped import model_info

    shipped = _shipped("qmri_labels.QSMEstimator")
    resaved = load(shipped).save(tmp_path / "qsm")
    assert read_manifest(resaved)["kind"] == "qmri_labels.QSMEstimator"
    assert model_info(resaved)["kind"] == model_info(shipped)["kind"]
