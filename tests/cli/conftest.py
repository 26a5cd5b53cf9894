"""Inputs the fit command's tests share: simulated DWI series, a QSM field and head, tiny
IVIM and QSM network bundles (each built once per test module)."""

from __future__ import annotations

import numpy as np
import pytest

from qmri_labels.cli import fit as fit_cli

from fit_cli_data import EPSTEIN, simulate, save, QSM_VOXEL


@pytest.fixture(scope="module")
def ivim_data(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("ivim"))


@pytest.fixture(scope="module")
def ivim_run(ivim_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "maps"
    code = fit_cli.main(["--dwi", str(ivim_data["dwi"]), "--bval", str(ivim_data["bval"]), "--sigma", "auto",
                         "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def network_bundle(tmp_path_factory):
    """A tiny IVIM network for Epstein's protocol (one epoch: the tests check the plumbing,
    not the accuracy, by comparing the maps with the estimator's own predictions)."""
    from qmri_labels.data import DatasetSpec
    from qmri_labels.estimators import NetworkEstimator

    dataset = DatasetSpec(model="ivim", protocol=tuple(EPSTEIN), snr=50, n=64, seed=3).generate()
    network = NetworkEstimator(label="gt", max_epochs=1, batch_size=64, patience=0, val_fraction=0.0,
                               progress=False, accelerator="cpu", devices=1).fit(dataset)
    folder = tmp_path_factory.mktemp("models")
    network.save(folder / "tiny-ivim")
    return folder / "tiny-ivim"


@pytest.fixture(scope="module")
def epstein_data(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("epstein"), bvals=EPSTEIN, snr=100)


@pytest.fixture(scope="module")
def qsm_data(tmp_path_factory):
    from qmri_labels.physics.qsm import forward_field

    folder = tmp_path_factory.mktemp("qsm")
    n = 20
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")
    chi = np.zeros((n, n, n), np.float32)
    chi[(x - 3) ** 2 + y ** 2 + (2 * z) ** 2 < 16] = 0.1
    chi[(x + 4) ** 2 + (y - 2) ** 2 + (2 * z) ** 2 < 9] = -0.05
    mask = (x ** 2 + y ** 2 + (2 * z) ** 2) < 81
    field = forward_field(chi, QSM_VOXEL, (0, 0, 1), pad=True).astype(np.float32)
    affine = np.diag(QSM_VOXEL + (1.0,))
    affine[:3, 3] = (-10, -10, -20)
    save(folder / "sub-01_field.nii.gz", field, affine)
    save(folder / "brain_mask.nii.gz", mask.astype(np.uint8), affine)
    return {"chi": chi, "mask": mask, "field": field, "affine": affine,
            "field_path": folder / "sub-01_field.nii.gz", "mask_path": folder / "brain_mask.nii.gz"}


@pytest.fixture(scope="module")
def qsm_network_bundle(tmp_path_factory):
    """A tiny QSM U-Net (toy preset, one epoch on two 16^3 phantoms): plumbing, not accuracy."""
    from qmri_labels.data.qsm import QSMPhantomSpec
    from qmri_labels.estimators import QSMEstimator

    phantoms = QSMPhantomSpec(shape=(16, 16, 16), n=2, n_orientations=1, seed=0).generate()
    network = QSMEstimator(label="gt", preset="toy", patch_size=None, samples_per_epoch=2, batch_size=2,
                           max_epochs=1, device="cpu").fit(phantoms)
    return network.save(tmp_path_factory.mktemp("qsm_models") / "tiny-qsm")


@pytest.fixture(scope="module")
def qsm_head(tmp_path_factory):
    """One 40^3 head phantom given twice: its total field (brain + skull/air background) and its
    masked local field, from the same seed (same sources, same mask)."""
    from qmri_labels.data.qsm import QSMPhantomSpec

    folder = tmp_path_factory.mktemp("qsm_head")
    spec = QSMPhantomSpec(shape=(40, 40, 40), n=1, seed=5, noise_sigma=0.0)
    local = spec.generate()
    total = spec.replace(field_kind="total").generate()
    np.testing.assert_array_equal(local.mask, total.mask)
    affine = np.eye(4)
    paths = {}
    for name, array in (("total", total.fields[0, 0]), ("local", local.fields[0, 0])):
        paths[name] = save(folder / f"sub-01_{name}field.nii.gz", array.astype(np.float32), affine)
    paths["mask"] = save(folder / "brain_mask.nii.gz", local.mask[0].astype(np.uint8), affine)
    return {"paths": paths, "chi": local.chi[0], "mask": local.mask[0], "local": local.fields[0, 0],
            "total": total.fields[0, 0]}
