"""Per-voxel uncertainty of maximum-likelihood estimates.

* **Wald (Fisher) standard errors**: ``sd = sqrt(diag(I(theta_hat)^-1))`` with the expected
  Fisher information of :mod:`qmri_labels.fitting.fisher` at the estimate and the noise level
  the fit used (exact for Gaussian noise; for Rician noise the information of the magnitude
  with the factor ``g(A / sigma)``). For Gaussian noise with sigma estimated from the residual,
  the variance uses ``RSS / (M - P)`` and intervals the t-distribution with ``M - P`` degrees
  of freedom, as in non-linear regression.
* **Bounds**: an interval never leaves the admissible box; a parameter on a bound of the box
  or in a singular direction of the information (D* when f = 0) gets no number (NaN) and a
  reason, because the Wald approximation does not hold there.
* Where Wald intervals fail (D* at low SNR, f near 0), the parametric bootstrap of
  :mod:`qmri_labels.fitting.bootstrap` takes over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from qmri_labels.fitting.fisher import fisher_information, information_to_variance

#: a parameter within this fraction of its box's width from a bound is "on the bound" (the
#: fitter freezes a parameter at 1e-7 of the width; float32 estimates are clipped onto it)
AT_BOUND_TOLERANCE = 1e-6

def check_level(level: float) -> float:
    """``level`` as a float in (0, 1), or a ValueError naming it."""
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return level


@dataclass
class MLEUncertainty:
    """Standard errors of an :class:`~qmri_labels.fitting.MLEFit` and their intervals.

    Attributes
    ----------
    sd : ndarray (..., P)
        Standard error of each estimate in the model's parameter order; NaN where ``reason``
        says why there is no number.
    reason : ndarray of str (..., P)
        ``""`` where ``sd`` is a number, otherwise ``"invalid voxel"``, ``"at lower bound"``,
        ``"at upper bound"``, ``"singular information"`` or ``"no residual degrees of
        freedom"``.
    lower, upper : ndarray (..., P)
        The admissible box of each voxel (the fitter's bounds, S0's in the data's units).
    dof : int or None
        Degrees of freedom of the t-distribution used for intervals (Gaussian noise with
        sigma estimated from the residual); ``None``: normal quantiles.
    method : str
    """

    sd: np.ndarray
    reason: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    dof: int | None = None
    method: str = "fisher"

    def quantile(self, level: float) -> float:
        """Multiplier of the SD for a central interval of probability ``level``."""
        level = check_level(level)
        q = 0.5 + 0.5 * level
        return float(stats.t.ppf(q, self.dof) if self.dof else stats.norm.ppf(q))

    def interval(self, params: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Wald interval ``params -/+ z sd``, clipped to the admissible box (NaN where no SD)."""
        half = self.quantile(level) * self.sd
        low = np.clip(params - half, self.lower, self.upper)
        high = np.clip(params + half, self.lower, self.upper)
        return low, high


def admissible_box(model, signals: np.ndarray, bvalues: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                   scale_relative: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel bounds ``(N, P)`` in the data's units, as the fitter applies them.

    With ``scale_relative`` the scale parameter (S0) is bounded by ``[0, h x`` the voxel's mean
    signal at the lowest b-value ``]`` (its largest magnitude if that mean is not positive), with
    ``h = model.scale_headroom(bvalues)`` (2 for diffusion models), as in the fitter.
    """
    n = signals.shape[0]
    lo = np.broadcast_to(lower, (n, model.n_params)).copy()
    hi = np.broadcast_to(upper, (n, model.n_params)).copy()
    k = model.scale_index
    if k is not None and scale_relative:
        scale = signals[:, bvalues == bvalues.min()].mean(-1)
        scale = np.where(scale > 0, scale, np.abs(signals).max(-1))
        lo[:, k] = 0.0
        hi[:, k] = float(model.scale_headroom(torch.as_tensor(bvalues))) * scale
    return lo, hi


def fisher_uncertainty(model, signals: np.ndarray, bvalues: np.ndarray, params: np.ndarray, sigma: np.ndarray,
                       noise: str, lower: np.ndarray, upper: np.ndarray, scale_relative: bool, valid: np.ndarray,
                       sigma_from_residuals: bool = False, sigma_scale=None) -> MLEUncertainty:
    """Wald standard errors of fitted voxels (the hook of ``fit_mle(..., uncertainty=True)``).

    Parameters
    ----------
    model : SignalModel
    signals : ndarray (N, M)
    bvalues : ndarray (M,)
    params : ndarray (N, P)
        The estimates (NaN for invalid voxels).
    sigma : ndarray (N,)
        Noise level the fit used; for Gaussian noise without a given sigma the fitter's
        ``sqrt(RSS / M)``.
    noise : {"rician", "gaussian"}
    lower, upper : ndarray (P,)
        The fitter's bounds; ``scale_relative``: S0's are relative to the signal (see
        :func:`admissible_box`).
    valid : ndarray of bool (N,)
    sigma_from_residuals : bool
        Sigma was estimated from the residuals: use ``RSS / (M - P)`` and t-quantiles.
    sigma_scale : ndarray (M,), optional
        Noise SD of each measurement relative to ``sigma`` (the fit's ``sigma_scale``).

    Returns
    -------
    MLEUncertainty
        Arrays of shape ``(N, P)``.
    """
    n, p = params.shape
    m = bvalues.size
    lo, hi = admissible_box(model, signals, bvalues, lower, upper, scale_relative)
    sd = np.full((n, p), np.nan)
    reason = np.full((n, p), "invalid voxel", dtype=object)
    dof = None
    ok = valid & np.all(np.isfinite(params), axis=-1)
    sig = np.asarray(sigma, dtype=np.float64).copy()
    if sigma_from_residuals:
        dof = m - p
        if dof < 1:
            reason[ok] = "no residual degrees of freedom"
            ok = np.zeros_like(ok)
            dof = None
        else:
            sig = sig * np.sqrt(m / dof)
    index = np.flatnonzero(ok)
    if index.size:
        theta = params[index]
        info = fisher_information(model, theta, bvalues, sig[index], noise, sigma_scale=sigma_scale)
        variance, singular = information_to_variance(info)
        span = hi[index] - lo[index]
        at_low = theta - lo[index] <= AT_BOUND_TOLERANCE * span
        at_high = hi[index] - theta <= AT_BOUND_TOLERANCE * span
        why = np.full(theta.shape, "", dtype=object)
        why[singular] = "singular information"
        why[at_high] = "at upper bound"
        why[at_low] = "at lower bound"
        reported = why == ""
        sd[index] = np.where(reported, np.sqrt(np.where(reported, variance, 0.0)), np.nan)
        reason[index] = why
    method = "fisher (expected information at the estimate, " + noise + ")"
    return MLEUncertainty(sd=sd, reason=reason.astype(str), lower=lo, upper=hi, dof=dof, method=method)
