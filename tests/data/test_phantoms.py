"""Synthetic QSM phantoms (qmri_labels.data.qsm)."""

import json

import numpy as np
import pytest

from qmri_labels.data.qsm import (
    QSMPhantomSet,
    QSMPhantomSpec,
    make_background,
    make_phantom,
    random_orientations,
)
from qmri_labels.physics.qsm import forward_field


def test_phantom_is_seeded_and_masked():
    chi, mask = make_phantom((24, 24, 24), seed=5)
    chi2, mask2 = make_phantom((24, 24, 24), seed=5)
    chi3, _ = make_phantom((24, 24, 24), seed=6)
    assert chi.dtype == np.float32 and mask.dtype == bool and chi.shape == (24, 24, 24)
    np.testing.assert_array_equal(chi, chi2)
    np.testing.assert_array_equal(mask, mask2)
    assert not np.array_equal(chi, chi3)
    assert np.all(chi[~mask] == 0)  # borders zeroed
    assert 0.05 < mask.mean() < 0.9
    assert not mask[0].any() and not mask[-1].any()  # the support stays inside the grid
    assert np.count_nonzero(chi[mask]) > 0.2 * mask.sum()


def test_susceptibility_distribution_scales_with_sigma():
    stds = []
    for sigma in (0.1, 0.4):
        chi, mask = make_phantom((32, 32, 32), sigma=sigma, n_spheres=30, n_boxes=30, seed=0)
        stds.append(chi[mask].std())
    assert stds[1] / stds[0] == pytest.approx(4.0, rel=1e-4)  # same shapes, values scale with sigma


def test_shapes_are_smoothed():
    sharp, _ = make_phantom((32, 32, 32), smoothing=0.0, seed=1, n_spheres=3, n_boxes=3)
    smooth, _ = make_phantom((32, 32, 32), smoothing=2.0, seed=1, n_spheres=3, n_boxes=3)
    assert np.abs(np.diff(smooth, axis=0)).max() < np.abs(np.diff(sharp, axis=0)).max()
    # a sharp phantom is piecewise constant: few distinct values
    assert len(np.unique(np.round(sharp, 6))) <= 8


def test_phantom_bad_input():
    with pytest.raises(ValueError, match="shape"):
        make_phantom((2, 16, 16))
    with pytest.raises(ValueError, match="sigma"):
        make_phantom((16, 16, 16), sigma=-1)
    with pytest.raises(ValueError, match="size_range"):
        make_phantom((16, 16, 16), size_range=(5, 2))


def test_orientations():
    o = random_orientations(5, 25.0, seed=0)
    np.testing.assert_allclose(np.linalg.norm(o, axis=1), 1.0)
    np.testing.assert_allclose(o[0], [0, 0, 1])
    tilt = np.degrees(np.arccos(o[1:, 2]))
    assert np.all(tilt <= 25.0 + 1e-9) and np.all(tilt > 5)
    with pytest.raises(ValueError):
        random_orientations(0)
    with pytest.raises(ValueError, match="min_angle_deg"):
        random_orientations(3, 20.0, min_angle_deg=25.0)


def test_orientation_tilts_are_uniform_on_the_documented_zone():
    from scipy import stats

    max_angle = 30.0
    # default zone: max/2 .. max, uniform by area, i.e. cos(theta) uniform on [cos max, cos max/2]
    cos_t = random_orientations(2001, max_angle, seed=1)[1:, 2]
    lo, hi = np.cos(np.radians(max_angle)), np.cos(np.radians(max_angle / 2))
    assert stats.kstest(cos_t, stats.uniform(lo, hi - lo).cdf).pvalue > 0.01
    # the whole spherical cap on request: tilts below max/2 appear, cos uniform on [cos max, 1]
    cos_cap = random_orientations(2001, max_angle, seed=1, min_angle_deg=0.0)[1:, 2]
    assert stats.kstest(cos_cap, stats.uniform(lo, 1 - lo).cdf).pvalue > 0.01
    assert np.mean(cos_cap > hi) > 0.2


def test_phantom_set_fields_noise_and_roundtrip(tmp_path):
    spec = QSMPhantomSpec(shape=(16, 16, 16), n=2, n_orientations=3, noise_sigma=0.0, seed=3)
    data = spec.generate()
    assert data.chi.shape == (2, 16, 16, 16) and data.fields.shape == (2, 3, 16, 16, 16)
    for k, d in enumerate(data.orientations):
        # the default field is the local field of the brain sources, inside the mask only
        np.testing.assert_allclose(data.fields[1, k], forward_field(data.chi[1], b0_dir=d) * data.mask[1], atol=1e-6)
    noisy = spec.replace(noise_sigma=0.01).generate()
    resid = (noisy.fields - data.fields)[:, :, data.mask[0]][0]
    assert resid.std() == pytest.approx(0.01, rel=0.1)
    assert spec.generate().fingerprint == data.fingerprint != noisy.fingerprint
    path = data.save(tmp_path / "ph.npz")
    back = QSMPhantomSet.load(path)
    np.testing.assert_array_equal(back.fields, data.fields)
    assert back.spec == spec and back.fingerprint == data.fingerprint


def test_phantom_set_load_detects_tampering(tmp_path):
    data = QSMPhantomSpec(shape=(8, 8, 8), n=1).generate()
    path = data.save(tmp_path / "ph.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["chi"] = arrays["chi"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="fingerprint"):
        QSMPhantomSet.load(path)
    (tmp_path / "short.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="short.npz: not a readable QSM phantom set"):
        QSMPhantomSet.load(tmp_path / "short.npz")


def test_spec_validation():
    with pytest.raises(ValueError, match="n_orientations"):
        QSMPhantomSpec(n_orientations=0)
    with pytest.raises(ValueError, match="unknown"):
        QSMPhantomSpec.from_dict({"shape": [8, 8, 8], "bogus": 1})


def test_local_field_is_masked_by_default_and_noise_stays_inside_the_mask():
    spec = QSMPhantomSpec(shape=(24, 24, 24), n=2, noise_sigma=0.01, seed=9)
    assert spec.field_kind == "local"
    data = spec.generate()
    clean = spec.replace(noise_sigma=0.0).generate()
    m = data.mask[:, None].repeat(data.fields.shape[1], axis=1)
    assert np.all(data.fields[~m] == 0)  # no field (and no noise) outside the brain
    resid = (data.fields - clean.fields)[m]
    assert resid.std() == pytest.approx(0.01, rel=0.05)
    # the unmasked local field only by explicit choice; there the noise covers the whole grid
    unmasked = spec.replace(field_kind="local_unmasked").generate()
    unmasked_clean = spec.replace(field_kind="local_unmasked", noise_sigma=0.0).generate()
    outside = (unmasked.fields - unmasked_clean.fields)[~m]
    assert outside.std() == pytest.approx(0.01, rel=0.05)
    np.testing.assert_array_equal(unmasked.chi, data.chi)
    with pytest.raises(ValueError, match="field_kind"):
        QSMPhantomSpec(field_kind="masked")


def test_total_field_adds_a_dominant_background_of_the_head():
    spec = QSMPhantomSpec(shape=(48, 48, 48), n=1, noise_sigma=0.0, seed=2, n_orientations=2)
    local = spec.generate()
    total = spec.replace(field_kind="total").generate()
    np.testing.assert_array_equal(total.chi, local.chi)  # chi is that of the brain sources
    m = local.mask[0]
    background = total.fields[0, 0] - local.fields[0, 0]
    assert np.all(background[~m] == 0)
    # the background field inside the brain is an order of magnitude above the local one
    assert background[m].std() > 5 * local.fields[0, 0][m].std()
    # and it is the field of the head around the brain: skull, air, sinuses
    bg_chi = make_background(m, seed=0)
    assert np.all(bg_chi[m] == 0) and (bg_chi == -2.0).any() and (bg_chi == 9.4).any()
    # sinuses: air inside the head (next to the brain), not only around it
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~m)
    assert np.any((bg_chi == 9.4) & (dist <= 3)) and not np.any((bg_chi == 9.4) & (dist <= 2))


def test_phantom_set_fingerprints_recorded_from_native_bytes_stay_valid():
    """The set class once hashed the arrays' native (little-endian) bytes, and bundles record
    such fingerprints (the shipped QSM model's too); the one fingerprint function gives the
    same values, and the same again for a big-endian copy of the arrays."""
    import hashlib

    from qmri_labels.fitting.bfr import bfr_record

    data = QSMPhantomSpec(shape=(12, 12, 12), n=2, seed=4, field_kind="total").generate()
    for bfr in (None, bfr_record("vsharp")):
        kept = QSMPhantomSet(spec=data.spec, chi=data.chi, mask=data.mask, fields=data.fields,
                             orientations=data.orientations, bfr=bfr)
        native = hashlib.sha256(data.spec.canonical_json().encode())
        if bfr is not None:
            native.update(json.dumps(bfr, sort_keys=True, separators=(",", ":")).encode())
        for a in (data.chi, data.mask, data.fields, data.orientations):
            native.update(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
        assert kept.fingerprint == native.hexdigest()
        swapped = QSMPhantomSet(spec=data.spec, chi=data.chi.astype(">f4"), mask=data.mask,
                                fields=data.fields.astype(">f4"), orientations=data.orientations.astype(">f8"), bfr=bfr)
        assert swapped.fingerprint == kept.fingerprint
