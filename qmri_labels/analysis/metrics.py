"""Summaries beyond RMSE: bias, variance, sensitivity and efficiency of each estimator.

RMSE alone can mislead: an estimator that predicts the training mean has a small SD and, over a
prior-shaped test set, a competitive RMSE, yet carries almost no information about the truth.
*Sensitivity*, the slope of the mean estimate against the true value, exposes it (1 for an
unbiased estimator, 0 for one that ignores the truth); *efficiency*, the CRLB over the observed
variance, shows who buys a low SD with bias (efficiency > 1 is only possible with bias).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from qmri_labels.analysis.grid import GridResult


def sensitivity(truth: np.ndarray, mean_estimate: np.ndarray) -> float:
    """Least-squares slope of the mean estimate against the true value.

    Parameters
    ----------
    truth, mean_estimate : ndarray (G,)
        True value and mean estimate of one parameter at each grid point (NaN points ignored).

    Returns
    -------
    float
        1 for an unbiased estimator, 0 for one that ignores the truth; NaN if the truth does
        not vary.
    """
    truth = np.asarray(truth, dtype=np.float64)
    mean_estimate = np.asarray(mean_estimate, dtype=np.float64)
    ok = np.isfinite(truth) & np.isfinite(mean_estimate)
    x, y = truth[ok], mean_estimate[ok]
    if x.size < 2:
        return float("nan")
    xc = x - x.mean()
    denom = float(xc @ xc)
    if denom <= 1e-300 or np.ptp(x) <= 1e-12 * max(abs(x).max(), 1e-300):
        return float("nan")
    return float(xc @ (y - y.mean()) / denom)


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    ok = np.isfinite(a)
    return float(a[ok].mean()) if ok.any() else float("nan")


def summarize(result: GridResult, parameters: list | tuple | None = None) -> pd.DataFrame:
    """One row per method and parameter with the beyond-RMSE metrics.

    Parameters
    ----------
    result : GridResult
    parameters : sequence of str, optional
        Parameters to report; default all of the model's.

    Returns
    -------
    DataFrame
        Columns:

        - ``method``, ``parameter``, ``unit``, ``varied`` (whether the grid varies it);
        - ``mean_abs_bias``: mean over grid points of ``|mean estimate - truth|``;
        - ``mean_bias``: mean signed bias;
        - ``mean_sd``: mean over grid points of the SD over repeats;
        - ``rmse``: root of the mean squared error over all points and repeats;
        - ``nrmse``: ``rmse`` divided by the range of the truth on the grid (by the fixed
          value for a fixed parameter);
        - ``sensitivity``: slope of the mean estimate against the truth (NaN if not varied);
        - ``pearson_r``: correlation of mean estimate and truth over the grid;
        - ``mean_crlb_sd``: mean Cramer-Rao bound on the SD;
        - ``efficiency``: median over grid points of ``CRLB / observed variance`` (1 is
          efficient; > 1 is only possible with bias);
        - ``valid_fraction``: fraction of estimates that were finite.
    """
    names = list(result.param_names)
    wanted = names if parameters is None else list(parameters)
    unknown = set(wanted) - set(names)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}; result has {names}")
    units = result.units
    varied = set(result.grid.varied)
    rows = []
    for method in result.methods:
        for name in wanted:
            i = names.index(name)
            truth = result.truth[:, i]
            bias = result.bias[method][:, i]
            sd = result.sd[method][:, i]
            rmse_pt = result.rmse[method][:, i]
            spread = np.ptp(truth) if name in varied else abs(truth[0])
            rmse = float(np.sqrt(_nanmean(rmse_pt**2)))
            mean_est = result.mean[method][:, i]
            if name in varied:
                slope = sensitivity(truth, mean_est)
                ok = np.isfinite(mean_est)
                pearson = (float(np.corrcoef(truth[ok], mean_est[ok])[0, 1])
                           if ok.sum() > 2 and np.std(mean_est[ok]) > 0 else float("nan"))
            else:
                slope = pearson = float("nan")
            if result.crlb_sd is not None:
                bound = result.crlb_sd[:, i]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = bound**2 / sd**2
                ratio = ratio[~np.isnan(ratio)]
                efficiency = float(np.median(ratio)) if ratio.size else float("nan")
                mean_crlb = _nanmean(bound)
            else:
                efficiency = mean_crlb = float("nan")
            rows.append({
                "method": method,
                "parameter": name,
                "unit": units.get(name, ""),
                "varied": name in varied,
                "mean_abs_bias": _nanmean(np.abs(bias)),
                "mean_bias": _nanmean(bias),
                "mean_sd": _nanmean(sd),
                "rmse": rmse,
                "nrmse": rmse / spread if spread > 0 else float("nan"),
                "sensitivity": slope,
                "pearson_r": pearson,
                "mean_crlb_sd": mean_crlb,
                "efficiency": efficiency,
                "valid_fraction": _nanmean(result.valid_fraction[method]),
            })
    return pd.DataFrame(rows)


def marginal_curves(result: GridResult, parameter: str) -> pd.DataFrame:
    """Bias, SD and RMSE against the true value of one parameter, averaged over the others.

    Bias and SD are plain means over the grid points sharing the true value; RMSE is the root
    of the mean squared error (so that it stays an RMSE); ``crlb_sd`` is the mean bound.

    Parameters
    ----------
    result : GridResult
    parameter : str
        A varied parameter of the grid.

    Returns
    -------
    DataFrame
        Columns ``method``, ``parameter`` (the estimated one, every model parameter),
        ``along`` (= ``parameter`` argument), ``truth`` (value of ``along``), ``bias``,
        ``abs_bias``, ``sd``, ``rmse``, ``crlb_sd``.
    """
    if parameter not in result.grid.varied:
        raise ValueError(f"{parameter!r} is not a varied grid parameter; varied: {result.grid.varied}")
    names = list(result.param_names)
    along = result.truth[:, names.index(parameter)]
    frames = []
    for method in result.methods:
        for i, name in enumerate(names):
            df = pd.DataFrame({
                "truth": along,
                "bias": result.bias[method][:, i],
                "abs_bias": np.abs(result.bias[method][:, i]),
                "sd": result.sd[method][:, i],
                "mse": result.rmse[method][:, i] ** 2,
                "crlb_sd": result.crlb_sd[:, i] if result.crlb_sd is not None else np.nan,
            })
            g = df.groupby("truth", sort=True).mean()
            g["rmse"] = np.sqrt(g.pop("mse"))
            g = g.reset_index()
            g.insert(0, "along", parameter)
            g.insert(0, "parameter", name)
            g.insert(0, "method", method)
            frames.append(g)
    return pd.concat(frames, ignore_index=True)


def spearman_table(result: GridResult, parameters: list | tuple | None = None) -> pd.DataFrame:
    """Spearman correlations between estimated parameters (IVIM degeneracy).

    Two views per method and pair of parameters:

    - ``noise_rho``: correlation over the noise repeats at one grid point, averaged over the
      points: how noise trades one estimate against another (e.g. f against D*);
    - ``grid_rho``: correlation of the mean estimates over the grid points, next to
      ``true_rho``, the same correlation of the true values (0 on a full factorial grid), so
      that a non-zero ``grid_rho`` shows parameters leaking into each other.

    Returns
    -------
    DataFrame with columns ``method``, ``param_a``, ``param_b``, ``noise_rho``, ``grid_rho``,
    ``true_rho``.
    """
    names = list(result.param_names)
    wanted = list(result.grid.varied) if parameters is None else list(parameters)
    rows = []
    for method in result.methods:
        for a in range(len(wanted)):
            for b in range(a + 1, len(wanted)):
                i, j = names.index(wanted[a]), names.index(wanted[b])
                noise_rho = float("nan")
                if method in result.spearman:
                    noise_rho = _nanmean(result.spearman[method][:, i, j])
                x, y = result.mean[method][:, i], result.mean[method][:, j]
                ok = np.isfinite(x) & np.isfinite(y)
                grid_rho = true_rho = float("nan")
                if ok.sum() > 2 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
                    grid_rho = float(spearmanr(x[ok], y[ok]).statistic)
                tx, ty = result.truth[:, i], result.truth[:, j]
                if np.ptp(tx) > 0 and np.ptp(ty) > 0:
                    true_rho = float(spearmanr(tx, ty).statistic)
                rows.append({"method": method, "param_a": wanted[a], "param_b": wanted[b],
                             "noise_rho": noise_rho, "grid_rho": grid_rho, "true_rho": true_rho})
    return pd.DataFrame(rows, columns=["method", "param_a", "param_b", "noise_rho", "grid_rho", "true_rho"])
