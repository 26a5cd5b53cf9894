"""Cramer-Rao lower bound (CRLB) of voxel-wise signal models under Gaussian or Rician noise.

The CRLB is the smallest variance an *unbiased* estimator can reach; estimators whose variance
falls below it are necessarily biased. It is the inverse of the Fisher information at the true
parameters; the information itself (Gaussian, and Rician with the factor ``g(A / sigma)``) is
defined once in :mod:`qmri_labels.fitting.fisher`, which the MLE's standard errors share, and is
re-exported here.

All parameters of the model, including the scale ``S0``, are treated as unknown, as the
estimators estimate them too.
"""

from __future__ import annotations

import numpy as np

from qmri_labels.fitting.fisher import (
    DEFAULT_RCOND,
    fisher_information,
    information_to_variance,
    rician_information_factor,
)

__all__ = ["crlb", "fisher_information", "rician_information_factor"]


def crlb(
    model,
    params: np.ndarray,
    protocol: np.ndarray,
    sigma: float | np.ndarray,
    noise: str = "gaussian",
    rcond: float = DEFAULT_RCOND,
) -> np.ndarray:
    """Cramer-Rao lower bound on the *standard deviation* of each parameter.

    Parameters
    ----------
    model, params, protocol, sigma, noise
        As in :func:`fisher_information`.
    rcond : float
        Directions of the Fisher matrix whose eigenvalue, relative to the largest after scaling
        each parameter to unit information, is below ``rcond`` are singular; a parameter with a
        share in them is not identifiable (e.g. D* when f = 0) and its bound is ``inf``. The
        other parameters keep the bound of the pseudo-inverse (the CRLB of a singular
        information, Stoica and Marzetta 2001): at f = 0 those of S0, f and D stay finite.

    Returns
    -------
    ndarray, float64, shape (..., P)
        ``sqrt(diag(I^-1))``: the smallest SD of an unbiased estimator at each ``params``.
    """
    info = fisher_information(model, params, protocol, sigma, noise)
    variance, _ = information_to_variance(info, rcond)
    return np.sqrt(variance)
