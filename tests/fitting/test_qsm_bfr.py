"""Background-field removal (qmri_labels.fitting.bfr) on head phantoms with a known local field."""

import numpy as np
import pytest
import torch

from qmri_labels.analysis.image_metrics import nrmse_demeaned
from qmri_labels.data.qsm import QSMPhantomSpec
from qmri_labels.fitting.bfr import BFR_METHODS, DEFAULTS, common_eroded_mask, remove_background, resolve_radius
from qmri_labels.physics.qsm import forward_field


@pytest.fixture(scope="module")
def head():
    spec = QSMPhantomSpec(shape=(48, 48, 48), n=1, seed=5, field_kind="total", noise_sigma=0.0)
    total = spec.generate()
    local = spec.replace(field_kind="local").generate()
    return total.field[0], local.field[0], total.mask[0]


# measured on this phantom (noise-free, demeaned NRMSE in each eroded mask): sharp 32, vsharp 64,
# resharp 58, pdf 84, lbv 64 % (the local field of sources that reach the brain edge has a
# harmonic part that no BFR can separate from the background); doing nothing: 408-770 %
BOUNDS = {"sharp": 40.0, "vsharp": 75.0, "resharp": 68.0, "pdf": 92.0, "lbv": 75.0}
# what each method leaves of a pure background field, as a percentage of the TRUE LOCAL field
# (the background is ~17x larger, so a bound relative to it would pass a residual larger than the
# local field itself); measured on this phantom: sharp 5.4, vsharp 18.2, resharp 5.3, pdf 1.2,
# lbv 29.0 (sinuses two voxels from the brain, sharp edges: not harmonic enough for V-SHARP's
# small spheres at the edge and LBV's 7-point Laplacian)
RESIDUAL_BOUNDS = {"sharp": 8.0, "vsharp": 24.0, "resharp": 8.0, "pdf": 3.0, "lbv": 35.0}


def _relative(residual, reference, mask):
    """100 ||residual|| / ||reference|| over the mask, both demeaned there."""
    r, ref = residual[mask] - residual[mask].mean(), reference[mask] - reference[mask].mean()
    return 100.0 * np.linalg.norm(r) / np.linalg.norm(ref)


@pytest.mark.parametrize("method", sorted(BFR_METHODS))
def test_bfr_recovers_the_local_field(head, method):
    total, true_local, mask = head
    local, eroded = BFR_METHODS[method](total, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))
    assert local.shape == total.shape and local.dtype == np.float32 and eroded.dtype == bool
    assert np.all(eroded <= mask) and eroded.sum() > 0.3 * mask.sum()
    assert np.all(local[~eroded] == 0)
    nothing = nrmse_demeaned(total, true_local, eroded)
    err = nrmse_demeaned(local, true_local, eroded)
    assert nothing > 300.0  # the background dominates the total field
    assert err < BOUNDS[method] and err < 0.15 * nothing, (method, err, nothing)
    # a pure background field (total minus the true local field): what is left of it, against the
    # size of the true local field on the same mask
    background = total - true_local
    residual, e2 = BFR_METHODS[method](background, mask)
    left = _relative(residual, true_local, e2)
    assert left < RESIDUAL_BOUNDS[method], (method, left)


@pytest.mark.parametrize("method", sorted(BFR_METHODS))
def test_bfr_batches_and_runs_on_torch(head, method):
    total, _, mask = head
    small = total[8:40, 8:40, 8:40]
    m = mask[8:40, 8:40, 8:40]
    opts = {"max_iter": 20} if "max_iter" in DEFAULTS[method] else {}
    single, e1 = BFR_METHODS[method](small, m, **opts)
    batch, e2 = BFR_METHODS[method](np.stack([small, 2 * small]), m, **opts)
    np.testing.assert_allclose(batch[0], single, atol=1e-5)
    np.testing.assert_allclose(batch[1], 2 * single, atol=2e-5)  # every method is linear in the field
    t_local, t_mask = BFR_METHODS[method](torch.as_tensor(small), torch.as_tensor(m), **opts)
    assert isinstance(t_local, torch.Tensor) and t_mask.dtype == torch.bool
    np.testing.assert_allclose(t_local.numpy(), single, atol=1e-5)


def test_bfr_bad_input():
    f = np.zeros((16, 16, 16), np.float32)
    m = np.zeros((16, 16, 16), bool)
    m[4:12, 4:12, 4:12] = True
    with pytest.raises(ValueError, match="unknown background-field removal method"):
        remove_background("harperella", f, m)
    with pytest.raises(ValueError, match="unknown option"):
        remove_background("sharp", f, m, radius=3.0, radious=2.0)
    with pytest.raises(ValueError, match="mask shape"):
        remove_background("pdf", f, m[:8])
    with pytest.raises(ValueError, match="no voxels"):
        remove_background("lbv", f, np.zeros_like(m))
    with pytest.raises(ValueError, match="radius"):
        remove_background("sharp", f, m, radius=0.5)
    with pytest.raises(ValueError, match="NaN"):
        remove_background("sharp", np.full_like(f, np.nan), m)


def _profile(mask, direction, wavelength=17.0, amplitude=0.1):
    """chi = a sine along ``direction`` (voxels), inside the mask only."""
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in mask.shape],
                                  indexing="ij"), -1)
    u = coords @ np.asarray(direction, dtype=np.float64)
    return (amplitude * np.sin(2 * np.pi * u / wavelength) * mask).astype(np.float32)


@pytest.mark.parametrize("method", sorted(BFR_METHODS))
def test_bfr_removes_a_magic_angle_profile_that_the_local_field_holds(head, method):
    """Why chi after BFR cannot be scored against the whole truth: a chi profile that varies only
    along a direction at the magic angle to B0 makes a field that is harmonic inside the brain
    (the dipole kernel's Laplacian, (1/3) lap - d_z^2, is zero on it), so every BFR method removes it
    like a background field, although the masked true local field holds it. Any 1-D
    profile along any such direction, and sums of them, are invisible after BFR: the part of chi
    no inversion of a BFR'd field can recover. Profiles along z or x are kept."""
    from qmri_labels.physics.qsm import forward_field

    _, _, mask = head
    magic = np.arccos(1 / np.sqrt(3))
    kept = {}
    for name, direction in (("magic xz", (np.sin(magic), 0.0, np.cos(magic))),
                            ("magic yz", (0.0, -np.sin(magic), np.cos(magic))), ("z", (0, 0, 1)), ("x", (1, 0, 0))):
        chi = _profile(mask, direction)
        local_field = forward_field(chi, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)) * mask
        # the masked local field holds it: a tenth or more of chi's size, as for a profile along x
        assert np.linalg.norm(local_field[mask]) > 0.1 * np.linalg.norm(chi[mask]), name
        local, eroded = BFR_METHODS[method](local_field, mask)
        kept[name] = np.linalg.norm(local[eroded]) / np.linalg.norm(local_field[eroded])
    # measured on this head: magic-angle profiles keep 0.1-6.5 %, z and x profiles 65-116 %
    assert kept["magic xz"] < 0.1 and kept["magic yz"] < 0.1, kept
    assert kept["z"] > 0.5 and kept["x"] > 0.5, kept


# -- anatomical heads at 2 mm ------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_2mm():
    spec = QSMPhantomSpec(shape=(96, 96, 96), voxel_size=(2.0, 2.0, 2.0), n=1, seed=0, family="anatomical",
                          field_kind="total", noise_sigma=0.0)
    total = spec.generate()
    local = spec.replace(field_kind="local").generate()
    return total.field[0], local.field[0], total.mask[0], spec.voxel_size


# measured on this head (2 mm voxels, every method at its defaults, which are in voxels): local-field
# NRMSE sharp 66.9, vsharp 67.6, resharp 35.9, lbv 45.2 %; background left, % of the local field:
# 2.5, 4.2, 2.5, 6.5 (PDF, 40 s at this size, is left to the benchmark)
HEAD_BOUNDS = {"sharp": (75.0, 5.0), "vsharp": (75.0, 8.0), "resharp": (45.0, 5.0), "lbv": (55.0, 10.0)}


@pytest.mark.parametrize("method", sorted(HEAD_BOUNDS))
def test_bfr_on_an_anatomical_head_at_2mm_runs_at_its_defaults(head_2mm, method):
    total, true_local, mask, voxel = head_2mm
    local, eroded = remove_background(method, total, mask, voxel)
    assert eroded.sum() > 0.6 * mask.sum()
    err = _relative(local - true_local, true_local, eroded)
    residual, e2 = remove_background(method, total - true_local, mask, voxel)
    left = _relative(residual, true_local, e2)
    assert err < HEAD_BOUNDS[method][0] and left < HEAD_BOUNDS[method][1], (method, err, left)


def test_radii_in_voxels_or_mm():
    assert resolve_radius("4vox", (2.0, 2.0, 2.0)) == 8.0
    assert resolve_radius(" 1.5 voxels", (1.0, 1.0, 3.0)) == 4.5
    assert resolve_radius(5, (2.0, 2.0, 2.0)) == 5.0
    for bad in ("4 mm", "vox", "-1vox", 0.0):
        with pytest.raises(ValueError, match="radius"):
            resolve_radius(bad, (1.0, 1.0, 1.0))
    f = np.zeros((24, 24, 24), np.float32)
    m = np.zeros((24, 24, 24), bool)
    m[4:20, 4:20, 4:20] = True
    # the defaults span the same voxels at any voxel size: at 1 mm the 4 mm of before
    _, e1 = remove_background("sharp", f, m, (1.0, 1.0, 1.0))
    _, e2 = remove_background("sharp", f, m, (2.0, 2.0, 2.0))
    _, e3 = remove_background("sharp", f, m, (1.0, 1.0, 1.0), radius=4.0)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(e1, e3)
    # a radius in mm below the voxel size is still refused, naming it
    with pytest.raises(ValueError, match="below the voxel size"):
        remove_background("vsharp", f, m, (2.0, 2.0, 2.0), min_radius=1.0)
    common = common_eroded_mask(m, (1.0, 1.0, 1.0))
    assert common.sum() == np.logical_and(e1, m).sum()  # SHARP's 4-voxel erosion is the deepest here


def test_lbv_converges_and_fails_only_where_the_skull_touches_the_mask(head_2mm):
    """Why LBV scored 121 % on an anatomical head at 2 mm "whatever the voxel size": not its
    solver (float64 to a 1e-12 residual gives the same field; an isotropic voxel size only scales
    the Laplacian, so the solution is the same whatever size is declared) but a skull in the voxels
    next to the brain mask: the background field is then ~100x the local field at the mask edge and
    so far from harmonic on the 7-point stencil (its discrete Laplacian inside the brain was as
    large as the local field's) that its harmonic interpolation leaves more than the local field.
    The same head at 1 mm scored 35 %; with a CSF gap of two or more mm (this phantom's), 30-52 %
    at 2 mm on six heads."""
    from scipy import ndimage

    from qmri_labels.data.qsm import make_anatomical_head

    total, true_local, mask, voxel = head_2mm
    base, e = remove_background("lbv", total, mask, voxel)
    tight, e64 = remove_background("lbv", total.astype(np.float64), mask, voxel, max_iter=20000, tol=1e-12)
    assert _relative(base - tight, true_local, e) < 1.0
    declared_1mm, _ = remove_background("lbv", total, mask, (1.0, 1.0, 1.0))
    assert _relative(base - declared_1mm, true_local, e) < 1.0
    # the skull moved into the voxels next to the mask: LBV fails, SHARP's erosion copes
    head = make_anatomical_head(seed=0)
    ring = ndimage.binary_dilation(head.mask) & ~head.mask
    touching = head.background.copy()
    touching[ring] = -2.1
    local = forward_field(head.chi, head.voxel_size) * head.mask
    errors = {}
    for name, bg in (("gap", head.background), ("touching", touching)):
        field = (forward_field(head.chi + bg, head.voxel_size) * head.mask).astype(np.float32)
        out, eroded = remove_background("lbv", field, head.mask, head.voxel_size)
        errors[name] = _relative(out - local, local, eroded)
    assert errors["gap"] < 55.0 and errors["touching"] > 1.5 * errors["gap"], errors
