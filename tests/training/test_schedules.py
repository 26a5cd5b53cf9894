from types import SimpleNamespace

import pytest
import torch

from qmri_labels.training import LRSchedule


def fake_trainer(lr=1e-3):
    optimiser = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return SimpleNamespace(optimizers=[optimiser], callback_metrics={}), optimiser


def test_cosine_decays_to_one_percent_over_max_epochs():
    trainer, opt = fake_trainer()
    cb = LRSchedule("cosine", max_epochs=10)
    cb.on_train_start(trainer, None)
    rates = []
    for _ in range(10):
        opt.step()  # an epoch's optimiser steps come before the schedule's
        cb.on_train_epoch_end(trainer, None)
        rates.append(opt.param_groups[0]["lr"])
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(1e-5)


def test_plateau_halves_after_patience_epochs_without_improvement():
    trainer, opt = fake_trainer()
    cb = LRSchedule("plateau", max_epochs=50, monitor="val_loss", plateau_patience=2)
    cb.on_train_start(trainer, None)
    for loss in (1.0, 0.9, 0.9, 0.9, 0.9):
        trainer.callback_metrics["val_loss"] = torch.tensor(loss)
        cb.on_train_epoch_end(trainer, None)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lr_schedule"):
        LRSchedule("step", max_epochs=3)
