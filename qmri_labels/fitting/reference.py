"""A per-voxel reference fitter: scipy's L-BFGS-B on the IVIM Rician likelihood.

Written in NumPy/SciPy, independently of the batched torch fitter, so that it can check it
(tests/test_mle_agreement.py) and serve as the speed baseline (benchmarks/mle_throughput.py).
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
