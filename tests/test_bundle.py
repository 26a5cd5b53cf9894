import json
import os

import pytest
import torch

from qmri_labels.estimators.bundle import (
    MANIFEST_FILE,
    SAFETENSORS_FILE,
    load_bundle,
    package_versions,
    read_manifest,
    save_bundle,
    verify_bundle,
)


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
