"""Learning-rate schedules as Lightning callbacks.

A schedule acts on the optimiser that :class:`~qmri_labels.training.LabelRegressor`
configures, from outside the module, so that the module stays a thin wrapper and a network
trained without a schedule takes exactly the steps it took before schedules existed.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback

#: ``None``: constant; ``"plateau"``: halve the rate after ``plateau_patience`` epochs without a
#: better monitored loss; ``"cosine"``: cosine decay to 1 % of the rate over ``max_epochs``.
LR_SCHEDULES = (None, "plateau", "cosine")


def check_schedule(name) -> None:
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")


class LRSchedule(Callback):
    """Step a learning-rate schedule once per epoch.

    Parameters
    ----------
    name : {"plateau", "cosine"}
    max_epochs : int
        Length of the cosine decay.
    monitor : str
        Logged loss that ``plateau`` watches (``val_loss`` or ``train_loss``).
    plateau_patience : int
        Epochs without improvement before ``plateau`` halves the rate.
    """

    def __init__(self, name: str, max_epochs: int, monitor: str = "val_loss", plateau_patience: int = 3):
        check_schedule(name)
        if name is None:
            raise ValueError("LRSchedule needs a schedule name; train without the callback for a constant rate")
        self.name = name
        self.max_epochs = int(max_epochs)
        self.monitor = monitor
        self.plateau_patience = max(int(plateau_patience), 1)
        self.scheduler = None

    def on_train_start(self, trainer, pl_module):
        optimiser = trainer.optimizers[0]
        if self.name == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, mode="min", factor=0.5,
                                                                        patience=self.plateau_patience)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimiser, T_max=max(self.max_epochs, 1), eta_min=0.01 * optimiser.param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        if self.scheduler is None:
            return
        if self.name == "cosine":
            self.scheduler.step()
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and math.isfinite(float(score)):
            self.scheduler.step(float(score))
