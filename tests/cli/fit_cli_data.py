"""Small simulated NIfTI inputs and helpers shared by the fit command's tests (``tests/cli``)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from qmri_labels.cli import fit as fit_cli
from qmri_labels.maps.derivatives import param_map_name
from qmri_labels.physics import get_model


OBLIQUE = np.array([[-1.9, 0.3, 0.0, 91.0],
                    [0.2, 2.1, 0.1, -120.5],
                    [0.0, -0.1, 3.0, -47.0],
                    [0.0, 0.0, 0.0, 1.0]])
SHAPE = (6, 6, 3)
#: Epstein's b-values with the b = 0 volume acquired three times (for --sigma auto)
BVALS = np.array([0, 0, 0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
EPSTEIN = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])


def simulate(folder, name="sub-01_dwi", bvals=BVALS, model="ivim", snr=200.0, s0=1000.0, seed=0,
             shape=SHAPE, affine=OBLIQUE, background=0):
    """Write a 4-D NIfTI of Rician-noisy signals with known parameters; returns the truth.

    ``background`` adds that many noise-only slices (S0 = 0) along the last spatial axis.
    """
    rng = np.random.default_rng(seed)
    if model == "ivim":
        theta = np.stack([rng.uniform(0.8, 1.2, shape) * s0, rng.uniform(0.1, 0.35, shape),
                          rng.uniform(0.0008, 0.002, shape), rng.uniform(0.02, 0.06, shape)], -1)
    else:
        theta = np.stack([rng.uniform(0.8, 1.2, shape) * s0, rng.uniform(0.0005, 0.0025, shape)], -1)
    if background:
        theta = np.concatenate([theta, np.zeros(shape[:2] + (background, theta.shape[-1]))], axis=2)
    clean = get_model(model).forward(torch.tensor(theta), torch.tensor(bvals, dtype=torch.float64)).numpy()
    sigma = s0 / snr
    noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(noisy.astype(np.float32), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    nib.save(image, str(folder / f"{name}.nii.gz"))
    np.savetxt(folder / f"{name}.bval", np.asarray(bvals)[None], fmt="%g")
    return {"theta": theta.astype(np.float32), "sigma": sigma, "dwi": folder / f"{name}.nii.gz",
            "bval": folder / f"{name}.bval", "noisy": noisy.astype(np.float32)}


def save(path, data, affine=OBLIQUE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def run(argv, capsys=None):
    code = fit_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def assert_no_leftovers(folder):
    """A failed run leaves no temporary folder behind."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def pname(prefix, name, model="ivim"):
    """The BIDS-derivative file name of a parameter map."""
    return param_map_name(prefix, model, name)


def load_map(out, name):
    image = nib.load(str(out / name))
    return image, np.asarray(image.dataobj)


QSM_VOXEL = (1.0, 1.0, 2.0)
