"""The Lightning ``Trainer`` that voxel-wise networks train with, built in one place.

:func:`build_trainer` turns an estimator's device and stopping settings into a trainer with
the callbacks the library relies on (:class:`~qmri_labels.training.KeepBestState` and,
with ``patience``, early stopping). Devices, nodes and strategy go to Lightning unchanged:
``devices=4, strategy="ddp"`` trains on four processes, each one a rank of one
``torch.distributed`` group, with gradients averaged at every optimiser step by the module
(:class:`~qmri_labels.training.LabelRegressor`) and every choice (best epoch, early stop)
made on metrics reduced over ranks.
"""

from __future__ import annotations

from typing import Any

from qmri_labels.training.module import KeepBestState


def build_trainer(*, max_epochs: int, has_validation: bool, patience: int = 0, min_delta: float = 0.0,
                  accelerator: str = "auto", devices: Any = 1, num_nodes: int = 1, strategy: Any = "auto",
                  precision: Any = "32-true", deterministic: bool = True, benchmark: bool | None = None,
                  progress: bool = True, callbacks=()):
    """A ``lightning.Trainer`` for :class:`~qmri_labels.training.LabelRegressor`, and its best-state keeper.

    Parameters
    ----------
    max_epochs : int
    has_validation : bool
        Whether the data module has a validation split: the monitored value is ``val_loss``
        if so, else ``train_loss`` (and validation is switched off).
    patience : int
        Early stopping after ``patience`` epochs without improvement of the monitored value
        by more than ``min_delta``; 0: no early stopping.
    min_delta : float
    accelerator, devices, num_nodes, strategy, precision, deterministic, benchmark
        Lightning's ``Trainer`` arguments (``strategy="ddp"`` for several processes).
    progress : bool
        Lightning's progress bar.
    callbacks : sequence of lightning callbacks
        Further callbacks (e.g. a learning-rate schedule), run after the best-state keeper.

    Returns
    -------
    trainer : lightning.Trainer
    keeper : KeepBestState
        Holds the best epoch, its score and weights after ``trainer.fit``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    monitor = "val_loss" if has_validation else "train_loss"
    keeper = KeepBestState(monitor)
    callbacks = [keeper, *callbacks]
    if int(patience) > 0:
        callbacks.append(EarlyStopping(monitor=monitor, patience=int(patience), min_delta=float(min_delta),
                                       mode="min", check_on_train_epoch_end=not has_validation))
    extra = {} if has_validation else {"limit_val_batches": 0}
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
        deterministic=deterministic, benchmark=benchmark, max_epochs=int(max_epochs), callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=bool(progress),
        num_sanity_val_steps=0, **extra,
    )
    return trainer, keeper
