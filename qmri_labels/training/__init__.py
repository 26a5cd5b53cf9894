"""Training: label strategies and losses, Lightning module and data module, MLE labels."""

from qmri_labels.training.datamodule import InMemoryDataModule, TensorBatches
from qmri_labels.training.labels import (
    LABELS,
    TERMS,
    LabelLoss,
    ParameterNormalisation,
    method_name,
    parameter_mse,
    resolve_weights,
    self_supervised_mse,
)
from qmri_labels.training.mle_labels import MLELabels, compute_mle_labels
from qmri_labels.training.module import KeepBestState, LabelRegressor
from qmri_labels.training.schedules import LR_SCHEDULES, LRSchedule

__all__ = [
    "LABELS",
    "LR_SCHEDULES",
    "LRSchedule",
    "TERMS",
    "InMemoryDataModule",
    "KeepBestState",
    "LabelLoss",
    "LabelRegressor",
    "MLELabels",
    "ParameterNormalisation",
    "TensorBatches",
    "compute_mle_labels",
    "method_name",
    "parameter_mse",
    "resolve_weights",
    "self_supervised_mse",
]
