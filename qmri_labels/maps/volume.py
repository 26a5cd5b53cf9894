"""Parameter maps from arrays: the public mapping API that the fit command wraps.

>>> from qmri_labels.maps import fit_volume
>>> maps = fit_volume(dwi, mask, protocol=bvals, estimator="mle", sigma="auto")   # doctest: +SKIP
>>> maps["f"].shape == dwi.shape[:-1]                                              # doctest: +SKIP

``data`` may have any leading shape ``(..., M)``: a 4-D image ``(x, y, z, M)``, a slice, or a
plain list of voxels ``(n, M)``; every output has the leading shape. Reading NIfTI files and
writing maps: :func:`load_dwi` and :mod:`qmri_labels.maps.derivatives`.

How a voxel is estimated
------------------------
Every estimator is used through one contract (:mod:`qmri_labels.maps.estimator`):
``predict(signals, device=..., return_sd=...)``, ``reports_sd``, ``model_name``,
``param_names`` and ``protocol``; what differs is declared by the estimator, not looked up
from its type.

* **MLE** (``estimator="mle"`` or an :class:`~qmri_labels.estimators.MLEEstimator`): the raw
  signals, in the image's units, are fitted with S0 a free parameter (bounded by twice the
  voxel's mean signal at its lowest b-value), so no b = 0 volume is needed and no signal is
  divided by anything. Rician fits need sigma: a number, a per-voxel map, or ``"auto"``
  (:func:`qmri_labels.fitting.noise.estimate_noise`: repeated measurements, then the
  background, then MP-PCA, which gives a noise map); the map is used voxel by voxel. It has
  no protocol of its own, so it fits the scan's.
* **Networks** (a :class:`~qmri_labels.estimators.NetworkEstimator`, a bundle name or folder):
  the data's volumes are put into the network's protocol order, scaled the way the network was
  trained (:mod:`qmri_labels.data.preprocessing`, recorded in the bundle) and the predicted S0
  is scaled back.
* Samples that are NaN/Inf (and, for Rician data, negative) are left out of that voxel's MLE
  fit; a network needs every sample and skips such voxels. Every voxel gets a status code
  (:data:`STATUS_CODES`).
* ``uncertainty=True`` adds the standard deviation of every estimate (``Maps.sd``) with a
  reason code per voxel and parameter (:data:`SD_REASON_CODES`): the MLE's Wald standard error
  from the Fisher information at the estimate, or a network's ``predict(..., return_sd=True)``;
  an estimator whose ``reports_sd`` is false raises :class:`UncertaintyNotSupported`.

Directions and the protocol
---------------------------
* Volumes repeat each other (for ``sigma="auto"``) only at one b-value shell and one gradient
  direction (``bvecs``; b = 0 volumes always): :mod:`qmri_labels.physics.protocol`.
* The isotropic models are fitted to every volume (``directions="all"``) or to the per-shell
  geometric mean (``"average"``, each averaged measurement Rician with ``sigma / sqrt(N)``).
  ``"auto"`` (the default) averages when a shell with b > 0 holds several volumes: an
  isotropic model fitted to every direction takes the tissue's anisotropy for noise, while the
  geometric mean over orthogonal directions is the trace-weighted signal ``exp(-b MD)``.
* A protocol that cannot identify the model (too few b-value shells, no low b-values for IVIM's
  perfusion part, b-values in ms/um^2) is refused with :class:`ProtocolNotIdentifiable`
  unless ``force=True``.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from qmri_labels.data.preprocessing import lowest_b_mean
from qmri_labels.fitting.noise import NoiseEstimate, estimate_noise
from qmri_labels.maps.estimator import EstimatorPlan, resolve_estimator
from qmri_labels.maps.loading import voxel_source
from qmri_labels.maps.result import SKIP_KEYS, Maps
from qmri_labels.physics import get_model
from qmri_labels.physics.protocol import REPEAT_ANGLE_DEG, ShellAverage, protocol_problems, unit_directions
from qmri_labels.threads import resolve_threads, torch_threads

logger = logging.getLogger("qmri_labels")

#: why an SD is missing, as an estimator that says so gives it (``return_sd_reason``:
#: :class:`qmri_labels.fitting.uncertainty.MLEUncertainty`'s reasons), as codes
_SD_REASONS = {"": 1, "at lower bound": 2, "at upper bound": 3, "singular information": 4,
                "no residual degrees of freedom": 5, "invalid voxel": 6}


#: what ``fit_volume(directions=...)`` accepts
DIRECTION_CHOICES = ("auto", "all", "average")


class ProtocolNotIdentifiable(ValueError):
    """The protocol cannot identify the model's parameters (``force=True`` fits anyway)."""


def _resolve_noise(sigma, plan: EstimatorPlan, source, bvalues, mask, b0_threshold, bvecs=None):
    """(noise estimate for the fitter: None or a NoiseEstimate, manifest entry); only an
    estimator that fits the scan's protocol takes the scan's noise level."""
    if not plan.fits_scan_protocol:
        return None, None
    if sigma is None and getattr(plan.estimator, "noise", "rician") == "gaussian":
        return None, {"method": "residual", "description": "not needed by the Gaussian (least-squares) fit; "
                                                           "estimated per voxel from the residual"}
    if sigma is None or (isinstance(sigma, str) and sigma == "auto"):
        estimate = estimate_noise(source.full(), bvalues, mask if mask is not None and not mask.all() else None,
                                  bvecs=bvecs, b0_threshold=b0_threshold)
        logger.info("noise: sigma %.4g by %s", estimate.sigma, estimate.method)
        return estimate, {**estimate.manifest(), "source": "auto"}
    if isinstance(sigma, NoiseEstimate):
        return sigma, {**sigma.manifest(), "source": "given NoiseEstimate"}
    if isinstance(sigma, str):
        raise ValueError(f"sigma {sigma!r}: give a positive number, a per-voxel array or 'auto'")
    values = np.asarray(sigma, dtype=np.float64)
    if values.ndim == 0:
        value = float(values)
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
        return NoiseEstimate(value, "given", "given by the user", 0), {"value": value, "method": "given"}
    if values.shape != tuple(source.lead):
        raise ValueError(f"sigma map shape {values.shape} differs from the data's leading shape {source.lead}")
    inside = values[mask] if mask is not None else values
    if not np.all(np.isfinite(inside) & (inside > 0)):
        raise ValueError("the sigma map must be finite and > 0 at every voxel to be fitted")
    estimate = NoiseEstimate(float(np.median(inside)), "given", "per-voxel map given by the user", int(inside.size),
                             sigma_map=values.astype(np.float32))
    return estimate, {**estimate.manifest(), "source": "given"}


def fit_volume(data, mask=None, protocol=None, *, estimator="mle", model: str | None = None, noise: str = "rician",
               sigma=None, b0_threshold: float = 0.0, chunk_size: int = 20000, device=None,
               progress: bool | Callable[[int], None] = False, uncertainty: bool = False, bvecs=None,
               directions: str = "auto", force: bool = False, sd_kind: str = "truth", threads="auto") -> Maps:
    """Estimate model parameters at every voxel of ``data`` inside ``mask``.

    Parameters
    ----------
    data : array_like (..., M) or NiftiVolume
        Magnitude signals (Rician) or real-valued ones (``noise="gaussian"``), any leading
        shape; a 4-D :class:`~qmri_labels.data.io.NiftiVolume` is read chunk by chunk.
    mask : array_like (...) of bool, optional
        Voxels to estimate (default: every voxel).
    protocol : array_like (M,)
        b-values in s/mm^2, one per measurement.
    estimator : "mle", a bundle name / folder, or an estimator
        An estimator is any object with ``predict(signals, device=None, return_sd=False)``,
        ``reports_sd``, ``model_name``, ``param_names`` and ``protocol`` (an
        :class:`~qmri_labels.estimators.MLEEstimator`, a
        :class:`~qmri_labels.estimators.NetworkEstimator`, or one of your own); see
        :mod:`qmri_labels.maps.estimator` for what ``protocol=None`` and a declared
        preprocessing mean.
    model : {"ivim", "monoexp"}, optional
        The MLE's model (default ``ivim``); checked against an estimator's.
    noise : {"rician", "gaussian"}
        The MLE's likelihood (ignored by networks).
    sigma : None, "auto", float, array_like (...) or NoiseEstimate
        Noise SD in the data's units. ``None`` means ``"auto"`` for the Rician fit and "not
        needed" for the Gaussian one. A per-voxel map (MP-PCA gives one) is used voxel by voxel.
    b0_threshold : float
        b-values at or below it count as repeated b = 0 measurements for the noise estimate.
    chunk_size : int
        Voxels estimated at a time (bounds memory).
    device : str or torch.device, optional
    progress : bool or callable
        ``True``: a tqdm bar on stderr; a callable gets the number of voxels done after each chunk.
    uncertainty : bool
        Also estimate the standard deviation of every estimate (``Maps.sd``, with a reason
        code per voxel and parameter in ``Maps.sd_reason``). The MLE gives the Wald standard
        error from the expected Fisher information at the estimate with the noise level it
        used (:mod:`qmri_labels.fitting.uncertainty`; NaN for a parameter on a bound of the
        box or in a singular direction); a network gives what its
        ``predict(signals, return_sd=True)`` reports (S0's scaled back like S0). An
        estimator whose ``reports_sd`` is false is refused.
    sd_kind : {"truth", "label"}
        ``"truth"``: every SD is the error bar of the estimate against the true value (the
        MLE's Wald SE; a network's SD calibrated on held-out simulations); a network whose SD
        was never calibrated so (the shipped bundles) is refused. ``"label"``: a network's raw
        SD, the spread around its training label, asked for by name and recorded so in
        ``Maps.sd_method`` (the sidecars).

    bvecs : array_like (3, M), optional
        Gradient directions (NaN or zero on b = 0 volumes): which volumes repeat each other
        for the noise estimate, and whether a shell holds several directions.
    directions : {"auto", "all", "average"}
        Fit every volume, or each b-value shell's geometric mean (the noise model of what is
        fitted in ``Maps.protocol``). ``auto``: ``average`` when a shell with b > 0 holds
        several volumes, else ``all``.
    force : bool
        Fit a protocol that cannot identify the model (recorded in ``Maps.protocol``).
    threads : int or "auto"
        torch CPU threads for the fit (restored afterwards). ``"auto"``: the cores other
        processes leave free now (:func:`qmri_labels.threads.resolve_threads`), so that a fit
        on a busy node does not oversubscribe it. The MLE gives the same bytes at any count;
        a network's last float32 bit can depend on it.

    Returns
    -------
    Maps

    Raises
    ------
    ValueError, TypeError
        On inconsistent shapes, a protocol too short for the model, a network trained for
        another protocol, a bad sigma, or when the noise level cannot be estimated;
        :class:`ProtocolNotIdentifiable` when the protocol cannot identify the model.
    """
    with torch_threads(resolve_threads(threads)):
        return _fit_volume(data, mask, protocol, estimator=estimator, model=model, noise=noise, sigma=sigma,
                           b0_threshold=b0_threshold, chunk_size=chunk_size, device=device, progress=progress,
                           uncertainty=uncertainty, bvecs=bvecs, directions=directions, force=force,
                           sd_kind=sd_kind)


def _fit_volume(data, mask, protocol, *, estimator, model, noise, sigma, b0_threshold, chunk_size, device, progress,
                uncertainty, bvecs, directions, force, sd_kind) -> Maps:
    if protocol is None:
        raise ValueError("fit_volume needs protocol=... (the b-values, one per measurement)")
    bvalues = np.asarray(protocol, dtype=np.float64).ravel()
    if noise not in ("rician", "gaussian"):
        raise ValueError(f"noise must be 'rician' or 'gaussian', got {noise!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    source = voxel_source(data)
    n_meas = source.n_measurements
    if bvalues.size != n_meas:
        raise ValueError(f"protocol has {bvalues.size} b-values, but the data have {n_meas} measurements")
    if not np.all(np.isfinite(bvalues)) or np.any(bvalues < 0):
        raise ValueError(f"b-values must be finite and >= 0, got {bvalues.tolist()}")
    if mask is None:
        mask_array = np.ones(source.lead, dtype=bool)
    else:
        mask_array = np.asarray(mask)
        if mask_array.shape != tuple(source.lead):
            raise ValueError(f"mask shape {mask_array.shape} differs from the data's leading shape {source.lead}")
        mask_array = np.isfinite(mask_array) & (mask_array != 0) if mask_array.dtype != bool else mask_array
    if bvecs is not None:
        bvecs = np.asarray(bvecs, dtype=np.float64)
        unit_directions(bvecs, bvalues.size)
    averager, protocol_info = _choose_directions(directions, bvalues, bvecs, b0_threshold)
    fitted_b = bvalues if averager is None else averager.bvalues
    plan = resolve_estimator(estimator, fitted_b, model=model, noise=noise)
    uncertainty = _check_uncertainty(uncertainty, plan, sd_kind)
    signal_model = get_model(plan.estimator.model_name)
    if tuple(plan.estimator.param_names) != tuple(signal_model.param_names):
        raise ValueError(f"the {plan.label} estimates {tuple(plan.estimator.param_names)}; the {signal_model.name} "
                         f"model's parameters are {signal_model.param_names}, in that order")
    problems = protocol_problems(signal_model, fitted_b, b0_threshold)
    if problems and not force:
        raise ProtocolNotIdentifiable(f"the protocol cannot identify the {signal_model.name} model: "
                                      + "; ".join(problems) + ". To fit anyway: force=True (qmri-fit --force)")
    protocol_info["identifiability"] = {"problems": problems, "forced": bool(force and problems)}
    if problems:
        logger.warning("fitting despite: %s (forced)", "; ".join(problems))
    n_distinct = np.unique(fitted_b).size
    if n_distinct < signal_model.n_params:
        raise ValueError(f"{n_distinct} distinct b-values; the {signal_model.name} model has {signal_model.n_params} "
                         f"parameters {signal_model.param_names} and needs at least that many (even with force)")
    noise_estimate, noise_info = _resolve_noise(sigma, plan, source, bvalues, mask_array, b0_threshold, bvecs)
    sigma_scale = None if averager is None else averager.sigma_scale

    coords = np.nonzero(mask_array)
    n_voxels = coords[0].size
    scale = None
    if plan.preprocessing is not None and plan.preprocessing.kind == "global_scale":
        lowest = np.concatenate([lowest_b_mean(_fitted_rows(source, tuple(c[s:s + chunk_size] for c in coords),
                                                            averager), fitted_b)
                                 for s in range(0, n_voxels, chunk_size)]) if n_voxels else np.zeros(0)
        scale = plan.preprocessing.scale(lowest)
        plan.record["preprocessing"]["scale"] = scale

    params = np.zeros(source.lead + (signal_model.n_params,), dtype=np.float32)
    status = np.zeros(source.lead, dtype=np.uint8)
    sd = np.zeros_like(params) if uncertainty else None
    sd_reason = np.zeros(params.shape, dtype=np.uint8) if uncertainty else None
    counts = {"nonfinite": 0, "negative": 0}
    sigma_full = None if noise_estimate is None else noise_estimate.per_voxel()
    bar = None
    if progress is True:
        bar = tqdm(total=n_voxels, unit="voxel", desc=f"{signal_model.name} {plan.record.get('kind')}", file=sys.stderr,
                   dynamic_ncols=True)
    done = 0
    for start in range(0, n_voxels, int(chunk_size)):
        chunk = tuple(c[start:start + chunk_size] for c in coords)
        rows = _fitted_rows(source, chunk, averager)
        if sigma_full is None or np.ndim(sigma_full) == 0:
            chunk_sigma = sigma_full
        else:
            chunk_sigma = np.asarray(sigma_full[chunk], dtype=np.float64)
            fallback = noise_estimate.sigma
            chunk_sigma = np.where(np.isfinite(chunk_sigma) & (chunk_sigma > 0), chunk_sigma, fallback)
        estimate, codes, errors = _fit_rows(rows, fitted_b, plan, signal_model, chunk_sigma, scale, device, counts,
                                            uncertainty, sigma_scale, sd_kind)
        params[chunk] = estimate
        status[chunk] = codes
        if uncertainty:
            sd[chunk], sd_reason[chunk] = errors
        done += rows.shape[0]
        if bar is not None:
            bar.update(rows.shape[0])
        elif callable(progress):
            progress(done)
    if bar is not None:
        bar.close()

    counts = {
        "total": int(np.prod(source.lead)) if source.lead else 1,
        "in_mask": int(n_voxels),
        "estimated": int(((status == 1) | (status == 2)).sum()),
        "estimated_without_some_samples": int((status == 2).sum()),
        "skipped": {key: int((status == code).sum()) for code, key in SKIP_KEYS.items()},
        "samples_nonfinite": counts["nonfinite"],
        "samples_negative": counts["negative"],
    }
    units = {n: ("input intensity units" if n == "S0" else signal_model.units[n]) for n in signal_model.param_names}
    sigma_map = None
    if noise_estimate is not None and noise_estimate.sigma_map is not None:
        sigma_map = np.where(mask_array, noise_estimate.sigma_map, 0).astype(np.float32)
    return Maps(params=params, param_names=tuple(signal_model.param_names), units=units, status=status,
                model=signal_model.name, estimator=plan.record, noise=noise_info, sigma_map=sigma_map,
                counts=counts, sd=sd, sd_reason=sd_reason, protocol=protocol_info,
                sd_method=_sd_method(plan, sd_kind) if uncertainty else None,
                sd_kind=sd_kind if uncertainty else None)


def _fitted_rows(source, coords, averager: ShellAverage | None) -> np.ndarray:
    """The voxel rows that are fitted: every volume, or each shell's geometric mean."""
    rows = source.rows(coords)
    return rows if averager is None else averager.apply(rows)


def _choose_directions(directions: str, bvalues, bvecs, b0_threshold: float):
    """``(ShellAverage or None, protocol entry of the Maps)`` for ``fit_volume(directions=...)``."""
    if directions not in DIRECTION_CHOICES:
        raise ValueError(f"directions must be one of {DIRECTION_CHOICES}, got {directions!r}")
    average = ShellAverage.of(bvalues, b0_threshold)
    weighted = average.bvalues > b0_threshold
    several = bool(np.any(average.n_volumes[weighted] >= 2))
    used = directions if directions != "auto" else ("average" if several else "all")
    info = {"directions": {"requested": directions, "used": used, "bvecs_given": bvecs is not None,
                           "repeat_angle_deg": REPEAT_ANGLE_DEG}}
    if used == "average" and average.n_volumes.max() > 1:
        info["directions"].update(average.description())
        return average, info
    if used == "average":
        info["directions"]["used"] = "all"
        info["directions"]["note"] = "no shell holds several volumes: nothing to average"
    info["directions"]["noise_model_of_fitted"] = (
        "every volume with the series' noise level" + (
            "; volumes of one shell along different directions are fitted by one isotropic signal, so the "
            "tissue's anisotropy counts as misfit" if several else ""))
    return None, info


class UncertaintyNotSupported(ValueError):
    """``uncertainty=True`` with an estimator that reports no standard deviations."""


def _check_uncertainty(uncertainty, plan: EstimatorPlan, sd_kind: str = "truth") -> bool:
    """``uncertainty`` as a bool; an estimator that reports no SDs, or none of ``sd_kind``, is
    refused before any voxel is fitted."""
    if not isinstance(uncertainty, (bool, np.bool_)):
        raise TypeError(f"uncertainty must be True or False, got {uncertainty!r}")
    if sd_kind not in ("truth", "label"):
        raise ValueError(f"sd_kind must be 'truth' or 'label', got {sd_kind!r}")
    if uncertainty and plan.estimator.reports_sd:
        # an estimator that says nothing about its SD's kind reports an error bar (the MLE)
        kind = getattr(plan.estimator, "sd_kind", "truth")
        if sd_kind == "truth" and kind != "truth":
            raise UncertaintyNotSupported(
                f"uncertainty: the SD of {plan.label} was never calibrated against the truth (it is the spread "
                "around its training label, not an error bar); ask for it by that name with --sd-kind label "
                "(fit_volume(..., sd_kind='label')), or use the MLE or a network trained on simulations with this "
                "version (their SDs are calibrated on held-out simulations)")
        if sd_kind == "label" and not callable(getattr(plan.estimator, "label_sd_method", None)):
            raise ValueError(f"sd_kind='label': {plan.label} has no label SD; its SD is an error bar against "
                             "the truth (sd_kind='truth')")
    if uncertainty and not plan.estimator.reports_sd:
        raise UncertaintyNotSupported(
            f"uncertainty: {plan.label} ({type(plan.estimator).__name__}) does not report standard deviations "
            "(its reports_sd is false: predict(..., return_sd=True) has none to give); use the MLE or a network "
            "trained with an uncertainty head or as an ensemble")
    return bool(uncertainty)


def _sd_method(plan: EstimatorPlan, sd_kind: str = "truth") -> str:
    """What the SD is: the estimator's own words (``sd_method``, or ``label_sd_method()`` for
    ``sd_kind="label"``) where it has them."""
    if sd_kind == "label":
        return plan.estimator.label_sd_method()
    return (getattr(plan.estimator, "sd_method", None)
            or f"standard deviation reported by the {plan.record.get('kind')} (predict(signals, return_sd=True))")


def _fit_rows(signals, bvals, plan: EstimatorPlan, model, sigma, scale, device, counts, uncertainty=False,
              sigma_scale=None, sd_kind="truth"):
    """Parameters (n, P) float32, status codes (n,) and, with ``uncertainty``, ``(sd, sd reason
    codes)`` (n, P) of one chunk of voxel rows (else None)."""
    n = signals.shape[0]
    nonfinite = ~np.isfinite(signals)
    negative = np.zeros_like(nonfinite)
    np.less(signals, 0, out=negative, where=~nonfinite)
    counts["nonfinite"] += int(nonfinite.sum())
    counts["negative"] += int(negative.sum())
    # a magnitude (Rician) sample cannot be negative; a real-valued (Gaussian) one can
    unusable = nonfinite | (negative if plan.magnitude else False)
    clean = np.where(unusable, np.float32(0), signals)

    params = np.full((n, model.n_params), np.nan, dtype=np.float32)
    codes = np.zeros(n, dtype=np.uint8)
    sd = np.full((n, model.n_params), np.nan, dtype=np.float32)
    sd_codes = np.full((n, model.n_params), 6, dtype=np.uint8)
    codes[~(np.where(unusable, -np.inf, clean) > 0).any(-1)] = 3
    todo = codes == 0

    # voxels with the same pattern of unusable samples are estimated together on the usable
    # b-values; the complete voxels (usually nearly all) form one group without sorting
    groups = []
    complete_rows = np.flatnonzero(todo & ~unusable.any(-1))
    if complete_rows.size:
        groups.append((complete_rows, np.zeros(unusable.shape[1], dtype=bool)))
    gap_rows = np.flatnonzero(todo & unusable.any(-1))
    if gap_rows.size:
        patterns, inverse = np.unique(unusable[gap_rows], axis=0, return_inverse=True)
        inverse = inverse.ravel()
        groups += [(gap_rows[inverse == p], pattern) for p, pattern in enumerate(patterns)]
    for rows, pattern in groups:
        keep = ~pattern
        complete = bool(keep.all())
        if not complete and not plan.fits_scan_protocol:
            codes[rows] = 6  # an estimator trained for a protocol needs all of it
            continue
        if np.unique(bvals[keep]).size < model.n_params:
            codes[rows] = 5
            continue
        block = clean[np.ix_(rows, np.flatnonzero(keep))]
        voxel_sigma = sigma if sigma is None or np.ndim(sigma) == 0 else sigma[rows]
        block_scale = None if sigma_scale is None else sigma_scale[keep]
        estimate, errors = _estimate(plan, block, bvals[keep], voxel_sigma, scale, device, uncertainty, block_scale,
                                     sd_kind)
        valid = np.all(np.isfinite(estimate), axis=-1)
        estimate[~valid] = np.nan
        params[rows] = estimate
        codes[rows] = np.where(valid, 1 if complete else 2, 7)
        if uncertainty:
            block_sd, block_codes = errors
            sd[rows] = np.where(valid[:, None], block_sd, np.nan)
            sd_codes[rows] = np.where(valid[:, None], block_codes, 6)
    return params, codes, ((sd, sd_codes) if uncertainty else None)


def _estimate(plan: EstimatorPlan, signals, bvals, sigma, scale, device, uncertainty=False, sigma_scale=None,
              sd_kind="truth"):
    """``(params (n, P) float32, errors)`` of one block of voxels that share their usable
    measurements ``bvals``; NaN marks an estimate that is not valid. ``errors`` is ``(sd,
    reason codes)`` with ``uncertainty``, else None."""
    estimator = plan.for_measurements(bvals, sigma)
    accepts_scale = "sigma_scale" in getattr(estimator, "get_params", dict)()
    if sigma_scale is not None and plan.fits_scan_protocol and accepts_scale:
        # the per-shell average: each averaged measurement's own noise level (sigma / sqrt(N))
        estimator.set_params(sigma_scale=sigma_scale)
    inputs = signals if plan.order is None else signals[:, plan.order]
    with_reasons = uncertainty and bool(getattr(estimator, "reports_sd_reason", False))
    options = {"return_sd_reason": True} if with_reasons else {}
    if plan.preprocessing is not None:
        # the estimator brings the signals to its training scale and S0 back to the scan's
        # units (one rule for every entry point); a global scale is the whole mask's
        options["signal_scale"] = "auto" if scale is None else scale
    if uncertainty and sd_kind != "truth":
        options["sd_kind"] = sd_kind
    result = estimator.predict(inputs, device=None if device is None else str(device), return_sd=uncertainty,
                               **options)
    if with_reasons:
        predicted, predicted_sd, reasons = result
    elif uncertainty:
        (predicted, predicted_sd), reasons = result, None
    else:
        predicted = result
    params = np.array(predicted, dtype=np.float32, copy=True)
    if not uncertainty:
        return params, None
    sd = np.array(predicted_sd, dtype=np.float32, copy=True)
    return params, (sd, _sd_codes(sd, reasons))


def _sd_codes(sd, reasons=None) -> np.ndarray:
    """:data:`~qmri_labels.maps.SD_REASON_CODES` of an SD block: reported where finite, else the
    estimator's reason where it gives one, else "not reported by the estimator"."""
    if reasons is None:
        return np.where(np.isfinite(sd), 1, 7).astype(np.uint8)
    reasons = np.asarray(reasons)
    codes = np.full(reasons.shape, 7, dtype=np.uint8)
    for text, code in _SD_REASONS.items():
        codes[reasons == text] = code
    codes[(codes == 1) & ~np.isfinite(sd)] = 7
    return codes
