"""Thin LightningModule around a QSM network and its loss."""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
from torch import nn

from qmri_labels.analysis.image_metrics import nrmse as _nrmse
from qmri_labels.training.distributed import all_reduce_sum, is_distributed
from qmri_labels.training.qsm.loss import QSMLoss

__all__ = ["QSMLitModule", "network_chi"]


def network_chi(network: nn.Module, inputs: torch.Tensor, residual_channel: int | None) -> torch.Tensor:
    """Normalised chi ``(B, X, Y, Z)``: the network output, plus the TKD input channel when residual."""
    out = network(inputs)[:, 0]
    if residual_channel is not None:
        out = out + inputs[:, residual_channel]
    return out


class QSMLitModule(L.LightningModule):
    """Thin LightningModule: ``network`` (normalised inputs -> chi / chi_scale) with a :class:`QSMLoss`.

    Automatic optimisation (one forward and backward per step), so under Lightning's DDP the
    gradients are all-reduced at every step; the training loss of rank ``r`` is weighted by its
    share of the step's masked voxels so that the averaged gradient is that of one process with
    the whole step's batch. Epoch losses and NRMSE are sums and counts all-reduced over ranks:
    ``history`` and the logged ``val_loss``/``train_loss`` are the same on every rank.
    """

    def __init__(self, network: nn.Module, loss: QSMLoss, lr: float = 1e-3, weight_decay: float = 0.01,
                 residual_channel: int | None = None):
        super().__init__()
        self.network = network
        self.residual_channel = residual_channel
        self.loss = loss
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.history: list[dict] = []
        #: callables ``f(module, row)`` run after each epoch's row is complete
        self.epoch_listeners: list = []
        self._sums: dict[str, list] = {}
        self._pending = None
        self._t0 = time.perf_counter()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return network_chi(self.network, inputs, self.residual_channel) * self.loss.normalisation.chi_scale

    def _step(self, batch, stage):
        chi_pred = self(batch["inputs"])
        total, terms = self.loss(chi_pred, batch)
        weight = batch["weight"].to(chi_pred.dtype) if "weight" in batch else torch.ones(len(chi_pred))
        acc = self._sums.setdefault(stage, [0.0, 0.0])
        if stage == "train":
            share, rows = self._step_share(batch["mask"], len(chi_pred))
            acc[0] += float(total.detach()) * share * rows
            acc[1] += len(chi_pred)
            # DDP averages the ranks' gradients with equal weights: scaling by W * share makes the
            # average the gradient of the loss over the whole step's masked voxels (one process's loss)
            return total * (share * self.trainer.world_size) if share != 1.0 else total
        # validation: one volume per batch; weight 0 marks the padding of a rank's share
        w = float(weight.sum())
        acc[0] += float(total.detach()) * w
        acc[1] += w
        if "chi" in batch:
            for c, t, m, wi in zip(chi_pred.detach().cpu().numpy(), batch["chi"].cpu().numpy(),
                                   batch["mask"].cpu().numpy(), weight.cpu().numpy()):
                if wi > 0 and m.any() and np.any(t[m.astype(bool)] != 0):
                    n = self._sums.setdefault("val_nrmse", [0.0, 0.0])
                    n[0] += _nrmse(c, t, m)
                    n[1] += 1
        return total

    def _step_share(self, mask: torch.Tensor, rows: int) -> tuple[float, float]:
        """This rank's share of the step's masked voxels and the step's rows over all ranks.

        The loss is a mean over the masked voxels of the batch, so a step over several ranks is
        one process's step when rank ``r``'s loss counts with ``n_r / sum(n)``. One process: (1, rows).
        """
        if not is_distributed():
            return 1.0, float(rows)
        counts = all_reduce_sum(torch.tensor([float(mask.sum()), float(rows)], dtype=torch.float64,
                                             device=mask.device))
        return float(mask.sum()) / max(float(counts[0]), 1.0), float(counts[1])

    def _epoch_means(self, keys) -> dict:
        """Means of the accumulated ``keys`` over all ranks (sums and counts all-reduced)."""
        packed = torch.tensor([v for k in keys for v in self._sums.get(k, [0.0, 0.0])], dtype=torch.float64,
                              device=self.device)
        packed = all_reduce_sum(packed).cpu().tolist()
        return {k: packed[2 * i] / packed[2 * i + 1] for i, k in enumerate(keys) if packed[2 * i + 1] > 0}

    def on_fit_start(self):
        self._t0 = time.perf_counter()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self._sums.clear()
            return
        row = {"epoch": int(self.current_epoch)}
        # every rank reduces (a collective), so the row and the monitored value are the same everywhere
        for k, v in self._epoch_means(("val", "val_nrmse")).items():
            row["val_loss" if k == "val" else k] = v
        self._sums = {k: v for k, v in self._sums.items() if k == "train"}
        self._pending = row
        if "val_loss" in row:
            # KeepBestState (training/module.py) reads the monitored value from the logged metrics
            self.log("val_loss", float(row["val_loss"]), on_epoch=True, prog_bar=False, logger=False)

    def on_train_epoch_end(self):
        row = getattr(self, "_pending", None) or {"epoch": int(self.current_epoch)}
        means = self._epoch_means(("train",))
        self._sums.pop("train", None)
        if "train" in means:
            row["train_loss"] = means["train"]
            self.log("train_loss", float(row["train_loss"]), on_epoch=True, prog_bar=False, logger=False)
        row["time_s"] = time.perf_counter() - self._t0
        self.history.append(row)
        self._pending = None
        for listener in self.epoch_listeners:
            listener(self, row)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
