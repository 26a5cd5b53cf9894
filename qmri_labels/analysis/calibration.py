"""Calibration of per-voxel uncertainty: does a reported SD mean what it says?

An estimator that reports an SD with each estimate (``predict(signals, return_sd=True) ->
(params, sd)``) is checked against the truth on the evaluation grid, per grid point and overall:

* **coverage** of the nominal 50 / 90 / 95 % central intervals ``estimate -/+ z sd`` (the
  fraction of noise repeats whose interval holds the truth; calibrated: the nominal level);
* **sharpness**: the mean interval half-width ``z sd`` (narrower is better *at* nominal
  coverage);
* **CRPS**, the continuous ranked probability score of the predictive distribution against the
  truth (Gaussian closed form; :func:`empirical_crps` for ensembles and samples): a proper
  score, in the parameter's units, that rewards calibration and sharpness together and equals
  the absolute error for a point estimate;
* **z_rms**, the root mean square of ``(truth - estimate) / sd``: 1 when calibrated, 2 when
  the SDs are half what the errors need (over-confident by a factor 2);
* a **reliability diagram**: observed against nominal coverage over levels 5-95 % (drawn by
  :func:`qmri_labels.analysis.plots.plot_reliability`).

A repeat without a finite SD (an MLE parameter on a bound) has no interval: it is counted in
``reported_fraction``, not in the coverage.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from qmri_labels.data.grid import GridSpec
from qmri_labels.fitting.uncertainty import check_level

#: nominal levels of the summary columns
DEFAULT_LEVELS = (0.5, 0.9, 0.95)
#: nominal levels of the reliability diagram
RELIABILITY_LEVELS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2).tolist())

_SQRT_PI = math.sqrt(math.pi)


def _check_levels(levels) -> tuple:
    levels = tuple(check_level(v) for v in np.atleast_1d(levels))
    if not levels:
        raise ValueError("levels must name at least one level in (0, 1)")
    return levels


def gaussian_crps(mean, sd, truth) -> np.ndarray:
    """CRPS of a normal predictive distribution ``N(mean, sd^2)`` at ``truth`` (closed form).

    ``sd * (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))`` with ``z = (truth - mean) / sd``
    (Gneiting and Raftery 2007); ``|truth - mean|`` where ``sd = 0``; NaN where ``sd`` is NaN
    or negative.
    """
    mean, sd, truth = (np.asarray(a, dtype=np.float64) for a in (mean, sd, truth))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (truth - mean) / sd
        score = sd * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / _SQRT_PI)
    score = np.where(sd == 0, np.abs(truth - mean), score)
    return np.where(sd >= 0, score, np.nan)


def empirical_crps(samples, truth, axis: int = -1) -> np.ndarray:
    """CRPS of the empirical distribution of ``samples`` (ensemble members, bootstrap draws).

    ``mean |X - y| - mean |X - X'| / 2`` over the samples along ``axis``, computed from the
    sorted samples in ``O(S log S)``; equal to :func:`gaussian_crps` in the limit of many
    normal samples.
    """
    x = np.sort(np.moveaxis(np.asarray(samples, dtype=np.float64), axis, -1), axis=-1)
    y = np.asarray(truth, dtype=np.float64)[..., None]
    s = x.shape[-1]
    if s < 1:
        raise ValueError("samples must hold at least one sample along axis")
    spread = 2.0 / s**2 * ((2 * np.arange(1, s + 1) - s - 1) * x).sum(-1)  # mean |X - X'|
    return np.abs(x - y).mean(-1) - 0.5 * spread


def gaussian_interval(mean, sd, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central interval ``mean -/+ z sd`` of probability ``level``."""
    (level,) = _check_levels(level)
    half = stats.norm.ppf(0.5 + 0.5 * level) * np.asarray(sd, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    return mean - half, mean + half


def calibration_statistics(estimate, sd, truth, levels=DEFAULT_LEVELS) -> dict:
    """Per-point calibration over noise repeats.

    Parameters
    ----------
    estimate, sd : ndarray (G, R, P)
        Estimates and their reported SDs for ``R`` repeats at each of ``G`` points.
    truth : ndarray (G, P)
    levels : sequence of float
        Nominal levels of the central intervals.

    Returns
    -------
    dict of ndarray
        ``coverage`` and ``halfwidth`` ``(G, P, L)`` (over the repeats with a finite SD and
        estimate), ``hits`` and ``n_reported`` (integer counts behind ``coverage``),
        ``crps`` ``(G, P)`` (Gaussian, mean over reported repeats), ``z_rms`` ``(G, P)``,
        ``reported`` ``(G, P)`` (fraction of repeats with an interval).
    """
    levels = _check_levels(levels)
    estimate, sd = np.asarray(estimate, dtype=np.float64), np.asarray(sd, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if estimate.shape != sd.shape or estimate.ndim != 3 or truth.shape != (estimate.shape[0], estimate.shape[2]):
        raise ValueError(f"estimate and sd must have shape (G, R, P) and truth (G, P); got {estimate.shape}, "
                         f"{sd.shape}, {truth.shape}")
    ok = np.isfinite(estimate) & np.isfinite(sd) & (sd >= 0)
    n = ok.sum(axis=1)
    err = np.where(ok, np.abs(truth[:, None, :] - estimate), 0.0)
    sd0 = np.where(ok, sd, 0.0)
    z_quant = stats.norm.ppf(0.5 + 0.5 * np.asarray(levels))  # (L,)
    hits = ((err[..., None] <= z_quant * sd0[..., None]) & ok[..., None]).sum(axis=1)  # (G, P, L)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = hits / n[..., None]
        halfwidth = sd0.sum(axis=1)[..., None] * z_quant / n[..., None]
        crps = np.where(ok, gaussian_crps(estimate, sd0, truth[:, None, :]), 0.0).sum(axis=1) / n
        z2 = np.where(ok & (sd0 > 0), (err / np.where(sd0 > 0, sd0, 1.0)) ** 2, 0.0)
        z_rms = np.sqrt(z2.sum(axis=1) / (ok & (sd0 > 0)).sum(axis=1))
    return {"coverage": coverage, "halfwidth": halfwidth, "hits": hits, "n_reported": n, "crps": crps,
            "z_rms": z_rms, "reported": n / estimate.shape[1]}


@dataclass
class CalibrationResult:
    """Per-grid-point calibration of several estimators (see :func:`evaluate_calibration`).

    Attributes
    ----------
    truth : ndarray (G, P)
    param_names : tuple of str
    methods : list of str
    levels : tuple of float
        Levels of ``coverage`` and ``halfwidth``.
    coverage, halfwidth : dict[str, ndarray (G, P, L)]
    hits, n_reported : dict[str, ndarray]
        Counts behind ``coverage`` (``(G, P, L)`` and ``(G, P)``).
    crps, z_rms, reported : dict[str, ndarray (G, P)]
    reliability_levels : tuple of float
    reliability : dict[str, ndarray (G, P, K)]
        Coverage at ``reliability_levels``.
    grid : GridSpec or None
    """

    truth: np.ndarray
    param_names: tuple
    methods: list
    levels: tuple
    coverage: dict
    halfwidth: dict
    hits: dict
    n_reported: dict
    crps: dict
    z_rms: dict
    reported: dict
    reliability_levels: tuple = RELIABILITY_LEVELS
    reliability: dict = field(default_factory=dict)
    grid: GridSpec | None = None

    def overall_coverage(self, method: str, level_index: int | None = None, reliability: bool = False) -> np.ndarray:
        """Coverage pooled over all points and repeats, ``(P, L)`` (or ``(P, K)``)."""
        if reliability:
            hits = self.reliability[method] * self.n_reported[method][..., None]
        else:
            hits = self.hits[method]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.nansum(hits, axis=0) / self.n_reported[method].sum(axis=0)[:, None]
        return out if level_index is None else out[:, level_index]

    def select(self, methods) -> "CalibrationResult":
        """The result restricted to those of ``methods`` it holds (in that order)."""
        methods = [m for m in methods if m in self.methods]
        pick = lambda d: {m: d[m] for m in methods if m in d}  # noqa: E731
        return dataclasses.replace(self, methods=methods, **{k: pick(getattr(self, k)) for k in (
            "coverage", "halfwidth", "hits", "n_reported", "crps", "z_rms", "reported", "reliability")})

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per grid point, method and parameter (``coverage_<level>``,
        ``halfwidth_<level>``, ``crps``, ``z_rms``, ``reported``, ``true_<name>``)."""
        G, P = self.truth.shape
        frames = []
        truth_cols = {f"true_{n}": np.repeat(self.truth[:, i], P) for i, n in enumerate(self.param_names)}
        for method in self.methods:
            cols = {"point": np.repeat(np.arange(G), P), **truth_cols, "method": method,
                    "parameter": np.tile(np.asarray(self.param_names, dtype=object), G),
                    "truth": self.truth.ravel()}
            for k, level in enumerate(self.levels):
                cols[f"coverage_{_pct(level)}"] = self.coverage[method][..., k].ravel()
                cols[f"halfwidth_{_pct(level)}"] = self.halfwidth[method][..., k].ravel()
            cols.update(crps=self.crps[method].ravel(), z_rms=self.z_rms[method].ravel(),
                        reported=self.reported[method].ravel())
            frames.append(pd.DataFrame(cols))
        return pd.concat(frames, ignore_index=True)


def _pct(level: float) -> str:
    return f"{100 * level:g}".replace(".", "_")


def predict_with_sd(estimator, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(params, sd)`` of an estimator that reports SDs, each ``(N, P)`` float64."""
    if hasattr(estimator, "predict"):
        out = estimator.predict(signals, return_sd=True)
    elif callable(estimator):
        out = estimator(signals)
    else:
        raise ValueError(f"estimator {estimator!r} has no predict(signals, return_sd=True) and is not callable")
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("an estimator for calibration must return (params, sd)")
    return (np.asarray(out[0], dtype=np.float64), np.asarray(out[1], dtype=np.float64))


def evaluate_calibration(estimators: dict, grid: GridSpec, levels=DEFAULT_LEVELS,
                         reliability_levels=RELIABILITY_LEVELS, progress: bool = False) -> CalibrationResult:
    """Calibration of estimators that report SDs, on every grid point and noise repeat.

    Parameters
    ----------
    estimators : dict[str, object]
        ``name -> estimator`` with ``predict(signals (N, M), return_sd=True) -> (params, sd)``,
        each ``(N, P)`` in the model's order and units, or a callable ``signals -> (params,
        sd)``. The signals are those of :meth:`GridSpec.signals` (the same as
        :func:`~qmri_labels.analysis.evaluate_grid` sees).
    grid : GridSpec
    levels : sequence of float
    reliability_levels : sequence of float
    progress : bool

    Returns
    -------
    CalibrationResult
    """
    if not isinstance(grid, GridSpec):
        raise ValueError(f"grid must be a GridSpec, got {type(grid).__name__}")
    if not estimators:
        raise ValueError("estimators must name at least one estimator")
    levels, reliability_levels = _check_levels(levels), _check_levels(reliability_levels)
    names = list(estimators)
    accumulator = CalibrationAccumulator(names, grid, levels, reliability_levels)
    for lo, hi, flat in grid.chunks(progress, "calibration"):
        for m in names:
            est, sd = predict_with_sd(estimators[m], flat)
            accumulator.add(m, lo, hi, est, sd)
    return accumulator.result()


class CalibrationAccumulator:
    """Calibration statistics gathered chunk by chunk of grid points (shared by
    :func:`evaluate_calibration` and :func:`qmri_labels.analysis.evaluate_grid`, which
    evaluates the same signals in one pass)."""

    def __init__(self, names, grid: GridSpec, levels=DEFAULT_LEVELS, reliability_levels=RELIABILITY_LEVELS):
        self.names, self.grid = list(names), grid
        self.levels, self.reliability_levels = _check_levels(levels), _check_levels(reliability_levels)
        G, P = grid.truth.shape
        L, K = len(self.levels), len(self.reliability_levels)
        self.out = {k: {m: np.empty(shape) for m in self.names} for k, shape in
                    (("coverage", (G, P, L)), ("halfwidth", (G, P, L)), ("hits", (G, P, L)), ("n_reported", (G, P)),
                     ("crps", (G, P)), ("z_rms", (G, P)), ("reported", (G, P)), ("reliability", (G, P, K)))}

    def add(self, method: str, lo: int, hi: int, est, sd) -> None:
        """Statistics of grid points ``lo:hi`` from estimates and SDs ``(n * repeats, P)``."""
        grid, truth = self.grid, self.grid.truth
        n, P, L = hi - lo, truth.shape[1], len(self.levels)
        est, sd = np.asarray(est, dtype=np.float64), np.asarray(sd, dtype=np.float64)
        if est.shape != (n * grid.repeats, P) or sd.shape != est.shape:
            raise ValueError(f"estimator {method!r} returned shapes {est.shape} and {sd.shape}, expected "
                             f"{(n * grid.repeats, P)} (parameters {grid.param_names})")
        est, sd = est.reshape(n, grid.repeats, P), sd.reshape(n, grid.repeats, P)
        # one pass for the summary levels and the reliability diagram's
        part = calibration_statistics(est, sd, truth[lo:hi], self.levels + self.reliability_levels)
        out = self.out
        for key in ("coverage", "halfwidth", "hits"):
            out[key][method][lo:hi] = part[key][..., :L]
        for key in ("n_reported", "crps", "z_rms", "reported"):
            out[key][method][lo:hi] = part[key]
        out["reliability"][method][lo:hi] = part["coverage"][..., L:]

    def result(self) -> CalibrationResult:
        return CalibrationResult(truth=self.grid.truth, param_names=self.grid.param_names, methods=self.names,
                                 levels=self.levels, reliability_levels=self.reliability_levels, grid=self.grid,
                                 **self.out)


def summarize_calibration(result: CalibrationResult, alpha: float = 0.01) -> pd.DataFrame:
    """One row per method and parameter, pooled over the grid.

    Columns: ``method``, ``parameter``, ``coverage_<L>`` and ``mean_halfwidth_<L>`` for each
    level (``coverage_95``, ``mean_halfwidth_95``, ...), ``crps`` (mean over points),
    ``z_rms`` (pooled: 1 when calibrated; > 1 over-confident by that factor), ``reported_fraction``,
    ``coverage_p_<L>`` (two-sided binomial test of the pooled coverage against the nominal
    level) and ``calibrated_<L>`` (``p >= alpha``). The binomial test treats repeats as
    independent draws; coverage that varies over the grid makes it stricter, not looser.
    """
    rows = []
    for method in result.methods:
        pooled = result.overall_coverage(method)
        n = result.n_reported[method].sum(axis=0)
        hits = result.hits[method].sum(axis=0)
        for i, name in enumerate(result.param_names):
            row = {"method": method, "parameter": name}
            for k, level in enumerate(result.levels):
                pct = _pct(level)
                row[f"coverage_{pct}"] = float(pooled[i, k])
                hw = result.halfwidth[method][:, i, k]
                row[f"mean_halfwidth_{pct}"] = float(np.nanmean(hw)) if np.isfinite(hw).any() else float("nan")
                p_value = (stats.binomtest(int(hits[i, k]), int(n[i]), level).pvalue if n[i] > 0 else float("nan"))
                row[f"coverage_p_{pct}"] = float(p_value)
                row[f"calibrated_{pct}"] = bool(p_value >= alpha)
            crps = result.crps[method][:, i]
            row["crps"] = float(np.nanmean(crps)) if np.isfinite(crps).any() else float("nan")
            z = result.z_rms[method][:, i]
            w = result.n_reported[method][:, i]
            good = np.isfinite(z)
            row["z_rms"] = float(np.sqrt((z[good] ** 2 * w[good]).sum() / w[good].sum())) if good.any() else float("nan")
            row["reported_fraction"] = float(result.reported[method][:, i].mean())
            rows.append(row)
    return pd.DataFrame(rows)
