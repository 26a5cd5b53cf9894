"""A per-voxel reference fitter: scipy's L-BFGS-B on the IVIM Rician likelihood.

Written in NumPy/SciPy, independently of the batched torch fitter, so that it can check it
(tests/fitting/test_mle_agreement.py) and serve as the speed baseline (benchmarks/mle_throughput.py).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import i0e, i1e


def ivim_rician_nll(theta, signal, bvalues, sigma):
    """Rician NLL of one voxel (all constants included) and its gradient, IVIM model."""
    s0, f, d, dstar = theta
    e_fast, e_slow = np.exp(-bvalues * dstar), np.exp(-bvalues * d)
    model = s0 * (f * e_fast + (1 - f) * e_slow)
    inv_var = 1.0 / sigma**2
    z = signal * model * inv_var
    value = np.sum(-np.log(signal * inv_var) + 0.5 * (signal - model) ** 2 * inv_var - np.log(i0e(z)))
    d_model = (model - signal * i1e(z) / i0e(z)) * inv_var
    jac = np.stack(
        [f * e_fast + (1 - f) * e_slow, s0 * (e_fast - e_slow), -bvalues * s0 * (1 - f) * e_slow,
         -bvalues * s0 * f * e_fast],
        axis=1,
    )
    return value, d_model @ jac


def fit_voxel_lbfgsb(signal, bvalues, sigma, start, bounds, ftol=1e-13, gtol=1e-10):
    """Fit one voxel from ``start``; returns scipy's ``OptimizeResult`` (``.x``, ``.fun``)."""
    signal = np.asarray(signal, dtype=np.float64)
    bvalues = np.asarray(bvalues, dtype=np.float64)
    return minimize(ivim_rician_nll, np.asarray(start, dtype=np.float64), args=(signal, bvalues, float(sigma)),
                    jac=True, method="L-BFGS-B", bounds=list(zip(*np.asarray(bounds))),
                    options={"maxiter": 2000, "ftol": ftol, "gtol": gtol})


#: fixed (f, D*) starting grid of :func:`fit_multistart`: spans the IVIM prior (f 0.1-0.5, D* 0.01-0.15)
#: and both basins (D* near D with f high, D* large with f low)
MULTISTART_GRID = tuple((f, dstar) for f in (0.05, 0.2, 0.4, 0.6) for dstar in (0.005, 0.02, 0.06, 0.15))


def fit_multistart(signal, bvalues, sigma, bounds, extra_starts=(), ftol=1e-13, gtol=1e-10):
    """The best of :func:`fit_voxel_lbfgsb` runs from many starts: a fixed grid over (f, D*)
    (:data:`MULTISTART_GRID`, with S0 the mean signal at the lowest b-value and D from the high
    b-values) and any ``extra_starts`` (e.g. the truth, another fitter's estimate).

    Returns ``(theta, nll)`` of the lowest NLL found; a reference optimum for checking how often a
    faster fitter ends in a worse local minimum.
    """
    signal = np.asarray(signal, dtype=np.float64)
    bvalues = np.asarray(bvalues, dtype=np.float64)
    bounds = np.asarray(bounds, dtype=np.float64)
    if signal.shape != bvalues.shape:
        raise ValueError(f"signal has shape {signal.shape}, bvalues {bvalues.shape}: one sample per b-value")
    s0 = float(signal[bvalues == bvalues.min()].mean())
    high = bvalues >= 200
    slope = np.polyfit(bvalues[high], np.log(np.clip(signal[high], 1e-6 * s0 + 1e-300, None)), 1)[0] if high.sum() >= 2 else -1e-3
    d = float(np.clip(-slope, bounds[0, 2], bounds[1, 2]))
    starts = [np.array([s0, f, d, dstar]) for f, dstar in MULTISTART_GRID] + [np.asarray(s, float) for s in extra_starts]
    best_theta, best_nll = None, np.inf
    for start in starts:
        start = np.clip(start, bounds[0], bounds[1])
        res = fit_voxel_lbfgsb(signal, bvalues, sigma, start, bounds, ftol=ftol, gtol=gtol)
        if np.isfinite(res.fun) and res.fun < best_nll:
            best_theta, best_nll = res.x, float(res.fun)
    return best_theta, best_nll
