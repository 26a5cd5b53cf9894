"""A :class:`~qmri_labels.estimators.NetworkEstimator` trained under one choice of every
source of irreproducibility (:class:`~qmri_labels.training.reproducibility.DeterminismSettings`),
with the loss of every training step and the record of what was in force: the unit of the
reproducibility, mismatch and hyperparameter studies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from qmri_labels.estimators.network import NetworkEstimator
from qmri_labels.training.reproducibility import DeterminismSettings, determinism_scope, record_determinism


@dataclass
class TrainingRun:
    """A network trained under one :class:`DeterminismSettings`."""

    estimator: NetworkEstimator
    settings: DeterminismSettings
    step_losses: np.ndarray
    record: dict

    @property
    def network(self) -> nn.Module:
        return self.estimator.network_


def train_network(dataset, settings: DeterminismSettings, *, quiet: bool = True, **estimator_params) -> TrainingRun:
    """Train a :class:`~qmri_labels.estimators.NetworkEstimator` on ``dataset`` under ``settings``.

    Parameters
    ----------
    dataset : Dataset
    settings : DeterminismSettings
    quiet : bool
        Hide Lightning's progress bar.
    **estimator_params
        Hyperparameters of the estimator (``label``, ``batch_size``, ``max_epochs``,
        ``patience``, ...); the seeds, precision, determinism and device come from ``settings``.

    Returns
    -------
    TrainingRun with the fitted estimator, the loss of every training step and the
    determinism record.
    """
    clash = set(estimator_params) & set(settings.estimator_kwargs())
    if clash:
        raise ValueError(f"{sorted(clash)} are set by the DeterminismSettings, not by estimator parameters")
    params = {"progress": not quiet, **estimator_params, **settings.estimator_kwargs()}
    with determinism_scope(settings):
        record = record_determinism(settings)
        estimator = NetworkEstimator(**params).fit(dataset)
    record["flags_in_fit"] = estimator.flags_in_fit_
    return TrainingRun(estimator, settings, estimator.step_losses_, record)
