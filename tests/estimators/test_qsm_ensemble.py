"""Deep ensembles of QSM U-Nets: QSMEstimator(n_members=M), predict(..., return_sd=True, sd_kind="label"), one
bundle, and the fit command's chi SD map (``--uncertainty``)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_labels.cli import fit as fit_cli
from qmri_labels.data.qsm import QSMPhantomSpec
from qmri_labels.estimators import QSMEstimator
from qmri_labels.estimators.base import SDNotCalibrated
from qmri_labels.maps.derivatives import chi_map_name, chi_sd_map_name

#: a toy U-Net, two epochs of four 8^3 patches: the tests check the ensemble's plumbing
SETTINGS = dict(preset="toy", patch_size=8, samples_per_epoch=4, batch_size=2, max_epochs=2, seed=3, device="cpu")


@pytest.fixture(scope="module")
def phantoms():
    spec = QSMPhantomSpec(shape=(16, 16, 16), n=2, n_orientations=1, noise_sigma=0.002, seed=7)
    return spec.generate(), spec.replace(n=2, seed=8).generate()


@pytest.fixture(scope="module")
def fits(phantoms):
    """An ensemble of two members (seeds 3, 4) and the single networks of seeds 3 and 4."""
    train, val = phantoms
    torch.set_num_threads(1)
    return {"ensemble": QSMEstimator(**SETTINGS, n_members=2).fit(train, validation=val),
            "seed3": QSMEstimator(**SETTINGS).fit(train, validation=val),
            "seed4": QSMEstimator(**{**SETTINGS, "seed": 4}).fit(train, validation=val)}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_member_k_is_the_single_network_of_seed_plus_k(fits):
    ensemble = fits["ensemble"]
    members = ensemble.network_.members
    assert ensemble.n_fitted_members == 2 and ensemble.reports_sd
    assert not _states_equal(members[0].state_dict(), members[1].state_dict())
    # each member is trained exactly as a single network of its seed, with the shared normalisation
    assert _states_equal(members[0].state_dict(), fits["seed3"].network_.state_dict())
    assert _states_equal(members[1].state_dict(), fits["seed4"].network_.state_dict())
    assert ensemble.normalisation_ == fits["seed3"].normalisation_ == fits["seed4"].normalisation_
    assert [m["seed"] for m in ensemble.members_training_] == [3, 4]
    assert ensemble.history_ == ensemble.members_training_[0]["history"]
    assert not fits["seed3"].reports_sd and not hasattr(fits["seed3"], "members_training_")


def test_predict_returns_the_members_mean_and_their_sd(fits, phantoms):
    _, val = phantoms
    ensemble = fits["ensemble"]
    field, mask = val.field[0], val.mask[0]
    chi, sd = ensemble.predict(field, mask, return_sd=True, sd_kind="label")
    assert chi.shape == sd.shape == field.shape and chi.dtype == sd.dtype == np.float32
    assert np.all(np.isfinite(sd)) and np.all(sd >= 0)
    assert np.all(sd[mask] > 0) and np.all(sd[~mask] == 0) and np.all(chi[~mask] == 0)
    a, b = fits["seed3"].predict(field, mask), fits["seed4"].predict(field, mask)
    # two members: the mean and the ddof-0 SD, |a - b| / 2
    np.testing.assert_allclose(chi, (a.astype(np.float64) + b) / 2, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sd, np.abs(a.astype(np.float64) - b) / 2, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ensemble.predict(field, mask), chi)
    # a batch of volumes, and overlapping patches, give the same per volume
    chis, sds = ensemble.predict(val.field, val.mask, return_sd=True, sd_kind="label")
    assert chis.shape == sds.shape == val.field.shape
    np.testing.assert_allclose(sds[0], sd, atol=1e-7)
    _, sd_patches = ensemble.predict(field, mask, patch_size=8, overlap=4, return_sd=True, sd_kind="label")
    assert sd_patches.shape == sd.shape and np.all(sd_patches[mask] > 0)


def test_a_single_network_reports_no_sd(fits, phantoms):
    _, val = phantoms
    with pytest.raises(ValueError, match=r"single U-Net .* n_members=M\) with M >= 2"):
        fits["seed3"].predict(val.field[0], val.mask[0], return_sd=True, sd_kind="label")
    with pytest.raises(SDNotCalibrated, match="members' disagreement, never calibrated against the true chi.*"
                                              "sd_kind='label'"):
        fits["ensemble"].predict(val.field[0], val.mask[0], return_sd=True)
    with pytest.raises(ValueError, match="sd_kind must be one of"):
        fits["ensemble"].predict(val.field[0], val.mask[0], return_sd=True, sd_kind="bogus")
    with pytest.raises(TypeError, match="return_sd must be True or False"):
        fits["ensemble"].predict(val.field[0], val.mask[0], return_sd="yes")


def test_an_ensemble_is_one_bundle_and_loads_to_the_same_mean_and_sd(fits, phantoms, tmp_path):
    _, val = phantoms
    ensemble = fits["ensemble"]
    path = ensemble.save(tmp_path / "ens")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "weights.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["params"]["n_members"] == 2 and manifest["ensemble"]["n_members"] == 2
    assert {name.split(".")[1] for name in manifest["weights"]["tensors"]} == {"0", "1"}
    assert manifest["n_parameters"] == 2 * ensemble.network_.members[0].n_parameters()
    back = QSMEstimator.load(path)
    assert back.n_members == 2 and back.reports_sd and back.members_training_ == ensemble.members_training_
    for a, b in zip(back.predict(val.field[0], val.mask[0], return_sd=True, sd_kind="label"),
                    ensemble.predict(val.field[0], val.mask[0], return_sd=True, sd_kind="label")):
        np.testing.assert_array_equal(a, b)
    # a single network's bundle has no ensemble entry and stays a single network
    single = QSMEstimator.load(fits["seed3"].save(tmp_path / "single"))
    assert "ensemble" not in single.manifest_ and single.n_fitted_members == 1 and not single.reports_sd


def test_the_shipped_single_network_bundle_loads_unchanged():
    from qmri_labels.paths import models_dir

    bundle = QSMEstimator.load(models_dir() / "qsm_unet_field-tv_residual_lrelu16")
    # written before ensembles existed: no n_members in its parameters, one U-Net
    assert "n_members" not in bundle.manifest_["params"] and bundle.n_members == 1
    assert bundle.n_fitted_members == 1 and not bundle.reports_sd
    assert type(bundle.network_).__name__ == "UNet3D"


def test_ensemble_settings_are_checked(phantoms, tmp_path):
    train, _ = phantoms
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_members must be an integer >= 1"):
            QSMEstimator(**SETTINGS, n_members=bad).fit(train)
    with pytest.raises(ValueError, match="checkpoint_path .* n_members > 1"):
        QSMEstimator(**SETTINGS, n_members=2, checkpoint_path=tmp_path / "ckpt").fit(train)
    single = QSMEstimator(**{**SETTINGS, "max_epochs": 1}).fit(train)
    single.set_params(warm_start=True, n_members=2)
    with pytest.raises(ValueError, match=r"warm_start: the fitted estimator has 1 member\(s\)"):
        single.fit(train)


def test_warm_start_continues_every_member(phantoms):
    train, _ = phantoms
    ensemble = QSMEstimator(**{**SETTINGS, "max_epochs": 1}, n_members=2).fit(train)
    before = [m.head.weight.detach().clone() for m in ensemble.network_.members]
    ensemble.set_params(warm_start=True).fit(train)
    after = [m.head.weight for m in ensemble.network_.members]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert not torch.equal(after[0], after[1])


def test_ensemble_follows_the_estimator_contract(fits):
    try:
        from sklearn.base import clone
    except ImportError:  # scikit-learn is optional; its clone is this for our estimators
        def clone(estimator):
            return type(estimator)(**estimator.get_params(deep=False))

    ensemble = fits["ensemble"]
    assert ensemble.get_params()["n_members"] == 2 and QSMEstimator().get_params()["n_members"] == 1
    twin = clone(ensemble)
    assert twin.get_params()["n_members"] == 2 and not hasattr(twin, "network_")
    assert "n_members=2" in repr(ensemble)


# ----------------------------------------------------------------------------- the fit command

def _run(argv, capsys):
    code = fit_cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def command_inputs(fits, phantoms, tmp_path_factory):
    """A held-out phantom's field and mask as NIfTI (1 mm voxels, as trained; a shifted origin),
    and the bundles of the ensemble and of one single network."""
    _, val = phantoms
    folder = tmp_path_factory.mktemp("qsm_ensemble")
    affine = np.eye(4)
    affine[:3, 3] = (-8.0, -8.0, -8.0)
    for name, array in (("sub-01_field", val.field[0].astype(np.float32)), ("mask", val.mask[0].astype(np.uint8))):
        nib.save(nib.Nifti1Image(array, affine), str(folder / f"{name}.nii.gz"))
    return {"field": folder / "sub-01_field.nii.gz", "mask": folder / "mask.nii.gz", "affine": affine,
            "ensemble": fits["ensemble"].save(folder / "ensemble"), "single": fits["seed3"].save(folder / "single")}


def test_fit_command_writes_the_chi_sd_map_of_an_ensemble(command_inputs, fits, phantoms, tmp_path, capsys):
    import scipy.io

    _, val = phantoms
    mask = val.mask[0]
    out = tmp_path / "out"
    code, err = _run(["--field", command_inputs["field"], "--mask", command_inputs["mask"], "--estimator",
                      command_inputs["ensemble"], "--uncertainty", "--sd-kind", "label", "--mat", "--out", out,
                      "--quiet"], capsys)
    assert code == 0, err
    chi_image = nib.load(str(out / chi_map_name("sub-01")))
    sd_image = nib.load(str(out / chi_sd_map_name("sub-01")))
    assert chi_sd_map_name("sub-01") == "sub-01_desc-sd_Chimap.nii.gz"
    assert sd_image.shape == (16, 16, 16) and sd_image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(sd_image.affine, command_inputs["affine"])
    np.testing.assert_array_equal(sd_image.affine, chi_image.affine)
    sd = np.asarray(sd_image.dataobj)
    expected_chi, expected_sd = fits["ensemble"].predict(val.field[0] * mask, mask, return_sd=True, sd_kind="label")
    np.testing.assert_allclose(sd, expected_sd, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(chi_image.dataobj), expected_chi, rtol=0, atol=1e-7)
    assert np.all(sd[mask] > 0) and np.all(sd[~mask] == 0)
    sidecar = json.loads((out / "sub-01_desc-sd_Chimap.json").read_text())
    assert sidecar["Statistic"] == "standard deviation" and sidecar["Units"] == "ppm"
    assert "2 members" in sidecar["Method"] and sidecar["Estimator"]["n_members"] == 2
    assert "NOT calibrated against the true chi" in sidecar["Method"] and sidecar["SDKind"] == "label"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["uncertainty"]["n_members"] == 2 and manifest["uncertainty"]["sd_kind"] == "label"
    assert manifest["uncertainty"]["map"] == chi_sd_map_name("sub-01")
    assert chi_sd_map_name("sub-01") in manifest["outputs"] and chi_sd_map_name("sub-01") in manifest["output_sha256"]
    np.testing.assert_array_equal(scipy.io.loadmat(out / "sub-01_chi.mat")["chi_sd"], sd)
    # without the flag: the same chi, no SD map
    code, err = _run(["--field", command_inputs["field"], "--mask", command_inputs["mask"], "--estimator",
                      command_inputs["ensemble"], "--out", tmp_path / "plain", "--quiet"], capsys)
    assert code == 0, err
    assert not (tmp_path / "plain" / chi_sd_map_name("sub-01")).exists()
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["uncertainty"] is None
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "plain" / chi_map_name("sub-01"))).dataobj),
                                  np.asarray(chi_image.dataobj))


@pytest.mark.parametrize("estimator, message", [
    ("single", "is a single U-Net and reports no standard deviation"),
    ("tkd", "the tkd inversion reports no standard deviation"),
    ("tv", "the tv inversion reports no standard deviation"),
])
def test_fit_command_refuses_uncertainty_without_an_ensemble(command_inputs, estimator, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(["--field", command_inputs["field"], "--mask", command_inputs["mask"], "--estimator",
                      command_inputs.get(estimator, estimator), "--uncertainty", "--out", out], capsys)
    assert code == 1 and message in err
    # the refusal names what does report SDs
    assert "QSM U-Net ensemble" in err and "n_members=M), M >= 2" in err
    assert not out.exists()


def test_fit_command_writes_an_ensemble_sd_only_when_asked_for_by_name(command_inputs, tmp_path, capsys):
    base = ["--field", command_inputs["field"], "--mask", command_inputs["mask"], "--estimator",
            command_inputs["ensemble"]]
    code, err = _run(base + ["--uncertainty", "--out", tmp_path / "truth"], capsys)
    assert code == 1 and "members' disagreement, never calibrated against the true chi" in err
    assert "--sd-kind label" in err and not (tmp_path / "truth").exists()
    code, err = _run(base + ["--sd-kind", "label", "--out", tmp_path / "no_sd"], capsys)
    assert code == 1 and "--sd-kind label says which SD maps to write; it applies with --uncertainty" in err
    assert not (tmp_path / "no_sd").exists()


def test_train_model_trains_an_ensemble_bundle(tmp_path):
    from qmri_labels.workflows.qsm.model import train_model

    tiny = {"phantom": {"shape": [16, 16, 16]}, "n_train": 2, "n_val": 1, "n_test": 1,
            "training": {"preset": "toy", "unet": {"init_channels": 2}, "inputs": ["field", "tkd"], "patch_size": 8,
                         "samples_per_epoch": 2, "max_epochs": 1, "device": "cpu"},
            "tikhonov_lambdas": [0.01], "tv_lambdas": [8e-4]}
    result = train_model(tmp_path / "ens", minutes=1.0, config=tiny, quiet=True, members=2)
    bundle = QSMEstimator.load(result["out"])
    assert bundle.n_fitted_members == 2 and bundle.reports_sd
    assert bundle.manifest_["command"].endswith("--members 2")
    assert {row["method"] for row in bundle.manifest_["heldout_metrics"]} >= {"unet", "tkd"}
    with pytest.raises(ValueError, match="resume continues a single network"):
        train_model(tmp_path / "ens", minutes=1.0, config=tiny, quiet=True, members=2, resume=True)
