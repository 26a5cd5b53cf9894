"""Parametric bootstrap intervals of maximum-likelihood estimates.

Where Wald intervals (:mod:`qmri_labels.fitting.uncertainty`) fail (D* at low SNR, f near 0),
:func:`bootstrap_interval` simulates ``B`` noisy signals from the estimate, refits them all in
one batched call of :func:`~qmri_labels.fitting.fit_mle` and takes the bootstrap quantiles. It
keeps bounds by construction. ``benchmarks/uncertainty.py`` measures which interval covers.
"""

from __future__ import annotations

import numpy as np
import torch

from qmri_labels.fitting.mle import fit_mle
from qmri_labels.fitting.uncertainty import admissible_box, check_level
from qmri_labels.physics.noise import add_noise

__all__ = ["INTERVAL_KINDS", "bootstrap_interval"]

#: how the bootstrap quantiles become an interval
INTERVAL_KINDS = ("percentile", "basic")


def bootstrap_interval(fit, bvalues, level: float = 0.95, n_boot: int = 200, kind: str = "percentile",
                       seed: int = 0, **fit_options) -> tuple[np.ndarray, np.ndarray]:
    """Parametric-bootstrap intervals of an MLE fit, all voxels and replicates in one batch.

    For every voxel, ``n_boot`` noisy signals are simulated from the estimate with the fit's
    noise model and noise level, and refitted with :func:`~qmri_labels.fitting.fit_mle` (the
    same noise model, sigma and bounds). The interval is

    * ``"percentile"``: the ``(1 -/+ level) / 2`` quantiles of the refitted estimates;
    * ``"basic"``: ``2 theta_hat`` minus those quantiles (corrects a shift of the estimator),
      clipped to the admissible box.

    Bootstrap estimates stay in the box, so percentile intervals do too, and a parameter at a
    bound gets a one-sided interval instead of none.

    Parameters
    ----------
    fit : MLEFit
        A fit of ``fit_mle``; its signals are not needed (the estimate and sigma are).
    bvalues : array_like (M,)
        The protocol of the fit.
    level : float
    n_boot : int
        Replicates per voxel (cost: ``n_boot`` fits per voxel).
    kind : {"percentile", "basic"}
    seed : int
        Seeds the simulated noise (NumPy PCG64): same seed, same intervals.
    **fit_options
        Passed to ``fit_mle`` for the refits (e.g. ``device``, ``bounds``); by default the
        settings the fit was made with (its bounds as recorded in ``fit.settings``).

    Returns
    -------
    low, high : ndarray (..., P)
        NaN for invalid voxels.
    """
    level = check_level(level)
    if kind not in INTERVAL_KINDS:
        raise ValueError(f"kind must be one of {INTERVAL_KINDS}, got {kind!r}")
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    n_boot = int(n_boot)
    settings = dict(fit.settings)
    model = fit.model
    bvalues = model.validate_protocol(bvalues)
    if fit.params.shape[-1] != model.n_params:
        raise ValueError(f"fit.params must have {model.n_params} columns, got {fit.params.shape}")
    lead = fit.params.shape[:-1]
    params = fit.params.reshape(-1, model.n_params)
    sigma = np.asarray(fit.sigma, dtype=np.float64).reshape(-1)
    noise = settings["noise"]
    if noise == "gaussian" and fit.sigma_estimated:
        # the unbiased residual variance, as for the Wald intervals
        dof = bvalues.size - model.n_params
        sigma = sigma * np.sqrt(bvalues.size / max(dof, 1))
    ok = np.all(np.isfinite(params), axis=-1) & np.isfinite(sigma) & (sigma > 0)
    index = np.flatnonzero(ok)
    low = np.full(params.shape, np.nan)
    high = np.full(params.shape, np.nan)
    if index.size == 0:
        return low.reshape(*lead, -1), high.reshape(*lead, -1)
    with torch.no_grad():
        clean = model.forward(torch.from_numpy(params[index]), torch.from_numpy(bvalues)).numpy()
    rng = np.random.Generator(np.random.PCG64(seed))
    reps = np.repeat(clean, n_boot, axis=0)
    rep_sigma = np.repeat(sigma[index], n_boot)
    noisy = add_noise(reps, rep_sigma[:, None], noise, rng)
    options = {k: settings[k] for k in ("n_starts", "probe_iter", "max_iter", "tol") if k in settings}
    if settings.get("bounds") is not None:
        options["bounds"] = np.asarray(settings["bounds"])
    options.update(fit_options)
    refit = fit_mle(noisy, bvalues, model=model, noise=noise, sigma=rep_sigma, **options)
    boot = refit.params.reshape(index.size, n_boot, model.n_params)
    alpha = 1.0 - level
    with np.errstate(invalid="ignore"):
        q_lo = np.nanquantile(boot, alpha / 2, axis=1)
        q_hi = np.nanquantile(boot, 1 - alpha / 2, axis=1)
    if kind == "percentile":
        low[index], high[index] = q_lo, q_hi
    else:
        if fit.uncertainty is not None:
            box_lo = fit.uncertainty.lower.reshape(-1, model.n_params)[index]
            box_hi = fit.uncertainty.upper.reshape(-1, model.n_params)[index]
        else:
            # the noise-free signals stand in for the data in S0's relative bound
            box_lo, box_hi = admissible_box(model, clean, bvalues, *_fit_bounds(model, settings))
        theta = params[index]
        low[index] = np.clip(2 * theta - q_hi, box_lo, box_hi)
        high[index] = np.clip(2 * theta - q_lo, box_lo, box_hi)
    return low.reshape(*lead, -1), high.reshape(*lead, -1)


def _fit_bounds(model, settings: dict) -> tuple[np.ndarray, np.ndarray, bool]:
    if settings.get("bounds") is None:
        lower, upper = (row.astype(np.float64) for row in model.default_bounds)
        return lower, upper, model.scale_index is not None
    arr = np.asarray(settings["bounds"], dtype=np.float64)
    return arr[0], arr[1], False
