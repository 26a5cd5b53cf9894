"""Where a scan's voxels come from: an in-memory array, or a 4-D NIfTI read chunk by chunk
(:func:`load_dwi` opens one with its b-values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmri_labels.data.io import NiftiVolume, load_nifti, read_bvals, read_bvecs


class ArraySource:
    """Voxel rows of an in-memory array (..., M)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.lead = array.shape[:-1]
        self.n_measurements = array.shape[-1]

    def rows(self, coords) -> np.ndarray:
        return np.asarray(self.array[coords], dtype=np.float32)

    def full(self) -> np.ndarray:
        return self.array


class NiftiSource:
    """Voxel rows of a 4-D NIfTI, read chunk by chunk (never the whole image as floats)."""

    def __init__(self, volume: NiftiVolume):
        if volume.ndim != 4:
            raise ValueError(f"{volume.path}: needs a 4-D image (x, y, z, volumes), got shape {volume.shape}")
        self.volume = volume
        self.lead = tuple(volume.shape[:3])
        self.n_measurements = volume.shape[3]

    def rows(self, coords) -> np.ndarray:
        return self.volume.voxels(coords)

    def full(self) -> np.ndarray:
        return self.volume.read()


def voxel_source(data):
    """The voxel rows of ``data``: a 4-D NIfTI read lazily, or a numeric array ``(..., M)``."""
    if isinstance(data, NiftiVolume):
        return NiftiSource(data)
    array = np.asarray(data)
    if array.ndim < 1 or array.shape[-1] < 1:
        raise ValueError(f"data must have shape (..., n_measurements), got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"data must be numeric, got dtype {array.dtype}")
    return ArraySource(array)


def load_dwi(dwi, bval, bvec=None, b0_threshold: float = 0.0) -> tuple[NiftiVolume, np.ndarray, np.ndarray | None]:
    """Open a 4-D diffusion NIfTI with its b-values (and b-vectors: NaN only on b = 0 volumes).

    Returns ``(volume, bvalues (M,), bvecs (3, M) or None)``; the image's voxels are read
    lazily (see :class:`~qmri_labels.data.io.NiftiVolume`), which :func:`fit_volume` accepts.
    """
    volume = load_nifti(dwi)
    if volume.ndim == 3:
        raise ValueError(f"{dwi}: is a 3-D image (shape {volume.shape}); diffusion data need a 4-D image "
                         "(x, y, z, one volume per b-value)")
    if volume.ndim != 4:
        raise ValueError(f"{dwi}: has {volume.ndim} dimensions (shape {volume.shape}); diffusion data need a 4-D "
                         "image")
    bvals = read_bvals(bval)
    if bvals.size != volume.shape[3]:
        raise ValueError(f"{bval}: {bvals.size} b-values, but {Path(dwi).name} has {volume.shape[3]} volumes")
    bvecs = read_bvecs(bvec, volume.shape[3], bvals, b0_threshold) if bvec is not None else None
    return volume, bvals, bvecs
