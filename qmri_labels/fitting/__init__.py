"""Conventional estimators: batched MLE fits of voxel-wise models (and QSM inversions)."""

from qmri_labels.fitting.mle import (
    FITTER_VERSION,
    MLEFit,
    estimate_sigma_from_repeats,
    fit_mle,
)
from qmri_labels.fitting.uncertainty import MLEUncertainty, bootstrap_interval

__all__ = ["FITTER_VERSION", "MLEFit", "MLEUncertainty", "bootstrap_interval", "fit_mle",
           "estimate_sigma_from_repeats"]
