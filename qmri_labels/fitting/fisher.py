"""Fisher information of voxel-wise signal models under Gaussian or Rician noise.

One definition, used by the MLE's standard errors (:mod:`qmri_labels.fitting.uncertainty`,
information at the estimate) and by the Cramer-Rao bound (:mod:`qmri_labels.analysis.crlb`,
information at the truth).

For independent measurements ``m_k`` with means ``A_k(theta)`` the Fisher information is

``I(theta) = J^T diag(w) J / sigma^2``,  ``J = dA/dtheta`` (the model's :meth:`jacobian`),

with ``w_k = 1`` for Gaussian noise (exact) and ``w_k = g(A_k / sigma)`` for Rician noise with
known sigma, where

``g(a) = E[u^2 R(a u)^2] - a^2``,  ``u ~ Rice(a, 1)``,  ``R = I_1 / I_0``

is the Fisher information of the Rician amplitude per unit ``1/sigma^2`` (the derivative of the
log-likelihood in ``A`` is ``(m R(m A / sigma^2) - A) / sigma^2``). ``g`` is computed once by
numerical quadrature on a table of SNRs and interpolated; it rises from 0 at ``a = 0`` (a
magnitude at the noise floor carries no information about ``A``) to 1 for large ``a`` (the
Gaussian limit). This is the standard result for magnitude data (e.g. Karlsen et al., JMR 1999)
and is exact up to the quadrature and interpolation error (< 1e-6 on the table).

All parameters of the model, including the scale ``S0``, are treated as unknown.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import special

from qmri_labels.physics import get_model
from qmri_labels.physics.noise import NOISE_TYPES

#: SNRs above this use the Gaussian limit g = 1 (1 - g < 2e-4 there)
_RICIAN_TABLE_MAX = 60.0

#: relative eigenvalue (after scaling each parameter to unit information) below which an
#: information matrix is singular in that direction
DEFAULT_RCOND = 1e-12


def rician_information_factor(snr: np.ndarray) -> np.ndarray:
    """Fisher information of a Rician amplitude relative to Gaussian noise, ``g(A / sigma)``.

    Parameters
    ----------
    snr : array_like
        ``A / sigma`` for each measurement (the noise-free amplitude over the noise SD), >= 0.

    Returns
    -------
    ndarray
        ``g`` in [0, 1], same shape as ``snr``: multiply the Gaussian Fisher information of each
        measurement by it.
    """
    a = np.abs(np.asarray(snr, dtype=np.float64))
    grid, values = _rician_table()
    out = np.interp(a, grid, values)
    return np.where(a >= _RICIAN_TABLE_MAX, 1.0, out)


@lru_cache(maxsize=1)
def _rician_table() -> tuple[np.ndarray, np.ndarray]:
    # dense where g changes fastest (low SNR), sparse towards the Gaussian limit
    grid = np.unique(np.concatenate([np.linspace(0, 8, 401), np.linspace(8, _RICIAN_TABLE_MAX, 261)]))
    return grid, _rician_factor_quadrature(grid)


def _rician_factor_quadrature(a: np.ndarray) -> np.ndarray:
    """``g(a)`` by the trapezoidal rule over ``u`` in ``[max(0, a - 10), a + 10]`` (the Rice
    density is below 1e-21 outside)."""
    a = np.asarray(a, dtype=np.float64)[:, None]
    t = np.linspace(0.0, 1.0, 2001)[None, :]
    lo = np.maximum(a - 10.0, 0.0)
    u = lo + (a + 10.0 - lo) * t
    # p(u) = u exp(-(u^2 + a^2)/2) I0(a u) = u exp(-(u - a)^2 / 2) i0e(a u), scaled Bessels avoid overflow
    i0 = special.i0e(a * u)
    pdf = u * np.exp(-0.5 * (u - a) ** 2) * i0
    ratio = special.i1e(a * u) / i0
    integrand = pdf * (u * ratio) ** 2
    du = (a[:, 0] + 10.0 - lo[:, 0]) / (t.shape[1] - 1)
    second = du * (integrand.sum(axis=1) - 0.5 * (integrand[:, 0] + integrand[:, -1]))
    return np.maximum(second - a[:, 0] ** 2, 0.0)


def fisher_information(
    model,
    params: np.ndarray,
    protocol: np.ndarray,
    sigma: float | np.ndarray,
    noise: str = "gaussian",
    sigma_scale=None,
) -> np.ndarray:
    """Fisher information matrices ``(..., P, P)`` of a signal model.

    Parameters
    ----------
    model : str or SignalModel
    params : ndarray, shape (..., P)
        Parameters in the model's order and units (the truth for a Cramer-Rao bound, the
        estimate for standard errors).
    protocol : ndarray, shape (M,)
        b-values (s/mm^2) or the model's protocol.
    sigma : float or ndarray broadcastable to ``params.shape[:-1]``
        Noise SD in each channel (``S0 / SNR``).
    noise : {"gaussian", "rician"}
    sigma_scale : ndarray (M,), optional
        Noise SD of each measurement relative to ``sigma`` (default 1).

    Returns
    -------
    ndarray, float64, shape (..., P, P)
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
    model = get_model(model)
    params = np.asarray(params, dtype=np.float64)
    if params.shape[-1] != model.n_params:
        raise ValueError(f"params must have {model.n_params} columns for model {model.name!r}, got {params.shape}")
    protocol = model.validate_protocol(protocol)
    sigma = np.asarray(sigma, dtype=np.float64)
    if np.any(~np.isfinite(sigma)) or np.any(sigma <= 0):
        raise ValueError("sigma must be finite and > 0 for a Fisher information")
    sigma = np.broadcast_to(sigma, params.shape[:-1])[..., None]  # (..., 1)
    if sigma_scale is not None:
        sigma = sigma * np.asarray(sigma_scale, dtype=np.float64)  # (..., M)
    theta = torch.from_numpy(params)
    b = torch.from_numpy(protocol)
    with torch.no_grad():
        jac = model.jacobian(theta, b).numpy()  # (..., M, P)
        if noise == "rician":
            amplitude = model.forward(theta, b).numpy()  # (..., M)
            weights = rician_information_factor(amplitude / sigma)
        else:
            weights = np.ones(jac.shape[:-1])
    weights = weights / sigma**2
    return np.einsum("...mp,...m,...mq->...pq", jac, weights, jac)


def information_to_variance(info: np.ndarray, rcond: float = DEFAULT_RCOND) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal of the inverse information, parameter by parameter where it exists.

    Each parameter is scaled to unit information first, so that conditioning does not depend on
    the parameters' units. Directions whose eigenvalue falls below ``rcond`` times the largest
    are not identifiable; a parameter is *unidentifiable* when it has a share (> 1e-6 of its
    unit norm) in such a direction. The variances of the other parameters are those of the
    pseudo-inverse, which equal the inverse's when the singular directions involve only the
    unidentifiable parameters (e.g. D* when f = 0: S0, f and D keep their variances).

    Parameters
    ----------
    info : ndarray (..., P, P)
    rcond : float

    Returns
    -------
    variance : ndarray (..., P)
        ``diag(I^-1)``; ``inf`` for unidentifiable parameters.
    singular : ndarray of bool (..., P)
        The parameter is unidentifiable (zero information or in a singular direction).
    """
    info = np.asarray(info, dtype=np.float64)
    finite = np.all(np.isfinite(info), axis=(-2, -1))
    info = np.where(finite[..., None, None], info, 0.0)
    diag = np.sqrt(np.clip(np.diagonal(info, axis1=-2, axis2=-1), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(diag > 0, 1.0 / diag, 0.0)
    scaled = info * scale[..., :, None] * scale[..., None, :]
    eigval, eigvec = np.linalg.eigh(scaled)
    good = eigval > rcond * np.maximum(eigval[..., -1:], np.finfo(float).tiny)
    inv_eig = np.where(good, 1.0 / np.where(good, eigval, 1.0), 0.0)
    variance = np.einsum("...pk,...k,...pk->...p", eigvec, inv_eig, eigvec) * scale**2
    null_share = np.einsum("...pk,...k,...pk->...p", eigvec, (~good).astype(float), eigvec)
    singular = (null_share > 1e-6) | (diag == 0) | ~finite[..., None]
    return np.where(singular, np.inf, variance), singular
