"""Conventional estimators: batched MLE fits of voxel-wise models (and QSM inversions)."""

from qmri_labels.fitting.mle import (
    FITTER_VERSION,
    MLEFit,
    fit_mle,
)
from qmri_labels.fitting.noise import NoiseEstimate, estimate_noise, sigma_from_repeats

__all__ = ["FITTER_VERSION", "MLEFit", "NoiseEstimate", "estimate_noise", "fit_mle", "sigma_from_repeats"]
