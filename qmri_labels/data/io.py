"""Reading and writing a user's data: NIfTI images, FSL/BIDS b-value files, MATLAB files.

Everything here fails with a :class:`ValueError` that names the file and the problem, so that a
command-line tool can print it as it is. Every writer is atomic: the bytes go to a temporary
file in the target folder, which is then renamed (:func:`atomic_write_bytes`), so a crash or a
full disk never leaves a half-written file under the final name.

NIfTI conventions
-----------------
* Images are read with nibabel; :meth:`NiftiVolume.read` returns float32 with the header's
  scaling (``scl_slope``/``scl_inter``) applied.
* :func:`save_nifti` always writes float32 (no scaling) and, given a reference header, keeps
  its geometry: the affine, the qform and sform with their codes, voxel sizes and spatial
  units. ``.nii.gz`` files are compressed (fast level 1) with a fixed timestamp, so the same data give the
  same bytes.
* For large 4-D images :meth:`NiftiVolume.voxels` reads only the requested voxels (all
  volumes) from the unscaled array, which nibabel memory-maps for uncompressed ``.nii``; a
  fitting loop over chunks of voxels therefore never holds a float copy of the whole image.

b-values and b-vectors
----------------------
FSL and BIDS store b-values (s/mm^2) as one row of numbers separated by white space
(``.bval``) and unit gradient directions as three rows (``.bvec``). :func:`read_bvals` also
accepts a single column, which some converters write.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io

from qmri_labels.fileio import atomic_write_bytes, write_json

__all__ = [
    "NiftiVolume",
    "atomic_write_bytes",
    "check_same_grid",
    "load_nifti",
    "nifti_stem",
    "read_bvals",
    "read_bvecs",
    "save_nifti",
    "sha256_file",
    "write_json",
    "write_mat",
]

#: largest difference (in mm) between two affines that still counts as the same voxel grid
AFFINE_ATOL = 1e-3


@dataclass
class NiftiVolume:
    """A NIfTI image opened with nibabel; voxel values are read on demand.

    Attributes
    ----------
    path : Path
    image : nibabel image (its ``dataobj`` is a lazy proxy)
    """

    path: Path
    image: "nib.spatialimages.SpatialImage"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.image.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def header(self):
        return self.image.header

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """Voxel size along the three spatial axes (mm, from the header's zooms)."""
        zooms = self.header.get_zooms()[:3]
        return tuple(float(z) for z in zooms)

    def read(self, dtype=np.float32) -> np.ndarray:
        """The whole image as an array of ``dtype`` with the header's scaling applied."""
        try:
            return self.image.get_fdata(dtype=np.float64).astype(dtype, copy=False)
        except Exception as exc:  # truncated or corrupt data block
            raise ValueError(f"{self.path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc

    def _raw(self):
        """The stored (unscaled) array and the scaling; memory-mapped for uncompressed files."""
        if getattr(self, "_raw_cache", None) is None:
            proxy = self.image.dataobj
            try:
                if hasattr(proxy, "get_unscaled"):
                    raw = proxy.get_unscaled()
                    slope = float(getattr(proxy, "slope", 1.0))
                    inter = float(getattr(proxy, "inter", 0.0))
                else:
                    raw, slope, inter = np.asanyarray(proxy), 1.0, 0.0
            except Exception as exc:
                raise ValueError(f"{self.path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc
            if not np.isfinite(slope) or slope == 0:
                slope = 1.0  # NIfTI: scl_slope 0 or NaN means "no scaling"
            if not np.isfinite(inter):
                inter = 0.0
            self._raw_cache = (raw, slope, inter)
        return self._raw_cache

    def voxels(self, coords: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """Values at the voxels ``coords = (i, j, k)``, float32, shape ``(n,) + shape[3:]``."""
        raw, slope, inter = self._raw()
        try:
            values = np.asarray(raw[coords[0], coords[1], coords[2]], dtype=np.float32)
        except Exception as exc:
            raise ValueError(f"{self.path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc
        if slope != 1.0 or inter != 0.0:
            values = values * np.float32(slope) + np.float32(inter)
        return values


def load_nifti(path: str | os.PathLike) -> NiftiVolume:
    """Open a NIfTI file (``.nii`` or ``.nii.gz``) without reading its voxels yet.

    Raises
    ------
    ValueError
        The file does not exist, is not a NIfTI image, or its header is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a NIfTI file")
    try:
        image = nib.load(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{path}: is a {type(image).__name__}, expected a NIfTI-1 or NIfTI-2 image")
    if not np.all(np.isfinite(image.affine)):
        raise ValueError(f"{path}: the affine contains NaN or Inf")
    return NiftiVolume(path, image)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii``/``.nii.gz`` (``sub-01_dwi.nii.gz`` -> ``sub-01_dwi``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def nifti_bytes(data: np.ndarray, affine: np.ndarray, reference_header=None, *, compress: bool,
                description: str = "", dtype=np.float32) -> bytes:
    """The bytes of a NIfTI-1 file of ``dtype`` (see :func:`save_nifti`)."""
    data = np.asarray(data, dtype=dtype)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    header = None
    if reference_header is not None:
        header = nib.Nifti1Header.from_header(reference_header)
    image = nib.Nifti1Image(data, affine, header=header)
    if reference_header is not None:
        # keep the reference's qform/sform and codes rather than nibabel's re-derived ones
        qform, qcode = reference_header.get_qform(coded=True) if hasattr(reference_header, "get_qform") else (None, 0)
        sform, scode = reference_header.get_sform(coded=True) if hasattr(reference_header, "get_sform") else (None, 0)
        if qform is not None and np.allclose(qform, affine, atol=AFFINE_ATOL):
            image.set_qform(qform, int(qcode))
        if sform is not None and np.allclose(sform, affine, atol=AFFINE_ATOL):
            image.set_sform(sform, int(scode))
        if qform is None and sform is None:
            image.set_sform(affine, 2)
    hdr = image.header
    image.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr.set_intent("none")
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    raw = image.to_bytes()
    # level 1: float maps barely compress further, and level 6 costs ~3x the time
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, reference_header=None,
               description: str = "", dtype=np.float32) -> Path:
    """Write ``data`` as a NIfTI-1 file (float32 unless ``dtype`` says otherwise), atomically.

    Parameters
    ----------
    path : path ending in ``.nii`` or ``.nii.gz``
    data : ndarray, 3-D or 4-D; cast to float32
    affine : (4, 4) voxel-to-world matrix (mm)
    reference_header : nibabel header, optional
        Header of the input image; its geometry (qform/sform and codes, voxel sizes, units)
        is kept.
    description : str
        Short text for the header's ``descrip`` field (at most 79 ASCII characters).
    dtype : numpy dtype
        Stored data type, float32 by default (a status map of small codes may use uint8).
    """
    path = Path(path)
    name = path.name
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    payload = nifti_bytes(data, affine, reference_header, compress=name.endswith(".gz"),
                          description=description, dtype=dtype)
    atomic_write_bytes(path, payload)
    return path


def _read_numeric_text(path: Path, what: str, allow_nan: bool = False) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"{path}: {what} file not found")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the {what} file as text ({exc})") from exc
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        tokens = line.replace(",", " ").split()
        if not tokens:
            continue
        try:
            rows.append([float(t) for t in tokens])
        except ValueError:
            raise ValueError(f"{path}: line {line_no} of the {what} file is not a list of numbers: "
                             f"{line.strip()[:60]!r}") from None
    if not rows:
        raise ValueError(f"{path}: the {what} file is empty")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: the rows of the {what} file have different lengths {sorted(widths)}")
    values = np.array(rows, dtype=np.float64)
    if not np.all(np.isfinite(values) | (allow_nan & np.isnan(values))):
        raise ValueError(f"{path}: the {what} file contains NaN or Inf")
    return values


def read_bvals(path: str | os.PathLike) -> np.ndarray:
    """Read b-values (s/mm^2) from an FSL/BIDS ``.bval`` file.

    The file holds one row of numbers separated by spaces or tabs (a single column is accepted
    as well). Returns a 1-D float64 array.

    Raises
    ------
    ValueError
        Missing or empty file, non-numeric entries, several rows and columns, NaN/Inf or
        negative b-values.
    """
    path = Path(path)
    values = _read_numeric_text(path, "b-value")
    if values.shape[0] > 1 and values.shape[1] > 1:
        raise ValueError(f"{path}: a b-value file must be one row (FSL/BIDS), got {values.shape[0]} rows "
                         f"of {values.shape[1]} numbers")
    bvals = values.ravel()
    if np.any(bvals < 0):
        raise ValueError(f"{path}: b-values must be >= 0 s/mm^2, got {bvals.min():g}")
    return bvals


def read_bvecs(path: str | os.PathLike, n_volumes: int | None = None, bvalues=None,
               b0_threshold: float = 0.0) -> np.ndarray:
    """Read gradient directions from an FSL/BIDS ``.bvec`` file: three rows, one column per volume.

    A file with three columns and one row per volume is transposed. Returns ``(3, M)``
    float64. A ``nan`` vector is accepted on a b = 0 volume (dipy's own ``small_64D.bvec``
    has one); with ``bvalues`` given, a NaN on a volume with b above ``b0_threshold`` is refused.

    Parameters
    ----------
    path : path
    n_volumes : int, optional
        Volumes of the series; a different number of directions is refused.
    bvalues : array_like (M,), optional
        The series' b-values, to check that only b = 0 volumes lack a direction.
    b0_threshold : float
        b-values at or below it count as b = 0.

    Raises
    ------
    ValueError
        Missing file, not numeric, not 3 x M, (with ``n_volumes``) a different number of
        directions than volumes, Inf, or NaN on a diffusion-weighted volume.
    """
    path = Path(path)
    values = _read_numeric_text(path, "b-vector", allow_nan=True)
    if values.shape[0] != 3 and values.shape[1] == 3:
        values = values.T
    if values.shape[0] != 3:
        raise ValueError(f"{path}: a b-vector file must have 3 rows (x, y, z), got shape {values.shape}")
    if n_volumes is not None and values.shape[1] != n_volumes:
        raise ValueError(f"{path}: {values.shape[1]} gradient directions for {n_volumes} volumes")
    missing = np.isnan(values).any(axis=0)
    if missing.any():
        if bvalues is None:
            if missing.all():
                raise ValueError(f"{path}: every gradient direction is NaN")
        else:
            bvalues = np.asarray(bvalues, dtype=np.float64).ravel()
            weighted = missing & (bvalues > b0_threshold)
            if weighted.any():
                raise ValueError(f"{path}: the gradient direction of volume(s) {np.flatnonzero(weighted).tolist()} "
                                 f"is NaN, but their b-value is {bvalues[weighted][0]:g} s/mm^2; only b = 0 volumes "
                                 "may lack a direction")
    return values


def check_same_grid(reference: NiftiVolume, other: NiftiVolume, atol: float = AFFINE_ATOL) -> None:
    """Raise ValueError unless ``other`` has the spatial shape and affine of ``reference``."""
    if reference.shape[:3] != other.shape[:3]:
        raise ValueError(f"{other.path}: shape {other.shape[:3]} differs from {reference.path.name}'s "
                         f"spatial shape {reference.shape[:3]}")
    difference = np.abs(reference.affine - other.affine).max()
    if difference > atol:
        raise ValueError(f"{other.path}: affine differs from {reference.path.name}'s (largest difference "
                         f"{difference:.3g} mm); resample it onto the same grid first")


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def write_mat(path: str | os.PathLike, variables: dict) -> Path:
    """Write ``variables`` (name -> array or scalar) to a MATLAB ``.mat`` file (v5), atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables, do_compression=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path
