"""A thin LightningModule: backbone + label loss + optimiser, and the callbacks we train with."""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qmri_labels.training.distributed import average_gradients, broadcast_float, max_over_ranks, reduce_weighted_means
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

    Distributed data parallel (``strategy="ddp"``, ``W`` processes): ``step_batch_size`` is
    the batch of one optimiser step over all processes; each process takes ``1/W`` of it
    (see :class:`~qmri_labels.training.TensorBatches`), and before every optimiser step the
    module all-reduces the gradients itself (:func:`~qmri_labels.training.distributed.average_gradients`,
    weighted by the rows of each process), because several optimiser steps run inside one
    Lightning call, which DDP's own once-per-forward synchronisation cannot follow; DDP's
    reducer is switched off for this module. The logged losses are means over the rows of
    all processes, so every process sees the same numbers, takes the same steps and keeps the
    same weights. One process runs the plain loop unchanged.
    """

    def __init__(self, network: nn.Module, loss: LabelLoss, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimiser: str = "adam", step_batch_size: int | None = None, record_step_losses: bool = False):
        super().__init__()
        self.step_losses: list[torch.Tensor] | None = [] if record_step_losses else None
        self.flags_in_fit: dict | None = None
        self._plain_steps: bool | None = None
        self._world_size = 1
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

    def _predict(self, batch) -> torch.Tensor:
        """The network's estimates for a batch: of its signals ``(B, P)``, or, when the batch
        holds noise draws of each signal (``bias_reduced``), of every draw ``(B, K, P)``."""
        draws = batch.get("draws")
        if draws is None:
            return self.network(batch["signals"])
        b, k, m = draws.shape
        out = self.network(draws.reshape(b * k, m))
        if isinstance(out, tuple):  # (mean, log-variance) of a network with a variance head
            return tuple(o.reshape(b, k, -1) for o in out)
        return out.reshape(b, k, -1)

    def _accumulate(self, stage: str, total: torch.Tensor, terms: dict, n: int) -> None:
        # only references are kept per step (no tensor ops, no host sync); epoch means are
        # computed once at the end of the epoch
        self._sums.setdefault(stage, []).append((n, total.detach(), {k: v.detach() for k, v in terms.items()}
                                                 if len(terms) > 1 else None))

    def _term_names(self) -> tuple[str, ...]:
        return self.loss.active if len(self.loss.active) > 1 else ()

    def _epoch_means(self, stage: str, reduce: bool = False) -> dict[str, torch.Tensor]:
        """Row-weighted means of an epoch's recorded losses; ``reduce``: over all ranks (every
        rank must call it, also one that saw no rows)."""
        records = self._sums.pop(stage, [])
        names = ("loss",) + self._term_names()
        if records:
            first = records[0][0]
            if isinstance(first, torch.Tensor):
                weights = torch.stack([r[0] for r in records]).float()
            else:
                weights = torch.tensor([r[0] for r in records], dtype=torch.float32, device=records[0][1].device)
            columns = [torch.stack([r[1] for r in records]).float()]
            columns += [torch.stack([r[2][key] for r in records]).float() for key in names[1:]]
            sums = torch.stack([(c * weights).sum() for c in columns])
            count = weights.sum()
        elif reduce:
            sums, count = torch.zeros(len(names), device=self.device), torch.zeros((), device=self.device)
        else:
            return {}
        if reduce:
            means = reduce_weighted_means(sums, count)
        else:
            means = sums / count
        out = dict(zip(names, means))
        if len(names) == 1:
            (term,) = self.loss.active
            out[term] = out["loss"]
        return out

    def on_train_start(self):
        # the global flags as Lightning set them for this fit, for manifests and reproducibility
        self.flags_in_fit = {
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "num_threads": torch.get_num_threads(),
        }
        self._world_size = int(self.trainer.world_size)
        if self._world_size > 1:
            strategy = self.trainer.strategy
            if not isinstance(strategy, DDPStrategy):
                raise ValueError(f"{type(self).__name__} trains on several processes only with strategy='ddp' "
                                 f"(or ddp_spawn / ddp_notebook), got {type(strategy).__name__}")
            if self.step_batch_size is not None and self.step_batch_size % self._world_size:
                raise ValueError(f"batch size {self.step_batch_size} (one optimiser step over all processes) "
                                 f"must be divisible by the number of processes {self._world_size}")
            if isinstance(strategy.model, DistributedDataParallel):
                # the module all-reduces gradients itself, once per optimiser step (see the class
                # docstring); DDP's reducer would sync at most once per Lightning call
                strategy.model.require_backward_grad_sync = False

    def _plain_steps_allowed(self) -> bool:
        """Whether backward and optimiser steps may bypass Lightning's wrappers.

        With one device or DDP and a precision that needs no gradient scaling, Lightning's
        ``manual_backward`` and ``LightningOptimizer.step`` reduce to ``loss.backward()`` and
        ``optimizer.step()``; calling those directly saves their per-step cost, which is a
        large share of a step for small voxel-wise MLPs. Other set-ups keep the wrappers.
        """
        plugin = self.trainer.precision_plugin
        plain_precision = type(plugin) is Precision or (isinstance(plugin, MixedPrecision) and plugin.scaler is None)
        return plain_precision and isinstance(self.trainer.strategy, (SingleDeviceStrategy, DDPStrategy))

    def training_step(self, batch, batch_idx):
        """One block of optimiser steps, ``step_batch_size`` rows each, in order (see the class
        docstring); under DDP each step's gradient is averaged over all ranks.

        Under DDP every rank must take the same number of steps (each is a collective), also
        when its share of the epoch ends one row earlier: the count comes from the largest
        block, and a rank without rows for a step contributes zeros.
        """
        if self._plain_steps is None:
            self._plain_steps = self._plain_steps_allowed()
        optimiser = self.optimizers()
        if self._plain_steps:
            optimiser = optimiser.optimizer
        several_ranks = self._world_size > 1
        n = batch["signals"].shape[0]
        if self.step_batch_size is None:
            size, n_steps = max(n, 1), int(bool(n) or several_ranks)
        elif several_ranks:
            size = self.step_batch_size // self._world_size
            n_steps = -(-max_over_ranks(n, self.device) // size)
        else:
            size = self.step_batch_size
            n_steps = -(-n // size)
        names = self._term_names()
        parameters = [p for p in self.network.parameters() if p.requires_grad] if several_ranks else []
        zero = torch.zeros((), device=self.device) if several_ranks else None
        total = zero
        for index in range(n_steps):
            step = {key: value[index * size : (index + 1) * size] for key, value in batch.items()}
            rows = step["signals"].shape[0]
            optimiser.zero_grad(set_to_none=True)
            if rows:
                total, terms = self.loss(self._predict(step), step)
                if self._plain_steps:
                    total.backward()
                else:
                    self.manual_backward(total)
            else:  # a rank whose share of the epoch ended early
                total, terms = zero, dict.fromkeys(names, zero)
            if several_ranks:
                means, rows = average_gradients(parameters, rows, [total] + [terms[key] for key in names])
                total, terms = means[0], dict(zip(names, means[1:]))
            optimiser.step()
            if self.step_losses is not None:
                self.step_losses.append(total.detach().clone())
            self._accumulate("train", total, terms, rows)
        return total

    def validation_step(self, batch, batch_idx):
        if batch["signals"].shape[0] == 0:  # a rank's share of the validation rows may end early
            return
        total, terms = self.loss(self._predict(batch), batch)
        self._accumulate("val", total, terms, batch["signals"].shape[0])

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self._sums.pop("val", None)
            return
        # one mean over the validation rows of all ranks (the same number on every rank)
        means = self._epoch_means("val", reduce=self._world_size > 1)
        if means:
            self.log("val_loss", means["loss"], prog_bar=True)
            for key, value in means.items():
                if key != "loss":
                    self.log(f"val_{key}", value)
            self._last_val = {k: float(v) for k, v in means.items()}

    def on_train_epoch_end(self):
        # under DDP the recorded step losses are already means over all ranks
        means = self._epoch_means("train")
        record = {"epoch": int(self.current_epoch)}
        if means:
            self.log("train_loss", means["loss"], prog_bar=True)
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

    Under distributed training the monitored value is averaged over the ranks and rank 0's
    result is the one every rank compares, so all ranks keep the same epoch (and, with
    synchronised gradients, the same weights), whether or not the module already logged a
    value reduced over ranks.
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
        if trainer.world_size > 1:
            value = torch.as_tensor(score, dtype=torch.float64).detach().to(pl_module.device)
            score = trainer.strategy.reduce(value, reduce_op="mean")
            score = broadcast_float(float(score), pl_module.device)
        score = float(score)
        if score < self.best_score:
            self.best_score = score
            self.best_epoch = int(trainer.current_epoch if epoch is None else epoch)
            self.best_state = copy.deepcopy({k: v.detach().clone() for k, v in pl_module.network.state_dict().items()})

    def on_fit_end(self, trainer, pl_module):
        if self.best_state is not None:
            pl_module.network.load_state_dict(self.best_state)
