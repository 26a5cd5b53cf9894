"""Reproducible random patches (or whole volumes) of QSM phantom arrays, and padding."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

__all__ = ["QSMPatchDataset", "EpochSampler", "pad_to_multiple"]


def pad_to_multiple(volume: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Zero-pad the last three axes (centred) up to multiples of ``multiple``.

    Returns the padded array and the slices that crop it back.
    """
    shape = volume.shape[-3:]
    pads, crop = [], []
    for n in shape:
        total = (-n) % multiple
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + n))
    full = [(0, 0)] * (volume.ndim - 3) + pads
    return np.pad(volume, full), tuple(crop)


class QSMPatchDataset(TorchDataset):
    """Random patches (or whole volumes) of phantom arrays, reproducible from (seed, item).

    Item ``j`` of a patch dataset is the patch drawn by ``PCG64([seed, j])`` (a volume and a
    corner, uniformly); :class:`EpochSampler` hands out items ``e * S ... (e + 1) * S - 1`` in
    epoch ``e`` (``S = samples_per_epoch``), so every epoch sees new patches and a run is
    reproducible whatever the data loader prefetches. For whole volumes item ``j`` is volume
    ``j``.

    Parameters
    ----------
    arrays : dict of name -> ndarray (N, ..., X, Y, Z)
        ``inputs`` (N, C, X, Y, Z) and per-voxel targets (N, X, Y, Z): ``mask``, ``chi``,
        ``mle``, ``field``.
    patch_size : int or None
        Cube side; None gives whole volumes.
    samples_per_epoch : int
        Number of patches per epoch (ignored for whole volumes: one per volume).
    seed : int
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], patch_size: int | None, samples_per_epoch: int, seed: int = 0):
        self.arrays = {k: torch.as_tensor(v) for k, v in arrays.items()}
        self.n_volumes = self.arrays["inputs"].shape[0]
        self.shape = tuple(self.arrays["inputs"].shape[-3:])
        if patch_size is not None:
            if any(int(patch_size) > s for s in self.shape):
                raise ValueError(f"patch_size {patch_size} exceeds the volume shape {self.shape}")
        self.patch_size = None if patch_size is None else int(patch_size)
        self.samples_per_epoch = int(samples_per_epoch) if patch_size is not None else self.n_volumes
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, j: int) -> tuple[int, tuple[int, int, int]]:
        """(volume, corner) of item ``j``."""
        if self.patch_size is None:
            return int(j), (0, 0, 0)
        rng = np.random.Generator(np.random.PCG64([self.seed, int(j)]))
        vol = int(rng.integers(0, self.n_volumes))
        corner = tuple(int(rng.integers(0, s - self.patch_size + 1)) for s in self.shape)
        return vol, corner

    def __getitem__(self, j):
        vol, (x, y, z) = self.locate(j)
        p = self.patch_size
        out = {}
        for k, a in self.arrays.items():
            v = a[vol]
            if p is not None:
                v = v[..., x : x + p, y : y + p, z : z + p]
            out[k] = v
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Items of epoch ``e`` of a :class:`QSMPatchDataset` (Lightning calls :meth:`set_epoch`).

    Patches: ``e * S ... (e + 1) * S - 1``; whole volumes: a permutation seeded by (seed, e).
    """

    def __init__(self, dataset: QSMPatchDataset):
        self.dataset = dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        ds = self.dataset
        if ds.patch_size is None:
            rng = np.random.Generator(np.random.PCG64([ds.seed, self.epoch, 1]))
            return iter(rng.permutation(ds.n_volumes).tolist())
        start = self.epoch * ds.samples_per_epoch
        return iter(range(start, start + ds.samples_per_epoch))
