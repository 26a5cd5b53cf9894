"""Evaluation of estimators on a grid of true parameters x noise repeats.

:func:`evaluate_grid` takes the noisy signals of a :class:`~qmri_labels.data.grid.GridSpec` in
chunks of whole grid points (:meth:`~qmri_labels.data.grid.GridSpec.chunks`), passes the *same*
signals to every estimator (so that comparisons are paired) and keeps only per-point
statistics, so memory stays bounded by the chunk size whatever the grid and repeats.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from qmri_labels.analysis.calibration import CalibrationAccumulator, predict_with_sd
from qmri_labels.analysis.crlb import crlb as crlb_bound
from qmri_labels.data.grid import GridSpec
from qmri_labels.physics import get_model


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
    if not isinstance(grid, GridSpec):
        raise ValueError(f"grid must be a GridSpec, got {type(grid).__name__}")
    if not estimators:
        raise ValueError("estimators must name at least one estimator")
    names = list(estimators)
    with_sd = list(dict.fromkeys(with_sd or ()))
    unknown = [m for m in with_sd if m not in names]
    if unknown:
        raise ValueError(f"with_sd names methods {unknown} that are not among the estimators {names}")
    calibration = CalibrationAccumulator(with_sd, grid) if with_sd else None
    truth = grid.truth
    G, P = truth.shape
    stats = {k: {m: np.empty((G, P)) for m in names} for k in ("mean", "sd", "rmse")}
    valid = {m: np.empty(G) for m in names}
    spearman = {m: np.empty((G, P, P)) for m in names}
    timings = dict.fromkeys(names, 0.0)
    for lo, hi, flat in grid.chunks(progress, "grid"):
        n = hi - lo
        for m in names:
            start = time.perf_counter()
            if m in with_sd:
                est, reported_sd = predict_with_sd(estimators[m], flat)
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
        bound = crlb_bound(grid.model, truth, np.asarray(grid.protocol), grid.sigma, grid.noise)
    return GridResult(grid=grid, truth=truth, param_names=grid.param_names, methods=names, mean=stats["mean"],
                      bias=bias, sd=stats["sd"], rmse=stats["rmse"], valid_fraction=valid, spearman=spearman,
                      crlb_sd=bound, timings=timings,
                      calibration=None if calibration is None else calibration.result())
