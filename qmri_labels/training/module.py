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

    record_step_losses : bool
        Keep the loss of every optimiser step in :attr:`step_losses` (0-d tensors on the
        device, no host sync), for reproducibility studies.

    Losses are summed on the device during an epoch and logged once at its end (``train_loss``,
    ``val_loss`` and one entry per loss term), so that no step waits for a host sync; the
    per-epoch values are kept in :attr:`history`.
    """

    def __init__(self, network: nn.Module, loss: LabelLoss, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimiser: str = "adam", step_batch_size: int | None = None, record_step_losses: bool = False):
        super().__init__()
        self.step_losses: list[torch.Tensor] | None = [] if record_step_losses else None
        self.flags_in_fit: dict | None = None
        self._plain_steps: bool | None = None
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
        self._sums: dict[str, list] = {}

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.network(signals)

    def _accumulate(self, stage: str, total: torch.Tensor, terms: dict, n: int) -> None:
        # only references are kept per step (no tensor ops, no host sync); epoch means are
        # computed once at the end of the epoch
        self._sums.setdefault(stage, []).append((n, total.detach(), {k: v.detach() for k, v in terms.items()}
                                                 if len(terms) > 1 else None))

    def _epoch_means(self, stage: str) -> dict[str, torch.Tensor]:
        records = self._sums.pop(stage, [])
        if not records:
            return {}
        weights = torch.tensor([r[0] for r in records], dtype=torch.float32, device=records[0][1].device)
        count = weights.sum()
        means = {"loss": (torch.stack([r[1] for r in records]).float() * weights).sum() / count}
        if records[0][2] is not None:
            for key in records[0][2]:
                means[key] = (torch.stack([r[2][key] for r in records]).float() * weights).sum() / count
        else:
            (term,) = self.loss.active
            means[term] = means["loss"]
        return means

    def on_train_start(self):
        # the global flags as Lightning set them for this fit, for manifests and reproducibility
        self.flags_in_fit = {
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "num_threads": torch.get_num_threads(),
        }

    def _plain_steps_allowed(self) -> bool:
        """Whether backward and optimiser steps may bypass Lightning's wrappers.

        With one device or DDP and a precision that needs no gradient scaling, Lightning's
        ``manual_backward`` and ``LightningOptimizer.step`` reduce to ``loss.backward()`` and
        ``optimizer.step()``; calling those directly saves their per-step cost, which is a
        large share of a step for small voxel-wise MLPs. Other set-ups keep the wrappers.
        """
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        plugin = self.trainer.precision_plugin
        plain_precision = type(plugin) is Precision or (isinstance(plugin, MixedPrecision) and plugin.scaler is None)
        return plain_precision and isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))

    def training_step(self, batch, batch_idx):
        if self._plain_steps is None:
            self._plain_steps = self._plain_steps_allowed()
        optimiser = self.optimizers()
        if self._plain_steps:
            optimiser = optimiser.optimizer
        n = batch["signals"].shape[0]
        size = self.step_batch_size or n
        total = None
        for start in range(0, n, size):
            step = {key: value[start : start + size] for key, value in batch.items()}
            optimiser.zero_grad(set_to_none=True)
            total, terms = self.loss(self.network(step["signals"]), step)
            if self._plain_steps:
                total.backward()
            else:
                self.manual_backward(total)
            optimiser.step()
            if self.step_losses is not None:
                self.step_losses.append(total.detach().clone())
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
    restore it when training ends (a checkpoint without touching the disk).

    ``monitor="val_loss"`` is checked after each validation. ``"train_loss"`` (training
    without a validation split) is logged by the module's own epoch-end hook, which runs after
    the callbacks' one, so it is checked when the next epoch starts and when training ends:
    the weights are still those of the epoch that produced the loss.
    """

    def __init__(self, monitor: str = "val_loss"):
        self.monitor = monitor
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and self.monitor != "train_loss":
            self._check(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        if self.monitor == "train_loss" and trainer.current_epoch > 0:
            self._check(trainer, pl_module, epoch=trainer.current_epoch - 1)

    def on_train_end(self, trainer, pl_module):
        if self.monitor == "train_loss":
            self._check(trainer, pl_module, epoch=len(getattr(pl_module, "history", [])) - 1)

    def _check(self, trainer, pl_module, epoch: int | None = None):
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        score = float(score)
        if score < self.best_score:
            self.best_score = score
            self.best_epoch = int(trainer.current_epoch if epoch is None else epoch)
            self.best_state = copy.deepcopy({k: v.detach().clone() for k, v in pl_module.network.state_dict().items()})

    def on_fit_end(self, trainer, pl_module):
        if self.best_state is not None:
            pl_module.network.load_state_dict(self.best_state)
