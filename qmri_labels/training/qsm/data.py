"""Reproducible random patches (or whole volumes) of QSM phantom arrays, and padding."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

__all__ = ["QSMPatchDataset", "EpochSampler", "RankBatches", "pad_to_multiple"]


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
    ``j``. Every item carries ``weight`` 1 (0 for the padding item ``-1``, see
    :class:`EpochSampler`).

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
        if int(j) < 0:
            # padding of a rank's share (EpochSampler(pad=True)): any item, weight 0
            return {**self[0], "weight": torch.zeros(())}
        vol, (x, y, z) = self.locate(j)
        p = self.patch_size
        out = {}
        for k, a in self.arrays.items():
            v = a[vol]
            if p is not None:
                v = v[..., x : x + p, y : y + p, z : z + p]
            out[k] = v
        out["weight"] = torch.ones(())
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Items of epoch ``e`` of a :class:`QSMPatchDataset`, or one rank's share of them.

    Patches: ``e * S ... (e + 1) * S - 1``; whole volumes: a permutation seeded by (seed, e)
    (``shuffle=False``: volumes in order, for validation). Lightning calls :meth:`set_epoch`.

    Under distributed training (:meth:`set_world`) rank ``r`` of ``W`` takes items ``r::W``
    of the epoch's draw, so that with a per-rank batch of ``B / W`` step ``k`` of all ranks
    together covers exactly the items of step ``k`` of one process with batch ``B``. With
    ``pad`` the share is padded to ``ceil(n / W)`` items with index ``-1`` (every rank then
    runs the same number of batches; :class:`QSMPatchDataset` returns weight 0 for it),
    without ``pad`` the items must split evenly.
    """

    def __init__(self, dataset: QSMPatchDataset, shuffle: bool = True, pad: bool = False):
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.pad = bool(pad)
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_world(self, rank: int, world_size: int) -> None:
        """Take rank ``rank``'s share of ``world_size`` (ValueError if the items do not split evenly)."""
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
        n = len(self.dataset)
        if not self.pad and n % world_size:
            raise ValueError(f"the {n} items of an epoch (samples_per_epoch, or volumes for whole-volume "
                             f"training) must be divisible by the number of processes {world_size}")
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.world_size)

    def _epoch_items(self) -> list[int]:
        ds = self.dataset
        if ds.patch_size is None:
            if not self.shuffle:
                return list(range(ds.n_volumes))
            rng = np.random.Generator(np.random.PCG64([ds.seed, self.epoch, 1]))
            return rng.permutation(ds.n_volumes).tolist()
        start = self.epoch * ds.samples_per_epoch
        return list(range(start, start + ds.samples_per_epoch))

    def __iter__(self):
        share = self._epoch_items()[self.rank :: self.world_size]
        return iter(share + [-1] * (len(self) - len(share)))


class RankBatches(torch.utils.data.Sampler):
    """Batches of one rank's share: ``global_batch / W`` items of an :class:`EpochSampler` each.

    A DataLoader's ``batch_sampler``; the per-rank batch follows the sampler's world (set when
    Lightning knows the ranks), and Lightning's ``set_epoch`` reaches the sampler through it.
    """

    def __init__(self, sampler: EpochSampler, global_batch: int):
        self.sampler = sampler
        self.global_batch = int(global_batch)

    @property
    def batch_size(self) -> int:
        world = self.sampler.world_size
        if self.global_batch % world:
            raise ValueError(f"batch_size {self.global_batch} (the global batch of one step) must be divisible "
                             f"by the number of processes {world}")
        return self.global_batch // world

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        items, size = list(self.sampler), self.batch_size
        return iter([items[i : i + size] for i in range(0, len(items), size)])
