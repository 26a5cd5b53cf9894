"""A LightningDataModule over in-memory tensors, batched by slicing whole tensors.

Small voxel-wise networks train in microseconds per batch; a ``DataLoader`` that fetches and
collates sample by sample costs several times the training step itself. Here every batch is
one fancy-index of each tensor with a block of a shuffled permutation, done on the device
where the tensors live. Shuffling uses its own seeded generator (the epoch number is mixed
into the seed), so batch order is reproducible and independent of the global RNG.

Distributed training (``W`` ranks): every rank draws the same permutation and takes every
``W``-th row of it (rank ``r``: positions ``r, r + W, ...``); ``batch_size`` is the batch of
one optimiser step over all ranks, each rank taking ``batch_size / W`` rows of it. Step ``k``
then sees, over all ranks together, exactly the rows ``k * batch_size ... (k + 1) * batch_size - 1``
of the permutation: the rows that one process with the same ``batch_size`` and seed sees in
its step ``k``. No row is dropped or repeated; when the rows do not split evenly, the last
step of a rank may hold one row fewer (or none), and the module weights each rank's gradient
by its rows.
"""

from __future__ import annotations

from typing import Mapping

import lightning as L
import numpy as np
import torch

from qmri_labels.training.distributed import world_of


class TensorBatches:
    """Iterable of batches ``{key: tensor[idx]}`` for blocks of (shuffled) indices.

    Parameters
    ----------
    tensors : mapping of str to Tensor
        Tensors with the same first dimension.
    indices : LongTensor
        Rows that belong to this split.
    batch_size : int
    shuffle : bool
    seed : int
        Seed of the shuffling; epoch ``e`` uses a permutation drawn from ``seed`` and ``e``.
    drop_last : bool
        Leave out the last block when it is incomplete (on rank 0, whose share is the largest).
    rank, world_size : int
        This process's share under distributed training (see the module docstring): every
        ``world_size``-th row of each epoch's permutation, from ``rank`` on. Every rank yields
        the same number of blocks (a rank whose share ends early yields a shorter or empty
        last block), so that collectives per block stay matched.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], indices: torch.Tensor, batch_size: int,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.tensors = dict(tensors)
        self.indices = indices
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank}, world_size {world_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.epoch = 0

    def _epoch_indices(self) -> torch.Tensor:
        idx = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = idx[torch.randperm(idx.numel(), generator=generator)]
        if self.world_size > 1:
            idx = idx[self.rank :: self.world_size]
        return idx

    def _n_blocks(self) -> int:
        # the same count on every rank: from rank 0's share, the largest
        n = -(-self.indices.numel() // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self._n_blocks()

    def __iter__(self):
        idx = self._epoch_indices()
        self.epoch += 1
        device = next(iter(self.tensors.values())).device
        idx = idx.to(device)
        for block_index in range(self._n_blocks()):
            block = idx[block_index * self.batch_size : (block_index + 1) * self.batch_size]
            yield {key: value.index_select(0, block) for key, value in self.tensors.items()}


class InMemoryDataModule(L.LightningDataModule):
    """Train/validation batches of in-memory tensors.

    Parameters
    ----------
    tensors : mapping of str to ndarray or Tensor
        Arrays with the same first dimension (e.g. ``signals``, ``theta``, ``mle``);
        converted to float32 tensors.
    batch_size : int
        Rows of one optimiser step; under distributed training, over all ranks together
        (each rank takes ``batch_size / world_size``, which must be a whole number).
    val_fraction : float in [0, 1)
        Share of rows held out for validation (early stopping). The split is drawn with
        ``split_seed``.
    split_seed, shuffle_seed : int
    val_batch_size : int or None
        Defaults to a large batch (validation needs no gradients).
    batches_per_block : int
        Training batches handed to Lightning per call, concatenated in order (the module
        splits them again into optimiser steps): amortises Lightning's per-step overhead,
        which otherwise dominates for small voxel-wise networks. 1: one batch per call.
    """

    def __init__(self, tensors: Mapping, batch_size: int = 256, val_fraction: float = 0.1, split_seed: int = 0,
                 shuffle_seed: int = 0, val_batch_size: int | None = None,
                 batches_per_block: int = 1):
        super().__init__()
        if not tensors:
            raise ValueError("tensors must not be empty")
        converted = {}
        for key, value in tensors.items():
            value = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            converted[key] = value.to(torch.float32) if value.is_floating_point() else value
        lengths = {k: v.shape[0] for k, v in converted.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors must have the same first dimension, got {lengths}")
        self.n = next(iter(lengths.values()))
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (0.0 <= float(val_fraction) < 1.0):
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.n_val = int(round(self.n * float(val_fraction)))
        if float(val_fraction) > 0 and self.n_val == 0:
            self.n_val = 1
        if self.n - self.n_val < 1:
            raise ValueError(f"no training rows left: n = {self.n}, val_fraction = {val_fraction}")
        self.tensors = converted
        if int(batches_per_block) < 1:
            raise ValueError(f"batches_per_block must be >= 1, got {batches_per_block}")
        self.batch_size = int(batch_size)
        self.batches_per_block = int(batches_per_block)
        self.val_batch_size = int(val_batch_size) if val_batch_size else max(8192, self.batch_size)
        self.split_seed = int(split_seed)
        self.shuffle_seed = int(shuffle_seed)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.split_seed))
        self.val_indices = order[: self.n_val].sort().values
        self.train_indices = order[self.n_val :].sort().values
        self._train_batches: TensorBatches | None = None

    def _device_tensors(self) -> dict:
        # slicing happens where the model lives: tensors move to the device once, not per batch
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if next(iter(self.tensors.values())).device != device:
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
            self._train_batches = None
        return self.tensors

    def _rank(self) -> tuple[int, int]:
        return world_of(getattr(self, "trainer", None))

    def train_dataloader(self) -> TensorBatches:
        tensors = self._device_tensors()
        rank, world = self._rank()
        if self._train_batches is None:
            if self.batch_size % world:
                raise ValueError(f"batch_size {self.batch_size} (one optimiser step over all processes) must be "
                                 f"divisible by the number of processes {world}")
            # a block of k batches is one slice of k * batch_size rows: the same rows, in the
            # same order, as k consecutive batches
            self._train_batches = TensorBatches(tensors, self.train_indices,
                                                self.batch_size // world * self.batches_per_block,
                                                shuffle=True, seed=self.shuffle_seed, rank=rank, world_size=world)
        return self._train_batches

    def val_dataloader(self) -> TensorBatches:
        rank, world = self._rank()
        return TensorBatches(self._device_tensors(), self.val_indices, self.val_batch_size, shuffle=False,
                             rank=rank, world_size=world)

    @property
    def has_validation(self) -> bool:
        return self.n_val > 0
