"""NIfTI, b-value, b-vector and .mat I/O of qmri_labels.data.io."""

from __future__ import annotations

import gzip
import hashlib
import os

import nibabel as nib
import numpy as np
import pytest
import scipy.io

from qmri_labels.data import io as qio

OBLIQUE = np.array([[-1.9, 0.3, 0.0, 91.0],
                    [0.2, 2.1, 0.1, -120.5],
                    [0.0, -0.1, 3.0, -47.0],
                    [0.0, 0.0, 0.0, 1.0]])


def _write_image(path, data, affine=OBLIQUE, slope=None, inter=None, qcode=1, scode=4):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, qcode)
    image.set_sform(affine, scode)
    image.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, str(path))
    return path


def test_save_keeps_geometry_and_writes_float32(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float64)
    source = qio.load_nifti(_write_image(tmp_path / "in.nii.gz", data.astype(np.float32)))
    out = qio.save_nifti(tmp_path / "out.nii.gz", data, source.affine, source.header, description="x")
    image = nib.load(str(out))
    assert image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(image.affine, nib.load(str(tmp_path / "in.nii.gz")).affine)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 4
    assert image.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(image.header.get_zooms(), source.voxel_size, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.dataobj), data.astype(np.float32))


def test_save_from_4d_reference_writes_3d_map(tmp_path):
    source = qio.load_nifti(_write_image(tmp_path / "dwi.nii", np.ones((4, 4, 2, 5), np.int16), slope=2.0, inter=1.0))
    out = qio.save_nifti(tmp_path / "map.nii.gz", np.full((4, 4, 2), 0.5), source.affine, source.header)
    image = nib.load(str(out))
    assert image.shape == (4, 4, 2)
    # the input's int16 type and scaling must not leak into the float32 map
    assert image.get_data_dtype() == np.float32
    assert np.all(image.get_fdata() == 0.5)


def test_gz_output_is_deterministic(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = qio.save_nifti(tmp_path / "a.nii.gz", data, OBLIQUE)
    b = qio.save_nifti(tmp_path / "b.nii.gz", data, OBLIQUE)
    assert qio.sha256_file(a) == qio.sha256_file(b)
    assert gzip.decompress(a.read_bytes())[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header inside


def test_voxels_apply_scaling_and_match_full_read(tmp_path):
    raw = np.arange(4 * 3 * 2 * 5, dtype=np.int16).reshape(4, 3, 2, 5)
    for name in ("s.nii", "s.nii.gz"):
        volume = qio.load_nifti(_write_image(tmp_path / name, raw, slope=0.5, inter=-3.0))
        full = volume.read()
        assert full.dtype == np.float32
        np.testing.assert_allclose(full, raw * 0.5 - 3.0)
        coords = (np.array([0, 3, 2]), np.array([1, 2, 0]), np.array([1, 0, 1]))
        np.testing.assert_allclose(volume.voxels(coords), full[coords])


def test_load_nifti_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        qio.load_nifti(tmp_path / "missing.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable NIfTI"):
        qio.load_nifti(tmp_path / "text.nii.gz")
    with pytest.raises(ValueError, match="folder"):
        qio.load_nifti(tmp_path)
    # a truncated file: the header reads, the data do not
    good = _write_image(tmp_path / "good.nii", np.ones((8, 8, 8), np.float32))
    (tmp_path / "cut.nii").write_bytes(good.read_bytes()[:600])
    volume = qio.load_nifti(tmp_path / "cut.nii")
    with pytest.raises(ValueError, match="cannot read the image data"):
        volume.read()


def test_save_nifti_rejects_bad_name_and_affine(tmp_path):
    with pytest.raises(ValueError, match=".nii"):
        qio.save_nifti(tmp_path / "map.img", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        qio.save_nifti(tmp_path / "map.nii", np.zeros((2, 2, 2)), np.eye(3))
    assert list(tmp_path.iterdir()) == []


def test_nifti_stem():
    assert qio.nifti_stem("a/sub-01_dwi.nii.gz") == "sub-01_dwi"
    assert qio.nifti_stem("x.nii") == "x"


@pytest.mark.parametrize("text", ["0 10 20 800\n", "0\t10\t20\t800", "0\n10\n20\n800\n", "0, 10, 20, 800"])
def test_read_bvals_formats(tmp_path, text):
    (tmp_path / "b.bval").write_text(text)
    np.testing.assert_array_equal(qio.read_bvals(tmp_path / "b.bval"), [0, 10, 20, 800])


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("0 10 x 800", "not a list of numbers"),
    ("0 10\n20 30\n", "one row"),
    ("0 10 -5", ">= 0"),
    ("0 nan 5", "NaN"),
    ("0 10 20\n30 40\n", "different lengths"),
])
def test_read_bvals_errors(tmp_path, text, message):
    (tmp_path / "b.bval").write_text(text)
    with pytest.raises(ValueError, match=message):
        qio.read_bvals(tmp_path / "b.bval")


def test_read_bvals_missing(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        qio.read_bvals(tmp_path / "none.bval")


def test_read_bvecs(tmp_path):
    vecs = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    np.savetxt(tmp_path / "rows.bvec", vecs)
    np.savetxt(tmp_path / "cols.bvec", vecs.T)
    np.testing.assert_array_equal(qio.read_bvecs(tmp_path / "rows.bvec", 4), vecs)
    np.testing.assert_array_equal(qio.read_bvecs(tmp_path / "cols.bvec", 4), vecs)
    with pytest.raises(ValueError, match="4 gradient directions for 5 volumes"):
        qio.read_bvecs(tmp_path / "rows.bvec", 5)
    np.savetxt(tmp_path / "bad.bvec", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 rows"):
        qio.read_bvecs(tmp_path / "bad.bvec")


def test_check_same_grid(tmp_path):
    a = qio.load_nifti(_write_image(tmp_path / "a.nii", np.zeros((4, 4, 2), np.float32)))
    b = qio.load_nifti(_write_image(tmp_path / "b.nii", np.zeros((4, 4, 3), np.float32)))
    shifted = OBLIQUE.copy()
    shifted[0, 3] += 2.0
    c = qio.load_nifti(_write_image(tmp_path / "c.nii", np.zeros((4, 4, 2), np.float32), affine=shifted))
    d = qio.load_nifti(_write_image(tmp_path / "d.nii", np.zeros((4, 4, 2, 7), np.float32)))
    with pytest.raises(ValueError, match="shape"):
        qio.check_same_grid(a, b)
    with pytest.raises(ValueError, match="affine differs"):
        qio.check_same_grid(a, c)
    qio.check_same_grid(d, a)  # a 4-D series and a 3-D mask on one grid


def test_write_mat_round_trip(tmp_path):
    chi = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    path = qio.write_mat(tmp_path / "chi.mat", {"chi": chi, "voxel_size": np.array([1.0, 1.0, 2.0])})
    loaded = scipy.io.loadmat(path)
    np.testing.assert_array_equal(loaded["chi"], chi)
    np.testing.assert_array_equal(loaded["voxel_size"].ravel(), [1.0, 1.0, 2.0])


def test_sha256_and_json(tmp_path):
    path = qio.write_json(tmp_path / "m.json", {"a": np.float32(1.5), "b": np.arange(3), "p": tmp_path})
    assert qio.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert '"a": 1.5' in path.read_text()


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = qio.save_nifti(tmp_path / "map.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        qio.save_nifti(target, np.ones((2, 2, 2)), np.eye(4))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]


# ----------------------------------------------------------------------------- atomic folders

def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    from qmri_labels.fileio import atomic_dir, write_text

    target = tmp_path / "results"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(target) as staging:
            write_text(staging / "a.txt", "half")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as staging:
        write_text(staging / "a.txt", "first")
        assert not target.exists()  # invisible until complete
    assert (target / "a.txt").read_text() == "first"
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((target / "a.txt").stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as staging:
            write_text(staging / "b.txt", "second")
            raise RuntimeError("crash while replacing")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # the old folder is untouched
    with atomic_dir(target, overwrite=True) as staging:
        write_text(staging / "b.txt", "second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no staging or retired folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass
