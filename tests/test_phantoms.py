"""Synthetic QSM phantoms (qmri_labels.data.phantoms)."""

import numpy as np
import pytest

from qmri_labels.data.phantoms import (
    QSMPhantomSet,
    QSMPhantomSpec,
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


def test_phantom_set_fields_noise_and_roundtrip(tmp_path):
    spec = QSMPhantomSpec(shape=(16, 16, 16), n=2, n_orientations=3, noise_sigma=0.0, seed=3)
    data = spec.generate()
    assert data.chi.shape == (2, 16, 16, 16) and data.fields.shape == (2, 3, 16, 16, 16)
    for k, d in enumerate(data.orientations):
        np.testing.assert_allclose(data.fields[1, k], forward_field(data.chi[1], b0_dir=d), atol=1e-6)
    noisy = spec.replace(noise_sigma=0.01).generate()
    resid = noisy.fields - data.fields
    assert resid.std() == pytest.approx(0.01, rel=0.05)
    masked = spec.replace(mask_field=True).generate()
    assert np.all(masked.fields[:, :, ~masked.mask[0]][0] == 0)
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
