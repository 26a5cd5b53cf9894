"""Evaluation of estimators on a grid of true parameters x noise repeats.

A :class:`GridSpec` fixes the true parameters (a regular grid over the varied parameters, the
others held fixed), the protocol, the noise and the number of noise repeats per grid point.
:func:`evaluate_grid` simulates the noisy signals in chunks of whole grid points, passes the
*same* signals to every estimator (so that comparisons are paired) and keeps only per-point
statistics, so memory stays bounded by the chunk size whatever the grid and repeats.

Noise is deterministic: grid point ``g`` draws its repeats from NumPy's PCG64 seeded with
``(seed, g)``, so a point's signals do not depend on the chunk size or on which other points
are evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from qmri_labels.physics import get_model
from qmri_labels.physics.noise import NOISE_TYPES, add_noise, sigma_from_snr

#: Epstein et al.'s IVIM protocol (s/mm^2); equal to ``qmri_labels.data.EPSTEIN_BVALUES``.
_EPSTEIN_BVALUES = (0.0, 10.0, 20.0, 30.0, 50.0, 80.0, 100.0, 200.0, 400.0, 800.0)


def _default_axes() -> dict:
    from qmri_labels.data.priors import UniformPrior

    support = UniformPrior().support
    names = get_model("ivim").param_names
    return {n: tuple(np.linspace(support[0, i], support[1, i], 10).tolist()) for i, n in enumerate(names) if n != "S0"}


@dataclass
class GridSpec:
    """True-parameter grid x noise repeats on which estimators are evaluated.

    Parameters
    ----------
    model : str
        Signal model name (``"ivim"``, ``"monoexp"``).
    protocol : tuple of float
        b-values in s/mm^2 (or the model's protocol).
    axes : dict
        ``name -> values``: the grid values of each varied parameter (model units). The grid is
        the Cartesian product of the axes, in the model's parameter order (last varied
        parameter fastest). Default (IVIM): 10 values each of f, D and D* spanning the support
        of Epstein et al.'s training prior.
    fixed : dict
        ``name -> value`` for the parameters that are not varied (default ``S0 = 1``).
        Every model parameter must be in exactly one of ``axes`` and ``fixed``.
    repeats : int
        Noise repeats per grid point. The relative standard error of a per-point SD is about
        ``1 / sqrt(2 (R - 1))`` (7 % at R = 100); summaries average over the grid and are far
        more stable.
    snr : float
        ``s0_reference / sigma``.
    noise : {"rician", "gaussian"}
    seed : int
    chunk_size : int
        Upper bound on the number of signals simulated and estimated at once (whole grid
        points per chunk; at least one point).
    s0_reference : float
        The S0 the SNR refers to.
    """

    model: str = "ivim"
    protocol: tuple = _EPSTEIN_BVALUES
    axes: dict = field(default_factory=_default_axes)
    fixed: dict = field(default_factory=lambda: {"S0": 1.0})
    repeats: int = 100
    snr: float = 30.0
    noise: str = "rician"
    seed: int = 0
    chunk_size: int = 65536
    s0_reference: float = 1.0

    def __post_init__(self):
        model = get_model(self.model)
        self.protocol = tuple(float(b) for b in model.validate_protocol(self.protocol))
        names = model.param_names
        self.axes = {str(k): tuple(float(x) for x in np.atleast_1d(np.asarray(v, dtype=np.float64)))
                     for k, v in dict(self.axes).items()}
        self.fixed = {str(k): float(v) for k, v in dict(self.fixed).items()}
        unknown = (set(self.axes) | set(self.fixed)) - set(names)
        if unknown:
            raise ValueError(f"grid names parameters {sorted(unknown)} that model {self.model!r} lacks {names}")
        both = set(self.axes) & set(self.fixed)
        if both:
            raise ValueError(f"parameters {sorted(both)} are both varied (axes) and fixed")
        missing = set(names) - set(self.axes) - set(self.fixed)
        if missing:
            raise ValueError(f"parameters {sorted(missing)} are neither in axes nor in fixed")
        for name, values in self.axes.items():
            if len(values) == 0 or not np.all(np.isfinite(values)):
                raise ValueError(f"grid axis {name!r} must hold at least one finite value")
        for name, value in self.fixed.items():
            if not np.isfinite(value):
                raise ValueError(f"fixed value of {name!r} must be finite, got {value}")
        if self.noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {self.noise!r}")
        if not (np.isfinite(self.snr) and self.snr > 0):
            raise ValueError(f"snr must be finite and > 0, got {self.snr}")
        for attr in ("repeats", "chunk_size"):
            value = getattr(self, attr)
            if int(value) != value or value < 1:
                raise ValueError(f"{attr} must be a positive integer, got {value}")
            setattr(self, attr, int(value))
        if self.repeats < 2:
            raise ValueError("repeats must be >= 2 to estimate a standard deviation")
        self.seed = int(self.seed)
        self.snr = float(self.snr)

    @classmethod
    def for_prior(
        cls,
        support,
        protocol,
        model: str = "ivim",
        points_per_axis: int | dict = 10,
        vary: tuple | list | None = None,
        fixed: dict | None = None,
        margin: float = 0.0,
        **kwargs,
    ) -> "GridSpec":
        """Grid spanning the support of a prior.

        Parameters
        ----------
        support : array_like, shape (2, P)
            Lower (row 0) and upper (row 1) value of each parameter, in the model's order
            (e.g. ``UniformPrior().support`` or ``Dataset.prior_support``).
        protocol : array_like, shape (M,)
        model : str
        points_per_axis : int or dict
            Grid values per varied parameter (a dict sets them per name).
        vary : sequence of str, optional
            Parameters to vary; default all except the model's scale parameter (S0), which is
            fixed at ``s0_reference``.
        fixed : dict, optional
            Values of the parameters not varied; default the scale parameter at
            ``s0_reference`` and the others at the middle of their support.
        margin : float
            Fraction of each range left out at both ends (0 = the grid includes the support's
            edges).
        **kwargs
            Other :class:`GridSpec` fields (``repeats``, ``snr``, ``noise``, ``seed``, ...).
        """
        signal_model = get_model(model)
        names = signal_model.param_names
        support = np.asarray(support, dtype=np.float64)
        if support.shape != (2, len(names)):
            raise ValueError(f"support must have shape (2, {len(names)}) for model {model!r}, got {support.shape}")
        if np.any(~np.isfinite(support)) or np.any(support[0] > support[1]):
            raise ValueError("support must be finite with lower <= upper")
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        scale_name = names[signal_model.scale_index] if signal_model.scale_index is not None else None
        if vary is None:
            vary = [n for n in names if n != scale_name]
        unknown = set(vary) - set(names)
        if unknown:
            raise ValueError(f"vary names unknown parameters {sorted(unknown)}; model has {names}")
        axes = {}
        for i, name in enumerate(names):
            if name not in vary:
                continue
            n_points = points_per_axis.get(name, 10) if isinstance(points_per_axis, dict) else points_per_axis
            if int(n_points) != n_points or n_points < 1:
                raise ValueError(f"points_per_axis must be a positive integer, got {n_points} for {name}")
            lo, hi = support[:, i]
            width = hi - lo
            axes[name] = tuple(np.linspace(lo + margin * width, hi - margin * width, int(n_points)).tolist())
        s0_reference = float(kwargs.get("s0_reference", 1.0))
        fixed_values = {}
        for i, name in enumerate(names):
            if name in axes:
                continue
            if fixed and name in fixed:
                fixed_values[name] = float(fixed[name])
            elif name == scale_name:
                fixed_values[name] = s0_reference
            else:
                fixed_values[name] = float(support[:, i].mean())
        return cls(model=model, protocol=tuple(np.asarray(protocol, dtype=np.float64).tolist()), axes=axes,
                   fixed=fixed_values, **kwargs)

    # ------------------------------------------------------------------ derived quantities
    @property
    def param_names(self) -> tuple[str, ...]:
        return get_model(self.model).param_names

    @property
    def varied(self) -> tuple[str, ...]:
        """Names of the varied parameters, in the model's order."""
        return tuple(n for n in self.param_names if n in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Grid shape over the varied parameters."""
        return tuple(len(self.axes[n]) for n in self.varied)

    @property
    def n_points(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def sigma(self) -> float:
        return sigma_from_snr(self.snr, self.s0_reference)

    @property
    def truth(self) -> np.ndarray:
        """True parameters ``(G, P)`` float64, in the model's order (last varied axis fastest)."""
        names = self.param_names
        mesh = np.meshgrid(*[np.asarray(self.axes[n]) for n in self.varied], indexing="ij")
        theta = np.empty((self.n_points, len(names)))
        k = 0
        for i, name in enumerate(names):
            if name in self.axes:
                theta[:, i] = mesh[k].ravel()
                k += 1
            else:
                theta[:, i] = self.fixed[name]
        return theta

    def signals(self, points: np.ndarray | slice | None = None) -> np.ndarray:
        """Noisy signals ``(n_points, repeats, M)`` float64 for the given grid points.

        The same point always gets the same noise (its generator is seeded by ``(seed, g)``).
        """
        index = np.arange(self.n_points)[points if points is not None else slice(None)]
        index = np.atleast_1d(index)
        model = get_model(self.model)
        theta = self.truth[index]
        with torch.no_grad():
            clean = model.forward(torch.from_numpy(theta), torch.tensor(self.protocol, dtype=torch.float64)).numpy()
        out = np.empty((len(index), self.repeats, len(self.protocol)))
        sigma = self.sigma
        for k, g in enumerate(index):
            rng = np.random.Generator(np.random.PCG64([self.seed, int(g)]))
            out[k] = add_noise(np.broadcast_to(clean[k], (self.repeats, clean.shape[-1])), sigma, self.noise, rng)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["protocol"] = list(self.protocol)
        d["axes"] = {k: list(v) for k, v in self.axes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GridSpec":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GridSpec fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "GridSpec":
        return dataclasses.replace(self, **changes)


@dataclass
class GridResult:
    """Per-grid-point statistics of several estimators.

    Attributes
    ----------
    grid : GridSpec
    truth : ndarray (G, P)
        True parameters.
    param_names : tuple of str
    methods : list of str
    mean, bias, sd, rmse : dict[str, ndarray (G, P)]
        Per method: mean estimate over the repeats, ``mean - truth``, SD over the repeats
        (ddof = 1) and ``sqrt(mean((estimate - truth)^2))``. Non-finite estimates are left
        out of every statistic.
    valid_fraction : dict[str, ndarray (G,)]
        Fraction of repeats at which every parameter estimate was finite.
    spearman : dict[str, ndarray (G, P, P)]
        Spearman correlation between the estimated parameters over the noise repeats of each
        point (NaN where an estimate does not vary).
    crlb_sd : ndarray (G, P) or None
        Cramer-Rao lower bound on the SD of an unbiased estimator.
    timings : dict[str, float]
        Seconds spent in each estimator's ``predict``.
    calibration : CalibrationResult or None
        Calibration of the reported SDs of the methods evaluated with ``with_sd``
        (:mod:`qmri_labels.analysis.calibration`); None when none was asked for.
    """

    grid: GridSpec
    truth: np.ndarray
    param_names: tuple
    methods: list
    mean: dict
    bias: dict
    sd: dict
    rmse: dict
    valid_fraction: dict
    spearman: dict = field(default_factory=dict)
    crlb_sd: np.ndarray | None = None
    timings: dict = field(default_factory=dict)
    calibration: Any = None

    @property
    def units(self) -> dict:
        return get_model(self.grid.model).units

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per grid point, method and parameter.

        Columns: ``point``, ``true_<name>`` for every parameter, ``method``, ``parameter``,
        ``truth``, ``mean``, ``bias``, ``sd``, ``rmse``, ``crlb_sd``, ``valid_fraction``.
        """
        G, P = self.truth.shape
        frames = []
        truth_cols = {f"true_{n}": np.repeat(self.truth[:, i], P) for i, n in enumerate(self.param_names)}
        for method in self.methods:
            frames.append(pd.DataFrame({
                "snr": self.grid.snr,
                "point": np.repeat(np.arange(G), P),
                **truth_cols,
                "method": method,
                "parameter": np.tile(np.asarray(self.param_names, dtype=object), G),
                "truth": self.truth.ravel(),
                "mean": self.mean[method].ravel(),
                "bias": self.bias[method].ravel(),
                "sd": self.sd[method].ravel(),
                "rmse": self.rmse[method].ravel(),
                "crlb_sd": (self.crlb_sd.ravel() if self.crlb_sd is not None else np.full(G * P, np.nan)),
                "valid_fraction": np.repeat(self.valid_fraction[method], P),
            }))
        return pd.concat(frames, ignore_index=True)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, grid: GridSpec) -> "GridResult":
        """Rebuild a result from :meth:`to_frame` output (Spearman matrices are not kept)."""
        required = {"point", "method", "parameter", "truth", "mean", "bias", "sd", "rmse", "valid_fraction"}
        missing = required - set(frame.columns)
        if missing:
            raise ValueError(f"grid table lacks columns {sorted(missing)}")
        if "snr" in frame:
            snrs = sorted(set(frame["snr"].astype(float)))
            if len(snrs) > 1:
                raise ValueError(f"grid table holds several SNRs {snrs}: pass the rows of one "
                                 "(frame[frame.snr == s]) with grid.replace(snr=s)")
            if snrs and not math.isclose(snrs[0], grid.snr, rel_tol=1e-9):
                raise ValueError(f"grid table is at SNR {snrs[0]:g}, the grid spec at SNR {grid.snr:g}")
        names = grid.param_names
        methods = list(dict.fromkeys(frame["method"]))
        G, P = grid.n_points, len(names)
        pos = {n: i for i, n in enumerate(names)}
        out = {k: {} for k in ("mean", "bias", "sd", "rmse")}
        valid = {}
        truth = np.full((G, P), np.nan)
        crlb_sd = np.full((G, P), np.nan)
        for method, sub in frame.groupby("method", sort=False):
            pts = sub["point"].to_numpy(int)
            cols = np.array([pos[p] for p in sub["parameter"]])
            for key in out:
                arr = np.full((G, P), np.nan)
                arr[pts, cols] = sub[key].to_numpy(float)
                out[key][method] = arr
            truth[pts, cols] = sub["truth"].to_numpy(float)
            if "crlb_sd" in sub:
                crlb_sd[pts, cols] = sub["crlb_sd"].to_numpy(float)
            vf = np.full(G, np.nan)
            vf[pts] = sub["valid_fraction"].to_numpy(float)
            valid[method] = vf
        return cls(grid=grid, truth=truth, param_names=tuple(names), methods=methods, valid_fraction=valid,
                   crlb_sd=None if np.all(np.isnan(crlb_sd)) else crlb_sd, **out)


    def select(self, methods) -> "GridResult":
        """The result restricted to ``methods`` (in that order)."""
        methods = list(methods)
        missing = [m for m in methods if m not in self.methods]
        if missing:
            raise ValueError(f"methods {missing} are not in this result {self.methods}")
        pick = lambda d: {m: d[m] for m in methods if m in d}  # noqa: E731
        return dataclasses.replace(self, methods=methods, mean=pick(self.mean), bias=pick(self.bias), sd=pick(self.sd),
                                   rmse=pick(self.rmse), valid_fraction=pick(self.valid_fraction),
                                   spearman=pick(self.spearman), timings=pick(self.timings),
                                   calibration=None if self.calibration is None else self.calibration.select(methods))


def grid_snrs(snr) -> list[float]:
    """A checked list of evaluation SNRs from a number or a sequence of numbers."""
    values = [snr] if isinstance(snr, (int, float, np.integer, np.floating)) else list(snr)
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
                np.isfinite(value) and value > 0):
            raise ValueError(f"evaluation SNRs must be finite numbers > 0, got {value!r}")
        out.append(float(value))
    if not out:
        raise ValueError("at least one evaluation SNR is needed")
    return list(dict.fromkeys(out))


def evaluate_snrs(estimators, grid: GridSpec, snrs, **kwargs) -> dict:
    """:func:`evaluate_grid` at each SNR of ``snrs``: ``{snr: GridResult}``.

    Parameters
    ----------
    estimators : dict or callable
        Estimators by name, or a function ``grid -> dict`` for estimators that depend on the
        noise level (an MLE fitter told the true sigma).
    grid : GridSpec
        The grid; only its SNR changes (noise seeds stay, so SNRs are compared on the same
        standard-normal draws).
    snrs : float or sequence of float
    **kwargs
        Passed to :func:`evaluate_grid`.
    """
    out = {}
    for snr in grid_snrs(snrs):
        g = grid.replace(snr=snr)
        out[snr] = evaluate_grid(estimators(g) if callable(estimators) else estimators, g, **kwargs)
    return out


def _predict(estimator, signals: np.ndarray) -> np.ndarray:
    if hasattr(estimator, "predict"):
        out = estimator.predict(signals)
    elif callable(estimator):
        out = estimator(signals)
    else:
        raise ValueError(f"estimator {estimator!r} has no predict(signals) method and is not callable")
    if hasattr(out, "params") and not isinstance(out, np.ndarray):
        out = out.params  # an MLEFit-like result
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


def _point_statistics(est: np.ndarray, truth: np.ndarray):
    """Statistics over the repeats axis of ``est`` (n, R, P) against ``truth`` (n, P)."""
    finite = np.isfinite(est)
    count = finite.sum(axis=1)
    # shift by one finite sample so that a constant estimate gives SD exactly 0 (no round-off)
    first = np.argmax(finite, axis=1)[:, None, :]  # index of the first finite repeat (0 if none)
    shift = np.take_along_axis(est, first, axis=1)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        centred = np.where(finite, est - shift, 0.0)
        mean_centred = centred.sum(axis=1) / count
        mean = shift[:, 0] + mean_centred
        dev = np.where(finite, centred - mean_centred[:, None, :], 0.0)
        sd = np.sqrt((dev * dev).sum(axis=1) / (count - 1))
        err = np.where(finite, est - truth[:, None, :], 0.0)
        rmse = np.sqrt((err * err).sum(axis=1) / count)
    sd = np.where(count >= 2, sd, np.nan)
    valid = np.all(finite, axis=2).mean(axis=1)
    return mean, sd, rmse, valid


def _spearman_over_repeats(est: np.ndarray) -> np.ndarray:
    """Spearman correlation matrices ``(n, P, P)`` over the repeats of each point."""
    from scipy.stats import rankdata

    n, R, P = est.shape
    ranks = rankdata(est, axis=1)  # ties get average ranks; NaNs propagate below
    ranks = ranks - ranks.mean(axis=1, keepdims=True)
    cov = np.einsum("nrp,nrq->npq", ranks, ranks)
    norm = np.sqrt(np.einsum("npp->np", cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / (norm[:, :, None] * norm[:, None, :])
    bad = ~np.all(np.isfinite(est), axis=(1, 2))
    corr[bad] = np.nan
    return corr


def evaluate_grid(estimators: dict, grid: GridSpec, progress: bool = False, crlb: bool = True,
                  with_sd=()) -> GridResult:
    """Evaluate estimators on every grid point with ``grid.repeats`` noise repeats.

    Parameters
    ----------
    estimators : dict[str, object]
        ``name -> estimator``; each has ``predict(signals (N, M) float32) -> (N, P)`` (an
        array, a torch tensor, or an object with ``.params`` such as an ``MLEFit``), or is a
        callable with that signature. Estimates are in the model's parameter order and units.
    grid : GridSpec
    progress : bool
        Show a progress bar over the chunks.
    crlb : bool
        Also compute the Cramer-Rao lower bound at each grid point.
    with_sd : collection of str
        Methods whose SDs are evaluated in the same pass: each is called as
        ``predict(signals, return_sd=True) -> (params, sd)`` (or is a callable returning that)
        and its SDs' calibration lands in :attr:`GridResult.calibration`.

    Returns
    -------
    GridResult
    """
    import time

    if not isinstance(grid, GridSpec):
        raise ValueError(f"grid must be a GridSpec, got {type(grid).__name__}")
    if not estimators:
        raise ValueError("estimators must name at least one estimator")
    names = list(estimators)
    with_sd = list(dict.fromkeys(with_sd or ()))
    unknown = [m for m in with_sd if m not in names]
    if unknown:
        raise ValueError(f"with_sd names methods {unknown} that are not among the estimators {names}")
    calibration = None
    if with_sd:
        from qmri_labels.analysis.calibration import CalibrationAccumulator

        calibration = CalibrationAccumulator(with_sd, grid)
    truth = grid.truth
    G, P = truth.shape
    points_per_chunk = max(1, grid.chunk_size // grid.repeats)
    n_chunks = math.ceil(G / points_per_chunk)
    stats = {k: {m: np.empty((G, P)) for m in names} for k in ("mean", "sd", "rmse")}
    valid = {m: np.empty(G) for m in names}
    spearman = {m: np.empty((G, P, P)) for m in names}
    timings = dict.fromkeys(names, 0.0)
    chunks = range(n_chunks)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"grid {G} points x {grid.repeats} repeats", unit="chunk")
    for c in chunks:
        lo, hi = c * points_per_chunk, min(G, (c + 1) * points_per_chunk)
        signals = grid.signals(slice(lo, hi)).astype(np.float32)
        n = hi - lo
        flat = signals.reshape(n * grid.repeats, -1)
        for m in names:
            start = time.perf_counter()
            if m in with_sd:
                from qmri_labels.analysis.calibration import _predict_with_sd

                est, reported_sd = _predict_with_sd(estimators[m], flat)
            else:
                est = _predict(estimators[m], flat)
            timings[m] += time.perf_counter() - start
            if m in with_sd:
                calibration.add(m, lo, hi, est, reported_sd)
            if est.shape != (n * grid.repeats, P):
                raise ValueError(f"estimator {m!r} returned shape {est.shape}, expected {(n * grid.repeats, P)} "
                                 f"(parameters {grid.param_names})")
            est = est.reshape(n, grid.repeats, P)
            mean, sd, rmse, vf = _point_statistics(est, truth[lo:hi])
            stats["mean"][m][lo:hi] = mean
            stats["sd"][m][lo:hi] = sd
            stats["rmse"][m][lo:hi] = rmse
            valid[m][lo:hi] = vf
            spearman[m][lo:hi] = _spearman_over_repeats(est)
    bias = {m: stats["mean"][m] - truth for m in names}
    bound = None
    if crlb:
        from qmri_labels.analysis.crlb import crlb as crlb_fn

        bound = crlb_fn(grid.model, truth, np.asarray(grid.protocol), grid.sigma, grid.noise)
    return GridResult(grid=grid, truth=truth, param_names=grid.param_names, methods=names, mean=stats["mean"],
                      bias=bias, sd=stats["sd"], rmse=stats["rmse"], valid_fraction=valid, spearman=spearman,
                      crlb_sd=bound, timings=timings,
                      calibration=None if calibration is None else calibration.result())
