"""Batched maximum-likelihood fits of voxel-wise signal models: the API (:func:`fit_mle`) and
its result (:class:`MLEFit`).

All voxels are fitted at once in torch, on the CPU or a CUDA device, in chunks of bounded
memory, by the projected Levenberg-Marquardt solver of :mod:`qmri_labels.fitting.lm` (robust
starts, bounds by projection). Voxels that have converged drop out of the batch, so the cost
follows the hard voxels, not the batch size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from qmri_labels.fitting.likelihood import NOISE_MODELS, full_nll
from qmri_labels.fitting.lm import fit_chunk
from qmri_labels.fitting.noise import sigma_from_repeats
from qmri_labels.fitting.uncertainty import MLEUncertainty, fisher_uncertainty
from qmri_labels.physics import SignalModel, display_unit, get_model

#: version of the fitting algorithm: part of every cache key of fitted labels, raised whenever
#: a change can move the estimates (starts, schedule, tolerances)
FITTER_VERSION = 4

#: peak working memory per (voxel x start x (measurements + parameters) x (parameters + 2)),
#: in bytes: 24 measured as the peak RSS of a 200k-voxel float32 chunk on CPU, rounded up; used to
#: size chunks so that memory stays bounded whatever the number of voxels
_BYTES_PER_ELEMENT = 32
#: largest CPU chunk: beyond ~65k voxels the working arrays leave the caches and throughput
#: drops (2-core CPU, 10 b-values: 69k voxels/s at 65k-voxel chunks, 53k at 100k; measured with
#: benchmarks/mle_throughput.py --chunk-size)
_CPU_CHUNK = 65536
#: default working-memory bound of one chunk on the CPU, and the most a GPU chunk takes
_CPU_MEMORY_MB, _GPU_MEMORY_CAP_MB = 1024.0, 16384.0


def _default_memory_mb(device: torch.device) -> float:
    if device.type != "cuda":
        return _CPU_MEMORY_MB
    free, _ = torch.cuda.mem_get_info(device)
    return max(_CPU_MEMORY_MB, min(_GPU_MEMORY_CAP_MB, free / 4 / 2**20))


@dataclass
class MLEFit:
    """Result of :func:`fit_mle`.

    Attributes
    ----------
    model : SignalModel
    params : ndarray (..., n_params)
        Estimates in the model's parameter order; NaN for voxels that could not be fitted.
    nll : ndarray (...)
        Negative log-likelihood at the estimate, all constants included (``inf`` for a Rician
        voxel with an exact zero sample, NaN for invalid voxels).
    converged : ndarray of bool (...)
        The iteration met its tolerance (predicted further decrease of the NLL below ``tol``)
        before ``max_iter``.
    stalled : ndarray of bool (...)
        The iteration stopped without meeting its tolerance because no step could make
        progress (damping at its ceiling, or steps below float resolution). Voxels neither
        converged nor stalled ran out of iterations.
    valid : ndarray of bool (...)
        The voxel's input was usable (finite, not all zero, non-negative for Rician noise).
    sigma : ndarray (...)
        Noise level used (or estimated) for each voxel.
    sigma_estimated : bool
        True when sigma was not given and the fitter estimated it.
    sigma_method : str
        How sigma was obtained.
    n_iter : ndarray of int (...)
        Iterations along the path of the start that gave the estimate (its race included).
    invalid_reason : ndarray of str (...)
        Empty for valid voxels, otherwise why the voxel was skipped.
    uncertainty : MLEUncertainty or None
        Standard errors and the admissible box (``fit_mle(..., uncertainty=True)``); see
        :attr:`sd`, :attr:`sd_reason` and :meth:`interval`.
    """

    model: SignalModel
    params: np.ndarray
    nll: np.ndarray
    converged: np.ndarray
    valid: np.ndarray
    sigma: np.ndarray
    sigma_estimated: bool = False
    sigma_method: str = "given"
    n_iter: np.ndarray | None = None
    stalled: np.ndarray | None = None
    invalid_reason: np.ndarray | None = None
    settings: dict = field(default_factory=dict)
    uncertainty: MLEUncertainty | None = None

    @property
    def sd(self) -> np.ndarray:
        """Standard errors ``(..., P)`` in the model's parameter order (NaN: see :attr:`sd_reason`)."""
        return self._require_uncertainty().sd

    @property
    def sd_reason(self) -> np.ndarray:
        """Why a standard error is NaN (``""`` where it is a number), ``(..., P)``."""
        return self._require_uncertainty().reason

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Wald interval ``(low, high)``, each ``(..., P)``, inside the admissible box."""
        return self._require_uncertainty().interval(self.params, level)

    def _require_uncertainty(self) -> MLEUncertainty:
        if self.uncertainty is None:
            raise ValueError("this fit has no standard errors: call fit_mle(..., uncertainty=True)")
        return self.uncertainty

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.model.param_names

    def __getitem__(self, name: str) -> np.ndarray:
        return self.params[..., self.model.index(name)]

    def __getattr__(self, name: str) -> np.ndarray:
        # named properties (fit.S0, fit.f, fit.D, fit.Dstar) for any model's parameters
        if name.startswith("_") or name in {"model", "params"}:
            raise AttributeError(name)
        if name in self.model.param_names:
            return self[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __len__(self) -> int:
        return self.params.shape[0]

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{parameter name: estimates}``."""
        return {name: self[name] for name in self.param_names}


def fit_mle(
    signals,
    bvalues,
    model: str | SignalModel = "ivim",
    noise: str = "rician",
    sigma=None,
    bounds=None,
    device=None,
    *,
    n_starts: int = 5,
    probe_iter: int = 6,
    max_iter: int = 100,
    tol: float = 1e-6,
    chunk_size: int | None = None,
    max_memory_mb: float | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    uncertainty: bool = False,
    bvecs=None,
    sigma_scale=None,
) -> MLEFit:
    """Maximum-likelihood estimates of model parameters for many voxels at once.

    Parameters
    ----------
    signals : array_like (..., M)
        Measured signals (magnitude for Rician noise). Any leading shape.
    bvalues : array_like (M,)
        Protocol: b-values in s/mm^2, or echo times in ms for the relaxation models.
    model : str or SignalModel
        ``"ivim"`` (S0, f, D, Dstar), ``"monoexp"`` (S0, D), ``"t2"`` (S0, T2 in ms; echo
        times in ms), ``"t2star"`` (S0, T2star in ms), ``"fatwater"`` (S0, PDFF, R2star in
        1/s; echo times in ms, 3 T; ``"fatwater_1.5t"`` at 1.5 T), or a model instance.
    noise : {"rician", "gaussian"}
    sigma : float, array_like (...) or None
        Noise standard deviation per channel, scalar or one per voxel. ``None``: for Gaussian
        noise the estimates do not depend on sigma and it is estimated per voxel from the
        residual (``sigma^2 = RSS / M``); for Rician noise it is estimated from measurements
        that repeat each other (b = 0 volumes; at b > 0 only with ``bvecs`` and one
        direction, see :func:`qmri_labels.fitting.noise.sigma_from_repeats`), pooled over
        voxels, otherwise a ``ValueError`` asks for it.
    bounds : array_like (2, n_params), dict or None
        Lower and upper bounds in the model's parameter order, or ``{name: (low, high)}`` for
        some parameters. ``None``: the model's default bounds, except for the signal scale
        (S0), which is bounded by ``[0, h x`` the voxel's mean signal at the lowest b-value ``]``
        (``h = model.scale_headroom(protocol)``, 2 for diffusion models) so that unnormalised
        data need no bounds. When an estimate sits on a bound in most voxels a
        ``UserWarning`` names the parameter: the bounds (or the protocol's units) likely do
        not suit the data.
    device : str or torch.device, optional
        ``"cpu"`` (default) or a CUDA device.
    n_starts : int
        Starting points per voxel (the first is the segmented estimate). For fat-water the
        first two are a water- and a fat-dominant start, each run to convergence, and the lower
        NLL wins (``SignalModel.converge_every_start``).
    probe_iter : int
        Iterations run from every start before the best start per voxel is kept (a start
        whose NLL falls 10 behind its voxel's best stops earlier).
    max_iter : int
        Maximum iterations per voxel.
    tol : float
        Convergence tolerance on the predicted decrease of the NLL (absolute).
    chunk_size : int, optional
        Voxels per batch; by default chosen so that working memory stays below
        ``max_memory_mb``, and at most 65536 on the CPU, where larger chunks fall out of the
        caches. Memory is bounded by the chunk, not by the number of voxels.
    max_memory_mb : float, optional
        Working-memory bound of one chunk. Default: 1024 on the CPU; on a GPU a quarter of its
        free memory (at most 16 GiB), because there the fitter is bound by kernel launches, not
        by arithmetic, and larger chunks launch fewer kernels per voxel (on an H200, one chunk
        of 1,000,000 IVIM voxels fits 4.4x faster than chunks of 1 GiB).
    dtype : torch.dtype
        Working precision of the iterations; the reported NLL is always evaluated in float64.
    progress : bool
        Show a progress bar over chunks.
    uncertainty : bool
        Also compute Wald standard errors from the Fisher information at the estimate
        (``fit.sd``, ``fit.interval(level)``; see :mod:`qmri_labels.fitting.uncertainty`).
    bvecs : array_like (3, M), optional
        Gradient directions, for the estimate of sigma from repeated measurements.
    sigma_scale : array_like (M,), optional
        Noise SD of each measurement relative to ``sigma`` (e.g. ``1 / sqrt(N)`` for the
        per-shell average of N volumes, :class:`qmri_labels.physics.protocol.ShellAverage`);
        default 1 for every measurement.

    Returns
    -------
    MLEFit

    Raises
    ------
    ValueError
        On inconsistent shapes, non-finite or non-positive sigma, bad bounds, a missing sigma
        for Rician noise that cannot be estimated, or when no voxel is usable.
    """
    model = get_model(model)
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    bvalues = model.validate_protocol(bvalues)
    signals_np = np.asarray(signals.detach().cpu() if isinstance(signals, torch.Tensor) else signals, dtype=np.float64)
    if signals_np.ndim == 0 or signals_np.shape[-1] != bvalues.size:
        raise ValueError(
            f"the number of {model.protocol_name} ({bvalues.size}) differs from the signal length "
            f"(last axis of signals with shape {signals_np.shape})"
        )
    lead_shape = signals_np.shape[:-1]
    flat = signals_np.reshape(-1, bvalues.size)
    n_vox = flat.shape[0]
    if n_vox == 0:
        raise ValueError("signals hold no voxel")

    valid, reason = _validate_voxels(flat, noise)
    if not valid.any():
        counts = {r: int((reason == r).sum()) for r in np.unique(reason)}
        raise ValueError(f"no voxel can be fitted: {counts}")

    sigma_flat, sigma_estimated, sigma_method = _resolve_sigma(sigma, flat, valid, bvalues, noise, lead_shape, bvecs)
    measurement_scale = None
    if sigma_scale is not None:
        measurement_scale = np.asarray(sigma_scale, dtype=np.float64).ravel()
        if measurement_scale.size != bvalues.size or not np.all(np.isfinite(measurement_scale) & (measurement_scale > 0)):
            raise ValueError(f"sigma_scale must hold {bvalues.size} finite values > 0, got {np.shape(sigma_scale)}")
    lower, upper, scale_relative = _resolve_bounds(model, bounds)
    device = torch.device(device) if device is not None else torch.device("cpu")

    params = np.full((n_vox, model.n_params), np.nan)
    nll = np.full(n_vox, np.nan)
    converged = np.zeros(n_vox, dtype=bool)
    stalled = np.zeros(n_vox, dtype=bool)
    n_iter = np.zeros(n_vox, dtype=np.int64)

    index = np.flatnonzero(valid)
    if chunk_size is None:
        per_voxel = _BYTES_PER_ELEMENT * max(n_starts, 1) * (bvalues.size + model.n_params) * (model.n_params + 2)
        if max_memory_mb is None:
            max_memory_mb = _default_memory_mb(device)
        chunk_size = max(1024, int(max_memory_mb * 2**20 / per_voxel))
        if device.type == "cpu":
            chunk_size = min(chunk_size, _CPU_CHUNK)
    chunks = [index[i : i + chunk_size] for i in range(0, index.size, chunk_size)]
    iterator = chunks
    if progress:
        iterator = tqdm(chunks, desc=f"MLE fit ({model.name}, {noise})", unit="chunk")

    b = torch.as_tensor(bvalues, dtype=dtype, device=device)
    b64 = torch.as_tensor(bvalues)
    # float32 rounding of bounds and of the S0 rescaling must not leave the box
    clip_lo, clip_hi = lower.copy(), upper.copy()
    if scale_relative:
        clip_lo[model.scale_index], clip_hi[model.scale_index] = 0.0, np.inf
    for chunk in iterator:
        y = torch.as_tensor(flat[chunk], dtype=dtype, device=device)
        s = torch.as_tensor(sigma_flat[chunk], dtype=dtype, device=device)[:, None]
        if measurement_scale is not None:
            s = s * torch.as_tensor(measurement_scale, dtype=dtype, device=device)[None, :]
        theta, conv, stall, iters = fit_chunk(
            model, y, b, s, noise, lower, upper, scale_relative, n_starts, probe_iter, max_iter, tol
        )
        params[chunk] = np.clip(theta.double().cpu().numpy(), clip_lo, clip_hi)
        converged[chunk] = conv.cpu().numpy()
        stalled[chunk] = stall.cpu().numpy()
        n_iter[chunk] = iters.cpu().numpy()
        # the reported NLL: float64, exact Bessel function, with the noise level the fit used
        # or (Gaussian noise without sigma) the one it implies
        with torch.no_grad():
            y64 = torch.as_tensor(flat[chunk])
            pred = model.forward(torch.as_tensor(params[chunk]), b64)
            if noise == "gaussian" and sigma is None:
                sigma_flat[chunk] = torch.sqrt(((y64 - pred) ** 2).mean(-1)).clamp_min(1e-12).numpy()
            s64 = torch.as_tensor(sigma_flat[chunk])[:, None]
            if measurement_scale is not None:
                s64 = s64 * torch.as_tensor(measurement_scale)[None, :]
            nll[chunk] = full_nll(y64, pred, s64, noise).numpy()

    _warn_on_bounds(model, params[valid], lower, upper, scale_relative)
    errors = None
    if uncertainty:
        errors = fisher_uncertainty(model, flat, bvalues, params, sigma_flat, noise, lower, upper, scale_relative,
                                    valid, sigma_from_residuals=noise == "gaussian" and sigma is None,
                                    sigma_scale=measurement_scale)
        errors.sd, errors.reason, errors.lower, errors.upper = (
            a.reshape(*lead_shape, model.n_params) for a in (errors.sd, errors.reason, errors.lower, errors.upper))
    return MLEFit(
        model=model,
        params=params.reshape(*lead_shape, model.n_params),
        nll=nll.reshape(lead_shape),
        converged=converged.reshape(lead_shape),
        valid=valid.reshape(lead_shape),
        sigma=sigma_flat.reshape(lead_shape),
        sigma_estimated=sigma_estimated,
        sigma_method=sigma_method,
        n_iter=n_iter.reshape(lead_shape),
        stalled=stalled.reshape(lead_shape),
        invalid_reason=reason.reshape(lead_shape),
        settings={"fitter_version": FITTER_VERSION, "noise": noise, "n_starts": n_starts, "probe_iter": probe_iter,
                  "max_iter": max_iter, "tol": tol, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                  "bounds": None if bounds is None else np.stack([lower, upper]).tolist()},
        uncertainty=errors,
    )


#: fraction of voxels on one bound of one parameter above which fit_mle warns
BOUND_WARNING_FRACTION = 0.5


def _warn_on_bounds(model, params, lower, upper, scale_relative) -> None:
    """Warn when a parameter's estimate sits on one of its bounds for most voxels."""
    if params.shape[0] == 0:
        return
    span = upper - lower
    for i, name in enumerate(model.param_names):
        if scale_relative and i == model.scale_index:
            continue  # bounded per voxel relative to its own signal
        for side, bound, hit in (("lower", lower[i], params[:, i] <= lower[i] + 1e-6 * span[i]),
                                 ("upper", upper[i], params[:, i] >= upper[i] - 1e-6 * span[i])):
            share = float(hit.mean())
            if share > BOUND_WARNING_FRACTION:
                warnings.warn(
                    f"{name} sits on its {side} bound ({bound:g} {display_unit(model.units[name])}) in {share:.0%} of voxels: "
                    f"the bounds or the protocol's units ({model.protocol_name} in {model.protocol_unit}) "
                    f"probably do not suit the data of model {model.name!r}", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# input checks


def _validate_voxels(flat: np.ndarray, noise: str) -> tuple[np.ndarray, np.ndarray]:
    reason = np.full(flat.shape[0], "", dtype=object)
    finite = np.isfinite(flat).all(-1)
    reason[~finite] = "non-finite signal (NaN or Inf)"
    with np.errstate(invalid="ignore"):
        zero = finite & (np.abs(flat) <= 0).all(-1)
        reason[zero] = "all-zero signal"
        if noise == "rician":
            negative = finite & ~zero & (flat < 0).any(-1)
            reason[negative] = "negative magnitude signal"
        else:
            # a Gaussian (real) signal may dip below zero, but its reference level must not
            negative = finite & ~zero & (flat.max(-1) <= 0)
            reason[negative] = "no positive sample"
    valid = reason == ""
    return valid, reason.astype(str)


def _resolve_sigma(sigma, flat, valid, bvalues, noise, lead_shape, bvecs=None):
    n_vox = flat.shape[0]
    if sigma is not None:
        sig = np.asarray(sigma, dtype=np.float64)
        if sig.ndim == 0:
            sig = np.full(n_vox, float(sig))
        else:
            try:
                sig = np.broadcast_to(sig, lead_shape).reshape(-1).copy()
            except ValueError:
                raise ValueError(f"sigma with shape {np.shape(sigma)} does not match the voxels' shape {lead_shape}") from None
        if not np.all(np.isfinite(sig)):
            raise ValueError("sigma contains NaN or Inf")
        if np.any(sig <= 0):
            raise ValueError("sigma must be > 0")
        return sig, False, "given"
    if noise == "gaussian":
        # the least-squares estimates do not depend on sigma; it is estimated afterwards
        return np.ones(n_vox), True, "residual (RSS / M per voxel)"
    estimate = sigma_from_repeats(flat[valid], bvalues, bvecs=bvecs)
    if estimate is None:
        raise ValueError(
            "sigma is required for Rician noise: no measurements repeat each other (b = 0 volumes, or one b-value "
            "and gradient direction given bvecs) to estimate it "
            "from; pass sigma=... (SNR = S0 / sigma, a scalar or one per voxel, e.g. the noise map of "
            "qmri_labels.fitting.noise.estimate_noise) or use noise='gaussian'"
        )
    warnings.warn(f"sigma estimated from repeated b-values (pooled over voxels): {estimate.sigma:.4g}", stacklevel=3)
    return np.full(n_vox, estimate.sigma), True, estimate.description


def _resolve_bounds(model: SignalModel, bounds):
    lower, upper = (row.astype(np.float64) for row in model.default_bounds)
    scale_relative = model.scale_index is not None
    if bounds is None:
        return lower, upper, scale_relative
    if isinstance(bounds, dict):
        for name, (lo, hi) in bounds.items():
            i = model.index(name)
            lower[i], upper[i] = float(lo), float(hi)
            if i == model.scale_index:
                scale_relative = False
    else:
        arr = np.asarray(bounds, dtype=np.float64)
        if arr.shape != (2, model.n_params):
            raise ValueError(
                f"bounds must have shape (2, {model.n_params}) in the order {model.param_names}, got {arr.shape}"
            )
        lower, upper = arr[0].copy(), arr[1].copy()
        scale_relative = False
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise ValueError("bounds must be finite")
    if np.any(lower >= upper):
        bad = [model.param_names[i] for i in np.flatnonzero(lower >= upper)]
        raise ValueError(f"lower bound must be below upper bound for {bad}")
    return lower, upper, scale_relative
