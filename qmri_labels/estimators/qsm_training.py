"""How a :class:`~qmri_labels.estimators.QSMEstimator` trains one U-Net: seeded patches of
prepared arrays, one Lightning run (over one or several processes), the best epoch kept.
"""

from __future__ import annotations

import math
import time
import warnings

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from qmri_labels.data.qsm import QSMPhantomSet
from qmri_labels.nets.unet3d import UNet3D
from qmri_labels.training.distributed import is_distributed
from qmri_labels.training.module import KeepBestState
from qmri_labels.training.qsm.data import EpochSampler, QSMPatchDataset, RankBatches, pad_to_multiple
from qmri_labels.training.qsm.loss import QSMLoss, QSMNormalisation
from qmri_labels.training.qsm.module import QSMLitModule


def train_member(estimator, seed: int, arrays: dict, val_arrays: dict | None, norm: QSMNormalisation, weights: dict,
                 data: QSMPhantomSet, b0, previous: UNet3D | None, previous_best: float) -> dict:
    """Train one U-Net of ``estimator`` with ``seed`` (weight initialisation and patch draws).

    Parameters
    ----------
    estimator : QSMEstimator
        Its settings; with ``checkpoint_path`` its best epoch so far is written through it.
    seed : int
    arrays, val_arrays : dict of ndarray
        Prepared training (and validation) arrays: inputs, mask, chi, field, COSMOS labels.
    norm : QSMNormalisation
    weights : dict
        The loss's term weights.
    data : QSMPhantomSet
        The training phantoms (voxel size, shapes).
    b0 : sequence of float
        The field direction.
    previous : UNet3D or None
        The network to continue from (``warm_start``).
    previous_best : float
        Its best score; only a better epoch replaces it.

    Returns
    -------
    dict with the network (CPU, eval mode), seed, history, best epoch, rank, world size and time.
    """
    torch.manual_seed(seed)
    network = UNet3D(estimator._unet_config())
    if previous is not None:
        if previous.config != network.config:
            raise ValueError("warm_start: the fitted network's architecture differs from the current settings")
        network.load_state_dict(previous.state_dict())
    elif estimator.residual_channel_ is not None:
        # start exactly at the TKD estimate: every step can only learn a correction
        nn.init.zeros_(network.head.weight)
        nn.init.zeros_(network.head.bias)
    loss = QSMLoss(weights, norm, data.voxel_size, b0)
    module = QSMLitModule(network, loss, lr=estimator.lr, weight_decay=estimator.weight_decay,
                          residual_channel=estimator.residual_channel_)

    patch = estimator.patch_size
    if patch is None:
        mult = network.size_multiple
        if any(s % mult for s in data.chi.shape[1:]):
            raise ValueError(f"whole-volume training needs shapes divisible by {mult}, got {data.chi.shape[1:]}")
    elif int(patch) % network.size_multiple:
        raise ValueError(f"patch_size must be a multiple of {network.size_multiple} for this U-Net, got {patch}")
    train_ds = QSMPatchDataset(arrays, patch, estimator.samples_per_epoch, seed=seed)
    train_sampler = EpochSampler(train_ds)
    samplers = [train_sampler]
    train_dl = DataLoader(train_ds, batch_sampler=RankBatches(train_sampler, int(estimator.batch_size)))
    val_dl = None
    if val_arrays is not None:
        val_padded = {}
        for k, v in val_arrays.items():
            val_padded[k], _ = pad_to_multiple(v, network.size_multiple)
        val_ds = QSMPatchDataset(val_padded, None, 1, seed=0)
        val_sampler = EpochSampler(val_ds, shuffle=False, pad=True)
        samplers.append(val_sampler)
        val_dl = DataLoader(val_ds, batch_size=1, sampler=val_sampler)

    keeper = KeepBestState("val_loss" if val_dl is not None else "train_loss")
    if previous is not None:
        # continuing: only a better score than the previous best replaces it
        keeper.best_score = previous_best
    if estimator.checkpoint_path is not None:  # a single network (_validate)
        saved = {"epoch": None}

        def checkpoint(module, row):
            # after each epoch: write the bundle (rank 0) when KeepBestState found a better epoch
            if module.trainer.global_rank == 0 and keeper.best_state is not None \
                    and keeper.best_epoch != saved["epoch"]:
                saved["epoch"] = keeper.best_epoch
                estimator.network_ = UNet3D(estimator._unet_config())
                estimator.network_.load_state_dict({k: v.detach().cpu() for k, v in keeper.best_state.items()})
                estimator.history_ = list(module.history)
                estimator.best_epoch_ = keeper.best_epoch
                estimator.save(estimator.checkpoint_path)

        module.epoch_listeners.append(checkpoint)
    accelerator = estimator._accelerator()
    max_time = None if estimator.max_time_s is None else {"seconds": float(estimator.max_time_s)}
    t0 = time.perf_counter()
    trainer = L.Trainer(
        accelerator=accelerator, devices=estimator.devices, num_nodes=int(estimator.num_nodes),
        strategy=estimator.strategy,
        # PyTorch's SyncBatchNorm runs on GPUs only; on CPU processes batch norm stays per rank
        sync_batchnorm=accelerator != "cpu" and network.config.batch_norm,
        # the samplers split each epoch's draw over the ranks themselves (Lightning's
        # DistributedSampler would wrap them and never advance their epoch)
        use_distributed_sampler=False,
        max_epochs=int(estimator.max_epochs), max_time=max_time, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=bool(estimator.progress), num_sanity_val_steps=0,
        callbacks=[_ShareSamplers(samplers, train_dl.batch_sampler), keeper],
    )
    with warnings.catch_warnings():
        # without a validation set the module's validation_step is simply unused
        warnings.filterwarnings("ignore", message=".*validation_step.*val_dataloader")
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
    # KeepBestState restored the best epoch's weights; a fresh UNet3D drops the SyncBatchNorm
    # layers Lightning may have swapped in
    network = UNet3D(estimator._unet_config())
    network.load_state_dict({k: v.detach().cpu() for k, v in module.network.state_dict().items()})
    network.eval()
    if keeper.best_state is None and previous is not None and math.isfinite(keeper.best_score):
        network.load_state_dict(previous.state_dict())  # no epoch beat the previous best
    _broadcast_buffers(network)
    return {"network": network, "seed": seed, "history": list(module.history), "best_epoch": keeper.best_epoch,
            "rank": int(trainer.global_rank), "world_size": int(trainer.world_size),
            "time_s": time.perf_counter() - t0}


class _ShareSamplers(L.Callback):
    """Give every :class:`EpochSampler` its rank's share once Lightning knows the ranks."""

    def __init__(self, samplers, batches: RankBatches):
        self.samplers = list(samplers)
        self.batches = batches

    def setup(self, trainer, pl_module, stage):
        for sampler in self.samplers:
            sampler.set_world(int(trainer.global_rank), int(trainer.world_size))
        self.batches.batch_size  # noqa: B018  (ValueError now if the global batch does not split)


def _broadcast_buffers(network: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank; nothing in one process.

    The parameters are already equal (synchronised gradients); only per-rank batch-norm
    statistics can differ, and DDP itself uses rank 0's at every forward.
    """
    if not is_distributed():
        return
    for buffer in network.buffers():
        dist.broadcast(buffer.data, src=0)
