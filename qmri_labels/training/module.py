"""A thin LightningModule: backbone + label loss + optimiser, and the callbacks we train with."""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from qmri_labels.training.labels import LabelLoss

OPTIMISERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class LabelRegressor(L.LightningModule):
    """Train ``network`` (signals -> parameters) with a :class:`LabelLoss`.

    Parameters
    ----------
    network : nn.Module
    loss : LabelLoss
    lr : float
    weight_decay : float
    optimiser : {"adam", "adamw", "sgd"}
    step_batch_size : int or None
        Optimiser batch size. Lightning hands over blocks of several such batches at once
        (see :class:`~qmri_labels.training.InMemoryDataModule`'s ``batches_per_block``) and
        the module takes one optimiser step per ``step_batch_size`` rows, in order: the same
        updates as a plain loop over the batches, with Lightning's per-call overhead paid once
        per block instead of once per step. ``None``: one step per block.

    Losses are summed on the device during an epoch and logged once at its end (``train_loss``,
    ``val_loss`` and one entry per loss term), so that no step waits for a host sync; the
    per-epoch values are kept in :attr:`history`.
    """

    def __init__(self, network: nn.Module, loss: LabelLoss, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimiser: str = "adam", step_batch_size: int | None = None):
        super().__init__()
        # manual optimisation: several optimiser steps per Lightning call (see docstring)
        self.automatic_optimization = False
        if step_batch_size is not None and int(step_batch_size) < 1:
            raise ValueError(f"step_batch_size must be >= 1, got {step_batch_size}")
        self.step_batch_size = None if step_batch_size is None else int(step_batch_size)
        if optimiser not in OPTIMISERS:
            raise ValueError(f"optimiser must be one of {sorted(OPTIMISERS)}, got {optimiser!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be finite and > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.network = network
        self.loss = loss
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimiser = optimiser
        self.history: list[dict] = []
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._counts: dict[str, int] = {}

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.network(signals)

    def _accumulate(self, stage: str, total: torch.Tensor, terms: dict, n: int) -> None:
        sums = self._sums.setdefault(stage, {})
        for key, value in (("loss", total), *terms.items()):
            value = value.detach() * n
            sums[key] = value if key not in sums else sums[key] + value
        self._counts[stage] = self._counts.get(stage, 0) + n

    def _epoch_means(self, stage: str) -> dict[str, torch.Tensor]:
        sums, count = self._sums.pop(stage, {}), self._counts.pop(stage, 0)
        return {key: value / count for key, value in sums.items()} if count else {}

    def training_step(self, batch, batch_idx):
        optimiser = self.optimizers()
        n = batch["signals"].shape[0]
        size = self.step_batch_size or n
        total = None
        for start in range(0, n, size):
            step = {key: value[start : start + size] for key, value in batch.items()}
            optimiser.zero_grad(set_to_none=True)
            total, terms = self.loss(self.network(step["signals"]), step)
            self.manual_backward(total)
            optimiser.step()
            self._accumulate("train", total, terms, step["signals"].shape[0])
        return total

    def validation_step(self, batch, batch_idx):
        total, terms = self.loss(self.network(batch["signals"]), batch)
        self._accumulate("val", total, terms, batch["signals"].shape[0])

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self._epoch_means("val")
            return
        means = self._epoch_means("val")
        if means:
            self.log("val_loss", means["loss"], prog_bar=True, sync_dist=True)
            for key, value in means.items():
                if key != "loss":
                    self.log(f"val_{key}", value, sync_dist=True)
            self._last_val = {k: float(v) for k, v in means.items()}

    def on_train_epoch_end(self):
        means = self._epoch_means("train")
        record = {"epoch": int(self.current_epoch)}
        if means:
            self.log("train_loss", means["loss"], prog_bar=True, sync_dist=True)
            record.update({f"train_{k}" if k != "loss" else "train_loss": float(v) for k, v in means.items()})
        val = getattr(self, "_last_val", None)
        if val:
            record.update({f"val_{k}" if k != "loss" else "val_loss": v for k, v in val.items()})
            self._last_val = None
        self.history.append(record)

    def configure_optimizers(self):
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        return OPTIMISERS[self.optimiser](self.network.parameters(), **kwargs)


class KeepBestState(Callback):
    """Keep an in-memory copy of the network's weights at its best ``monitor`` value and
    restore it when training ends (a checkpoint without touching the disk)."""

    def __init__(self, monitor: str = "val_loss"):
        self.monitor = monitor
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        score = float(score)
        if score < self.best_score:
            self.best_score = score
            self.best_epoch = int(trainer.current_epoch)
            self.best_state = copy.deepcopy({k: v.detach().clone() for k, v in pl_module.network.state_dict().items()})

    def on_fit_end(self, trainer, pl_module):
        if self.best_state is not None:
            pl_module.network.load_state_dict(self.best_state)
