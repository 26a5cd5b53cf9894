"""The fit command on QSM fields: conventional inversions, B0 direction, a QSM U-Net, background
field removal of a total field, and the options that belong to the other kind of data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmri_labels.cli import fit_qsm
from qmri_labels.maps.derivatives import chi_map_name

from fit_cli_data import save, run, assert_no_leftovers, load_map, QSM_VOXEL


def test_uncertainty_is_refused_for_the_default_qsm_inversion(tmp_path, capsys):
    # (a U-Net ensemble writes a chi SD map: tests/estimators/test_qsm_ensemble.py)
    save(tmp_path / "field.nii.gz", np.zeros((4, 4, 4), np.float32))
    save(tmp_path / "mask.nii.gz", np.ones((4, 4, 4), np.uint8))
    code, err = run(["--field", tmp_path / "field.nii.gz", "--mask", tmp_path / "mask.nii.gz", "--uncertainty",
                     "--out", tmp_path / "out"], capsys)
    assert code == 1 and "--uncertainty: the tkd inversion reports no standard deviation" in err
    assert "QSM U-Net ensemble" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("estimator", ["tkd", "tikhonov"])
def test_qsm_conventional_inversion(estimator, qsm_data, tmp_path, capsys):
    import scipy.io

    from qmri_labels.fitting import qsm_inversion

    out = tmp_path / "out"
    code, err = run(["--model", "qsm", "--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"],
                     "--estimator", estimator, "--mat", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    image, chi = load_map(out, chi_map_name("sub-01"))
    np.testing.assert_array_equal(image.affine, qsm_data["affine"])
    assert image.get_data_dtype() == np.float32
    mask = qsm_data["mask"]
    assert np.all(chi[~mask] == 0)
    # the CLI runs the library's inversion on the field inside the mask, with the header's voxel
    # size and the given B0 direction
    direct = getattr(qsm_inversion, estimator)(qsm_data["field"] * mask, QSM_VOXEL, (0, 0, 1), mask=mask)
    np.testing.assert_allclose(chi, direct, atol=1e-6)
    assert np.corrcoef(chi[mask], qsm_data["chi"][mask])[0, 1] > 0.9
    mat = scipy.io.loadmat(out / "sub-01_chi.mat")
    np.testing.assert_array_equal(mat["chi"], chi)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "qsm" and manifest["estimator"]["name"] == estimator
    assert manifest["voxel_size_mm"] == list(QSM_VOXEL)
    assert (out / "sub-01_qc.png").exists()


def test_qsm_b0_direction_matters_and_affine_option(qsm_data, tmp_path, capsys):
    assert run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "1,0,0",
                "--out", tmp_path / "x", "--quiet"], capsys)[0] == 0
    _, chi_x = load_map(tmp_path / "x", chi_map_name("sub-01"))
    mask = qsm_data["mask"]
    assert np.corrcoef(chi_x[mask], qsm_data["chi"][mask])[0, 1] < 0.8
    assert run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "affine",
                "--out", tmp_path / "a", "--quiet"], capsys)[0] == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    np.testing.assert_allclose(manifest["b0_dir"], [0, 0, 1], atol=1e-12)


def test_b0_dir_from_an_oblique_affine():
    angle = np.deg2rad(30)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.0, 2.0])
    direction, _ = fit_qsm.parse_b0_dir("affine", affine)
    np.testing.assert_allclose(direction, [0, np.sin(angle), np.cos(angle)], atol=1e-12)


def test_qsm_bad_input(qsm_data, tmp_path, capsys):
    field4d = save(tmp_path / "f4.nii.gz", np.stack([qsm_data["field"]] * 2, -1), qsm_data["affine"])
    nan_field = qsm_data["field"].copy()
    nan_field[10, 10, 10] = np.nan
    save(tmp_path / "nan.nii.gz", nan_field, qsm_data["affine"])
    cases = [
        (["--field", field4d, "--mask", qsm_data["mask_path"]], "must be 3-D"),
        (["--field", qsm_data["field_path"]], "QSM needs --mask"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "0,0"], "three numbers"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "0,0,0"], "zero length"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--estimator", "mle"], "diffusion"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--sigma", "3"], "diffusion option"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--model", "ivim"], "QSM input"),
    ]
    for argv, message in cases:
        code, err = run(argv + ["--out", tmp_path / "out", "--quiet"], capsys)
        assert code == 1 and message in err, (argv, err)
        assert not (tmp_path / "out").exists()
    code, _ = run(["--field", tmp_path / "nan.nii.gz", "--mask", qsm_data["mask_path"], "--out", tmp_path / "out",
                   "--quiet"], capsys)
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["voxels"]["skipped"]["nonfinite_field"] == 1
    assert_no_leftovers(tmp_path)


def test_qsm_network_estimator(qsm_network_bundle, qsm_data, tmp_path, capsys):
    from qmri_labels.estimators import QSMEstimator

    out = tmp_path / "out"
    code, err = run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--estimator",
                     qsm_network_bundle, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    # trained on 1 mm isotropic phantoms, applied to 1 x 1 x 2 mm data: it runs, and says so
    assert "trained at voxel size (1.0, 1.0, 1.0)" in err
    mask = qsm_data["mask"]
    expected = QSMEstimator.load(qsm_network_bundle).predict(qsm_data["field"] * mask, mask=mask,
                                                             voxel_size=QSM_VOXEL, b0_dir=(0, 0, 1), device="cpu")
    np.testing.assert_allclose(load_map(out, chi_map_name("sub-01"))[1], expected, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["estimator"]["kind"] == "network" and manifest["estimator"]["notes"]


def test_bundle_of_the_wrong_kind_is_refused(qsm_network_bundle, network_bundle, qsm_data, epstein_data, tmp_path,
                                             capsys):
    code, err = run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--estimator",
                     network_bundle, "--out", tmp_path / "a"], capsys)
    assert code == 1 and "not a QSM U-Net" in err
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", qsm_network_bundle,
                     "--out", tmp_path / "b"], capsys)
    assert code == 1 and "not a voxel-wise (diffusion) network" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_qsm_total_field_with_bfr_is_inverted_after_background_removal(qsm_head, tmp_path, capsys):
    import torch

    from qmri_labels.analysis.image_metrics import nrmse
    from qmri_labels.fitting import bfr, qsm_inversion

    paths = qsm_head["paths"]
    code, err = run(["--field", paths["total"], "--mask", paths["mask"], "--bfr", "vsharp", "--out", tmp_path / "bfr",
                     "--quiet"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "bfr" / "manifest.json").read_text())
    assert manifest["field"]["input_kind"] == "bfr:vsharp"
    assert manifest["field"]["background_field_removal"]["options"] == bfr.DEFAULTS["vsharp"]
    eroded_count = manifest["voxels"]["estimated"]
    assert 0 < eroded_count < qsm_head["mask"].sum()
    assert manifest["voxels"]["skipped"]["eroded_by_bfr"] == qsm_head["mask"].sum() - eroded_count
    chi = load_map(tmp_path / "bfr", chi_map_name("sub-01_totalfield"))[1]
    # the command is the library: V-SHARP, then TKD on the local field inside the eroded mask
    local, eroded = bfr.vsharp(qsm_head["total"], qsm_head["mask"], (1.0, 1.0, 1.0))
    eroded = np.asarray(eroded, bool)
    direct = qsm_inversion.tkd(torch.as_tensor(np.where(eroded, local, 0), dtype=torch.float32), voxel_size=(1, 1, 1),
                               b0_dir=(0, 0, 1), mask=torch.as_tensor(eroded), threshold=0.19).numpy()
    np.testing.assert_allclose(chi, np.where(eroded, direct, 0), atol=1e-5)
    assert int(eroded.sum()) == eroded_count and np.all(chi[~eroded] == 0)
    # without background removal, the background (about 10x the local field) ruins the map
    assert run(["--field", paths["total"], "--mask", paths["mask"], "--out", tmp_path / "raw", "--quiet"], capsys)[0] == 0
    raw = load_map(tmp_path / "raw", chi_map_name("sub-01_totalfield"))[1]
    truth = qsm_head["chi"]
    assert nrmse(chi, truth, eroded) < 0.5 * nrmse(raw, truth, eroded)


def test_qsm_tv_estimator_through_the_command(qsm_data, tmp_path, capsys):
    import torch

    from qmri_labels.fitting import qsm_inversion

    field, mask = qsm_data["field_path"], qsm_data["mask_path"]
    code, err = run(["--field", field, "--mask", mask, "--estimator", "tv", "--tv-lambda", "5e-4",
                     "--out", tmp_path / "tv", "--quiet"], capsys)
    assert code == 0, err
    chi = load_map(tmp_path / "tv", chi_map_name("sub-01"))[1]
    m = qsm_data["mask"]
    direct = qsm_inversion.tv(torch.as_tensor(qsm_data["field"] * m), torch.as_tensor(m), QSM_VOXEL, (0, 0, 1),
                              lam=5e-4).numpy()
    np.testing.assert_allclose(chi, np.where(m, direct, 0), atol=1e-5)
    assert np.corrcoef(chi[m], qsm_data["chi"][m])[0, 1] > 0.9
    assert json.loads((tmp_path / "tv" / "manifest.json").read_text())["estimator"]["options"] == {"lam": 5e-4}
    for argv, message in ((["--tv-lambda", "1e-3"], "--tv-lambda applies to --estimator tv only"),
                          (["--estimator", "tv", "--tv-lambda", "-1"], "must be a positive number"),
                          (["--allow-input-mismatch"], "applies to QSM networks only")):
        code, err = run(["--field", field, "--mask", mask, *argv, "--out", tmp_path / "bad", "--quiet"], capsys)
        assert code == 1 and message in err, (argv, err)
    assert not (tmp_path / "bad").exists()


def test_qsm_network_refuses_fields_unlike_its_training_inputs(qsm_network_bundle, qsm_head, tmp_path, capsys):
    from qmri_labels.estimators import QSMEstimator

    assert QSMEstimator.load(qsm_network_bundle).manifest_["input_kind"] == "local"
    paths = qsm_head["paths"]
    code, err = run(["--field", paths["total"], "--mask", paths["mask"], "--bfr", "sharp", "--estimator",
                     qsm_network_bundle, "--out", tmp_path / "refused"], capsys)
    assert code == 1 and "'local'" in err and "'bfr:sharp'" in err and "--allow-input-mismatch" in err
    assert not (tmp_path / "refused").exists()
    code, err = run(["--field", paths["total"], "--mask", paths["mask"], "--bfr", "sharp", "--estimator",
                     qsm_network_bundle, "--allow-input-mismatch", "--out", tmp_path / "forced", "--quiet"], capsys)
    assert code == 0, err
    estimator = json.loads((tmp_path / "forced" / "manifest.json").read_text())["estimator"]
    assert estimator["trained_input_kind"] == "local" and estimator["given_input_kind"] == "bfr:sharp"
    assert any("input mismatch allowed" in note for note in estimator["notes"])


def test_qsm_options_are_refused_with_diffusion_data(epstein_data, tmp_path, capsys):
    for argv in (["--bfr", "vsharp"], ["--tv-lambda", "1e-3"], ["--mat"], ["--allow-input-mismatch"]):
        code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], *argv, "--out", tmp_path / "o"],
                        capsys)
        assert code == 1 and "is a QSM option" in err, (argv, err)
    assert not (tmp_path / "o").exists()
