"""Image-quality metrics for susceptibility maps (and any 3-D map).

Published QSM codes disagree on the details (normalisation, masks, windows, data ranges), so
each metric states its exact definition. In all of them ``x`` is the estimate, ``y`` the
reference, and ``mask`` (optional, default: every voxel) selects the voxels that count;
``||.||`` is the Euclidean norm over those voxels. Inputs are NumPy arrays (or anything
``np.asarray`` accepts) of shape ``(X, Y, Z)``; computations run in float64.

* :func:`nrmse` -- ``100 ||x - y|| / ||y||`` in percent.
* :func:`nrmse_demeaned` -- the same after subtracting from ``x`` and ``y`` their own means over
  the mask (the mean of chi is not observable from a local field, so this removes an offset
  that no inversion can know).
* :func:`ssim` -- 3-D structural similarity with a Gaussian window (sigma 1.5 voxels, truncated
  at 3.5 sigma, as in Wang et al. 2004), ``K1 = 0.01``, ``K2 = 0.03``, data range
  ``L = max(y) - min(y)`` over the mask unless given; both images are set to zero outside the
  mask before filtering, and the SSIM map is averaged over the mask.
* :func:`hfen` -- high-frequency error norm ``100 ||LoG(x) - LoG(y)|| / ||LoG(y)||`` with the
  Laplacian of Gaussian (sigma 1.5 voxels, truncated at 5 sigma as in the QSM-CI scorer,
  ``scipy.ndimage.gaussian_laplace``) applied to the mask-zeroed images, norms over the mask.
* :func:`xsim` -- the structural similarity that the QSM reconstruction challenge 2.0
  (Marques et al., 2021) defined for susceptibility maps: no rescaling of the maps (they stay
  in ppm), ``L = 1`` ppm, ``K1 = 0.01``, ``K2 = 0.001`` (so ``C1 = 1e-4``, ``C2 = 1e-6``; the
  small K2 makes streaking artefacts count), a uniform 5x5x5 window truncated at the volume
  edge, averaged over the mask. Identical to the QSM-CI scorer's ``xsim`` (checked in the tests).
* :func:`psnr` -- ``20 log10(L / RMSE)`` in dB with ``RMSE = sqrt(mean((x - y)^2))`` over the
  mask and ``L = max(y) - min(y)`` over the mask unless given.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["nrmse", "nrmse_demeaned", "ssim", "xsim", "hfen", "psnr", "image_metrics"]


def _prepare(x, y, mask):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"estimate shape {x.shape} differs from reference shape {y.shape}")
    if mask is None:
        m = np.ones(y.shape, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != y.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {y.shape}")
        m = m != 0
    if not m.any():
        raise ValueError("mask selects no voxels")
    if not (np.all(np.isfinite(x[m])) and np.all(np.isfinite(y[m]))):
        raise ValueError("images contain NaN or inf inside the mask")
    return x, y, m


def nrmse(x, y, mask=None) -> float:
    """Normalised RMSE in percent: ``100 * ||x - y|| / ||y||`` over the mask."""
    x, y, m = _prepare(x, y, mask)
    ref = np.linalg.norm(y[m])
    if ref == 0:
        raise ValueError("reference is zero inside the mask; NRMSE is undefined")
    return float(100.0 * np.linalg.norm(x[m] - y[m]) / ref)


def nrmse_demeaned(x, y, mask=None) -> float:
    """NRMSE (%) after removing each image's mean over the mask:
    ``100 ||(x - mean_m x) - (y - mean_m y)|| / ||y - mean_m y||``."""
    x, y, m = _prepare(x, y, mask)
    xd = x[m] - x[m].mean()
    yd = y[m] - y[m].mean()
    ref = np.linalg.norm(yd)
    if ref == 0:
        raise ValueError("reference is constant inside the mask; demeaned NRMSE is undefined")
    return float(100.0 * np.linalg.norm(xd - yd) / ref)


def _data_range(y, m, data_range):
    if data_range is None:
        data_range = float(y[m].max() - y[m].min())
    if not data_range > 0:
        raise ValueError("data range must be > 0 (reference is constant inside the mask?)")
    return float(data_range)


def ssim(x, y, mask=None, *, data_range: float | None = None, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean 3-D structural similarity over the mask.

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
    with local means/variances/covariance from a Gaussian window (``sigma`` voxels, truncated
    at 3.5 sigma), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range`` (default
    ``max(y) - min(y)`` over the mask); images are zeroed outside the mask first. 1 means
    identical.
    """
    x, y, m = _prepare(x, y, mask)
    L = _data_range(y, m, data_range)
    x = np.where(m, x, 0.0)
    y = np.where(m, y, 0.0)

    def filt(a):
        return ndimage.gaussian_filter(a, sigma=sigma, truncate=3.5, mode="constant")

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(smap[m].mean())


def xsim(x, y, mask=None, *, window: int = 5, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.001) -> float:
    """XSIM, the QSM challenge 2.0 structural similarity of susceptibility maps (ppm).

    ``XSIM = mean over the mask of (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 +
    s_y^2 + C2))`` with local statistics over a uniform ``window``^3 cube (default 5; at the volume
    edge only the voxels inside count), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``
    (default 1 ppm; the maps are not rescaled), ``k1 = 0.01``, ``k2 = 0.001``. The images are
    used as given (an estimate masked to the brain is zero outside it). 1 means identical.
    """
    x, y, m = _prepare(x, y, mask)
    if int(window) < 1 or int(window) % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1, got {window}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    k = int(window)

    def local_sum(a):
        return ndimage.uniform_filter(a, size=k, mode="constant", cval=0.0) * k**3

    count = local_sum(np.ones_like(y))
    mu_x, mu_y = local_sum(x) / count, local_sum(y) / count
    sxx = local_sum(x * x) / count - mu_x**2
    syy = local_sum(y * y) / count - mu_y**2
    sxy = local_sum(x * y) / count - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float(np.mean(num[m] / den[m]))


def hfen(x, y, mask=None, *, sigma: float = 1.5, truncate: float = 5.0) -> float:
    """High-frequency error norm (%): ``100 ||LoG(x) - LoG(y)|| / ||LoG(y)||`` over the mask,
    LoG with standard deviation ``sigma`` voxels (truncated at ``truncate`` sigma) applied to
    the mask-zeroed images."""
    x, y, m = _prepare(x, y, mask)
    lx = ndimage.gaussian_laplace(np.where(m, x, 0.0), sigma=sigma, truncate=truncate)
    ly = ndimage.gaussian_laplace(np.where(m, y, 0.0), sigma=sigma, truncate=truncate)
    ref = np.linalg.norm(ly[m])
    if ref == 0:
        raise ValueError("LoG of the reference is zero inside the mask; HFEN is undefined")
    return float(100.0 * np.linalg.norm(lx[m] - ly[m]) / ref)


def psnr(x, y, mask=None, *, data_range: float | None = None) -> float:
    """Peak SNR in dB: ``20 log10(L / sqrt(mean_m (x - y)^2))``, ``L`` as in :func:`ssim`;
    ``inf`` for identical images."""
    x, y, m = _prepare(x, y, mask)
    L = _data_range(y, m, data_range)
    rmse = np.sqrt(np.mean((x[m] - y[m]) ** 2))
    if rmse == 0:
        return float("inf")
    return float(20.0 * np.log10(L / rmse))


def image_metrics(x, y, mask=None) -> dict[str, float]:
    """All metrics in one dict: ``nrmse``, ``nrmse_demeaned``, ``xsim``, ``ssim``, ``hfen``, ``psnr``."""
    return {
        "nrmse": nrmse(x, y, mask),
        "nrmse_demeaned": nrmse_demeaned(x, y, mask),
        "xsim": xsim(x, y, mask),
        "ssim": ssim(x, y, mask),
        "hfen": hfen(x, y, mask),
        "psnr": psnr(x, y, mask),
    }
