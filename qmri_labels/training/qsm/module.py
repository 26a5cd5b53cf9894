"""Thin LightningModule around a QSM network and its loss."""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
from torch import nn

from qmri_labels.analysis.image_metrics import nrmse as _nrmse
from qmri_labels.training.qsm.loss import QSMLoss

__all__ = ["QSMLitModule", "network_chi"]


def network_chi(network: nn.Module, inputs: torch.Tensor, residual_channel: int | None) -> torch.Tensor:
    """Normalised chi ``(B, X, Y, Z)``: the network output, plus the TKD input channel when residual."""
    out = network(inputs)[:, 0]
    if residual_channel is not None:
        out = out + inputs[:, residual_channel]
    return out


class QSMLitModule(L.LightningModule):
    """Thin LightningModule: ``network`` (normalised inputs -> chi / chi_scale) with a :class:`QSMLoss`."""

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
        acc = self._sums.setdefault(stage, [0.0, 0])
        acc[0] += float(total.detach()) * len(chi_pred)
        acc[1] += len(chi_pred)
        if stage == "val" and "chi" in batch:
            for c, t, m in zip(chi_pred.detach().cpu().numpy(), batch["chi"].cpu().numpy(), batch["mask"].cpu().numpy()):
                if m.any() and np.any(t[m.astype(bool)] != 0):
                    n = self._sums.setdefault("val_nrmse", [0.0, 0])
                    n[0] += _nrmse(c, t, m)
                    n[1] += 1
        return total

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
        for k, (s, n) in self._sums.items():
            if n:
                row[f"{k}_loss" if k in ("train", "val") else k] = s / n
        self._sums = {k: v for k, v in self._sums.items() if k == "train"}
        self._pending = row
        if "val_loss" in row:
            # KeepBestState (training/module.py) reads the monitored value from the logged metrics
            self.log("val_loss", float(row["val_loss"]), on_epoch=True, prog_bar=False, logger=False)

    def on_train_epoch_end(self):
        row = getattr(self, "_pending", None) or {"epoch": int(self.current_epoch)}
        s, n = self._sums.pop("train", [0.0, 0])
        if n:
            row["train_loss"] = s / n
            self.log("train_loss", float(row["train_loss"]), on_epoch=True, prog_bar=False, logger=False)
        row["time_s"] = time.perf_counter() - self._t0
        self.history.append(row)
        self._pending = None
        for listener in self.epoch_listeners:
            listener(self, row)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
