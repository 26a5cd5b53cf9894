"""The fit command with a trained IVIM network: by path and by name, protocol and model checks,
tampered bundles, skipped voxels; the maps equal the network's own predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fit_cli_data import EPSTEIN, save, run, assert_no_leftovers, pname, load_map


def _expected_network_maps(bundle, noisy, b0_column=0):
    """The network's own predictions with the preprocessing it records: the whole volume divided
    by one number, median(b = 0 signal) / the training data's median b = 0 signal."""
    from qmri_labels.estimators import NetworkEstimator

    network = NetworkEstimator.load(bundle)
    assert network.manifest_["preprocessing"]["kind"] == "global_scale"
    scale = np.median(noisy[..., b0_column]) / network.manifest_["preprocessing"]["reference"]
    expected = network.predict(noisy / scale, signal_scale=1.0)
    expected[..., 0] *= scale
    return expected


def test_network_estimator_by_path(network_bundle, epstein_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     "--out", out, "--quiet"], capsys)
    assert code == 0, err
    expected = _expected_network_maps(network_bundle, epstein_data["noisy"])
    for i, name in enumerate(("S0", "f", "D", "Dstar")):
        np.testing.assert_allclose(load_map(out, pname("sub-01", name))[1], expected[..., i], rtol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["estimator"]["kind"] == "network"
    assert manifest["estimator"]["protocol"] == EPSTEIN.tolist()
    assert len(manifest["estimator"]["bundle_sha256"]) == 64
    assert manifest["noise"] == {"model": None}
    assert manifest["estimator"]["preprocessing"]["source"] == "manifest"


def test_network_by_name_with_volumes_in_another_order(network_bundle, epstein_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QMRI_LABELS_MODELS", str(network_bundle.parent))
    order = np.random.default_rng(5).permutation(EPSTEIN.size)
    save(tmp_path / "shuffled.nii.gz", epstein_data["noisy"][..., order])
    np.savetxt(tmp_path / "shuffled.bval", EPSTEIN[order][None], fmt="%g")
    out = tmp_path / "out"
    code, err = run(["--dwi", tmp_path / "shuffled.nii.gz", "--bval", tmp_path / "shuffled.bval",
                     "--estimator", "tiny-ivim", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    expected = _expected_network_maps(network_bundle, epstein_data["noisy"])
    np.testing.assert_allclose(load_map(out, pname("shuffled", "f"))[1], expected[..., 1], rtol=1e-5)


def test_network_for_another_protocol_names_both(network_bundle, ivim_data, tmp_path, capsys):
    code, err = run(["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--estimator", network_bundle,
                     "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert "trained for the protocol b = [0, 10, 20, 30, 50, 80, 100, 200, 400, 800]" in err
    assert "b = [0, 0, 0, 10, 20" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--sigma", "3"], ["--noise", "gaussian"]])
def test_mle_options_are_refused_with_a_network(flag, network_bundle, epstein_data, tmp_path, capsys):
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     *flag, "--out", tmp_path / "out"], capsys)
    assert code == 1 and f"{flag[0]} applies to the MLE" in err
    assert not (tmp_path / "out").exists()


def test_uncertainty_with_a_network_without_sd_names_the_option(network_bundle, epstein_data, tmp_path, capsys):
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     "--uncertainty", "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert "--uncertainty: network tiny-ivim" in err and "does not report standard deviations" in err
    assert not (tmp_path / "out").exists()


def test_network_model_mismatch(network_bundle, epstein_data, tmp_path, capsys):
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     "--model", "monoexp", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "fits the ivim model" in err


@pytest.mark.parametrize("damage", ["weights", "manifest", "missing"])
def test_tampered_or_corrupt_bundle_is_refused(damage, network_bundle, epstein_data, tmp_path, capsys):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(network_bundle, bundle)
    weights = next(p for p in bundle.iterdir() if p.name.startswith("weights"))
    if damage == "weights":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        (bundle / "manifest.json").write_text("{not json")
    else:
        weights.unlink()
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", bundle,
                     "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert "corrupt or tampered model bundle" in err
    assert not (tmp_path / "out").exists()
    assert_no_leftovers(tmp_path)


def test_network_skips_voxels_with_missing_samples(network_bundle, epstein_data, tmp_path, capsys):
    noisy = epstein_data["noisy"].copy()
    noisy[0, 0, 0, 4] = np.nan
    save(tmp_path / "gap.nii.gz", noisy)
    out = tmp_path / "out"
    code, _ = run(["--dwi", tmp_path / "gap.nii.gz", "--bval", epstein_data["bval"], "--estimator", network_bundle,
                   "--out", out, "--quiet"], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["voxels"]["skipped"]["missing_measurements_for_network"] == 1
    assert np.isnan(load_map(out, pname("gap", "f"))[1][0, 0, 0])
