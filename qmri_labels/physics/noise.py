"""Noise models: Gaussian and Rician, with SNR defined as S0 / sigma.

Random numbers come from NumPy's PCG64 generator in float64 so that the same seed gives the
same noise bit for bit on any machine (torch's CPU and CUDA generators differ).
"""

from __future__ import annotations

import numpy as np

NOISE_TYPES = ("rician", "gaussian")


def sigma_from_snr(snr: float, s0: float | np.ndarray = 1.0) -> float | np.ndarray:
    """Noise standard deviation for a given SNR, defined as ``S0 / sigma``."""
    snr = np.asarray(snr, dtype=np.float64)
    if np.any(~np.isfinite(snr)) or np.any(snr <= 0):
        raise ValueError(f"SNR must be finite and > 0, got {snr}")
    out = np.asarray(s0, dtype=np.float64) / snr
    return float(out) if out.ndim == 0 else out


def add_noise(
    signals: np.ndarray,
    sigma: float | np.ndarray,
    noise: str = "rician",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Add Gaussian or Rician noise to noise-free signals.

    Parameters
    ----------
    signals : ndarray, shape (..., M)
        Noise-free signals.
    sigma : float or ndarray broadcastable to ``signals.shape[:-1] + (1,)``
        Standard deviation of the noise in each of the real and imaginary channels.
    noise : {"rician", "gaussian"}
        ``"gaussian"`` adds real Gaussian noise; ``"rician"`` returns the magnitude
        ``|S + n_re + i n_im|``.
    rng : numpy Generator or int seed

    Returns
    -------
    ndarray, float64, same shape as ``signals``.
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
    rng = np.random.default_rng(rng)
    signals = np.asarray(signals, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if np.any(~np.isfinite(sigma)) or np.any(sigma < 0):
        raise ValueError("sigma must be finite and >= 0")
    if sigma.ndim > 0 and sigma.shape[-1:] != (1,):
        sigma = sigma[..., None]
    real = signals + sigma * rng.standard_normal(signals.shape)
    if noise == "gaussian":
        return real
    imag = sigma * rng.standard_normal(signals.shape)
    return np.sqrt(real * real + imag * imag)
