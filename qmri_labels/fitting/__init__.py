"""Conventional estimators: batched MLE fits of voxel-wise models (and QSM inversions)."""

from qmri_labels.fitting.mle import (
    FITTER_VERSION,
    MLEFit,
    fit_mle,
)
from qmri_labels.fitting.noise import NoiseEstimate, estimate_noise, sigma_from_repeats
from qmri_labels.fitting.bootstrap import bootstrap_interval
from qmri_labels.fitting.uncertainty import MLEUncertainty

__all__ = ["FITTER_VERSION", "MLEFit", "MLEUncertainty", "NoiseEstimate", "bootstrap_interval", "estimate_noise",
           "fit_mle", "sigma_from_repeats"]
