"""Anatomical head phantoms (qmri_labels.data.qsm.anatomical) and the phantom families of a spec."""

import numpy as np
import pytest
from scipy import ndimage

from qmri_labels.data.qsm import (
    QSMPhantomSet,
    QSMPhantomSpec,
    make_anatomical_head,
    make_ellipsoid_phantom,
)
from qmri_labels.data.qsm.anatomical import CHI_PPM, DEEP_GREY_LABELS, LABELS


@pytest.fixture(scope="module")
def heads():
    return [make_anatomical_head(seed=s) for s in range(3)]


def test_head_size_and_layout(heads):
    for h in heads:
        assert h.chi.shape == (96, 96, 96) and h.voxel_size == (2.0, 2.0, 2.0)
        assert h.chi.dtype == np.float32 and h.mask.dtype == bool and h.labels.dtype == np.uint8
        idx = np.argwhere(h.mask)
        extent_mm = (idx.max(0) - idx.min(0) + 1) * 2.0
        assert extent_mm[0] >= 140 and 150 <= extent_mm[1] <= 185 and 110 <= extent_mm[2] <= 150, extent_mm
        # every region is present inside the brain; outside it: bone, scalp, air
        present = set(np.unique(h.labels[h.mask]).tolist())
        assert {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11} <= present
        assert {13, 14, 15} <= set(np.unique(h.labels[~h.mask]).tolist())
        assert set(np.unique(h.labels).tolist()) <= set(LABELS)
        assert np.all(h.chi[~h.mask] == 0) and np.all(h.background[h.mask] == 0)


def test_chi_is_zero_mean_with_regions_near_published_values(heads):
    for h in heads:
        assert abs(float(h.chi[h.mask].mean())) < 1e-6
        wm = h.labels == 8
        # region means relative to white matter: the shift of the zero mean cancels
        def rel(label):
            return float(h.chi[h.labels == label].mean() - h.chi[wm].mean())
        for label in DEEP_GREY_LABELS + (7, 9, 11):
            mean, sd = CHI_PPM[label]
            lo = (mean - 4 * sd) * 0.8 - CHI_PPM[8][0] - 0.03  # iron factor, partial volume, texture
            hi = (mean + 4 * sd) * 1.25 - CHI_PPM[8][0] + 0.02
            assert lo < rel(label) < hi, (LABELS[label], rel(label), lo, hi)
        assert rel(2) > rel(3) and rel(6) > rel(7)  # pallidum above putamen, nigra above thalamus
        assert float(h.chi[wm].mean()) < float(h.chi[h.labels == 9].mean())  # white matter below grey


def test_background_is_strong_and_a_few_mm_away(heads):
    for h in heads:
        dist = ndimage.distance_transform_edt(~h.mask, sampling=h.voxel_size)
        air = h.labels == 14
        assert 3.0 <= dist[air].min() <= 12.0  # sinuses and mastoid cells near the brain, not touching it
        assert h.background.min() < -1.5 and h.background.max() > 9.0
        # the skull sits outside a CSF gap
        assert dist[h.labels == 13].min() > 1.0
        assert h.magnitude[h.labels == 10].mean() > h.magnitude[h.labels == 2].mean() > 0  # iron darkens


def test_seeds_give_distinct_heads_and_the_same_seed_the_same_bytes(heads):
    again = make_anatomical_head(seed=0)
    for name in ("chi", "background", "mask", "labels", "magnitude"):
        assert getattr(again, name).tobytes() == getattr(heads[0], name).tobytes(), name
    sizes = {int(h.mask.sum()) for h in heads}
    assert len(sizes) == 3
    assert not np.array_equal(heads[0].labels, heads[1].labels)
    # the same anatomy at 1 mm: twice the voxels per axis, about the same brain volume
    fine = make_anatomical_head(voxel_size=1.0, seed=0)
    assert fine.chi.shape == (192, 192, 192)
    assert fine.mask.sum() * 1.0 == pytest.approx(heads[0].mask.sum() * 8.0, rel=0.03)


def test_head_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        make_anatomical_head((64, 64, 64), 2.0)
    with pytest.raises(ValueError, match="probability"):
        make_anatomical_head(calcification=1.5)
    with pytest.raises(ValueError, match="voxel_size"):
        make_anatomical_head(voxel_size=0.0)


def test_spec_families():
    spec = QSMPhantomSpec(shape=(96, 96, 96), voxel_size=(2.0, 2.0, 2.0), n=2, seed=3, family="anatomical",
                          field_kind="total", noise_sigma=0.0)
    data = spec.generate()
    assert data.labels.shape == data.chi.shape and data.magnitude.shape == data.chi.shape
    assert not np.array_equal(data.chi[0], data.chi[1])
    # inside the brain the background's field dominates the local field
    local = spec.replace(field_kind="local").generate()
    m = data.mask[0]
    background = data.field[0][m] - local.field[0][m]
    assert np.linalg.norm(background) > 5 * np.linalg.norm(local.field[0][m])
    assert spec.to_dict()["family"] == "anatomical"
    assert QSMPhantomSpec.from_dict(spec.to_dict()) == spec
    assert spec.replace(calcification=0.0).generate().fingerprint != data.fingerprint
    # the default family leaves the new fields out of its description (recorded fingerprints)
    assert "family" not in QSMPhantomSpec().to_dict()
    ell = QSMPhantomSpec(shape=(32, 32, 32), n=1, family="ellipsoids", sigma_chi=0.1).generate()
    assert ell.labels is None and abs(float(ell.chi[0][ell.mask[0]].mean())) < 1e-6
    with pytest.raises(ValueError, match="family"):
        QSMPhantomSpec(family="blobs")


def test_anatomical_set_saves_labels_and_magnitude(tmp_path):
    spec = QSMPhantomSpec(shape=(96, 96, 96), voxel_size=(2.0, 2.0, 2.0), n=1, family="anatomical")
    data = spec.generate()
    back = QSMPhantomSet.load(data.save(tmp_path / "a.npz"))
    assert back.fingerprint == data.fingerprint
    np.testing.assert_array_equal(back.labels, data.labels)
    np.testing.assert_array_equal(back.magnitude, data.magnitude)


def test_ellipsoid_phantom():
    chi, mask = make_ellipsoid_phantom((40, 40, 40), seed=1)
    chi2, _ = make_ellipsoid_phantom((40, 40, 40), seed=1)
    np.testing.assert_array_equal(chi, chi2)
    assert np.all(chi[~mask] == 0) and 0.03 < chi[mask].std() < 0.2
    inside = mask[1:] & mask[:-1]
    assert np.abs(np.diff(chi, axis=0))[inside].max() < 0.3 * np.abs(chi).max()  # smooth sources
