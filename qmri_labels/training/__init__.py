"""Training: label strategies and losses, Lightning module and data module, MLE labels."""

from qmri_labels.training.datamodule import InMemoryDataModule, TensorBatches
from qmri_labels.training.labels import (
    BIAS_REDUCED_DEFAULTS,
    LABELS,
    STUDY_LABELS,
    TERMS,
    LabelLoss,
    ParameterNormalisation,
    bias_and_variance,
    bias_reduced_settings,
    label_mle_options,
    method_name,
    noise_draw_count,
    parameter_mse,
    parameter_weights,
    resolve_weights,
    self_supervised_mse,
    uses_shared_mle_labels,
)
from qmri_labels.training.mle_labels import MLELabels, compute_mle_labels
from qmri_labels.training.module import KeepBestState, LabelRegressor
from qmri_labels.training.schedules import LR_SCHEDULES, LRSchedule

__all__ = [
    "BIAS_REDUCED_DEFAULTS",
    "LABELS",
    "LR_SCHEDULES",
    "STUDY_LABELS",
    "LRSchedule",
    "TERMS",
    "InMemoryDataModule",
    "KeepBestState",
    "LabelLoss",
    "LabelRegressor",
    "MLELabels",
    "ParameterNormalisation",
    "TensorBatches",
    "bias_and_variance",
    "bias_reduced_settings",
    "compute_mle_labels",
    "label_mle_options",
    "method_name",
    "noise_draw_count",
    "parameter_mse",
    "parameter_weights",
    "resolve_weights",
    "self_supervised_mse",
    "uses_shared_mle_labels",
]
