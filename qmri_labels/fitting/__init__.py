"""Conventional estimators: batched MLE fits of voxel-wise models (and QSM inversions)."""

from qmri_labels.fitting.mle import MLEFit, estimate_sigma_from_repeats, fit_mle

__all__ = ["MLEFit", "fit_mle", "estimate_sigma_from_repeats"]
