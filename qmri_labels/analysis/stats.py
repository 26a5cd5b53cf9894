"""Paired statistical comparisons between methods, with multiple-comparison correction.

Methods are compared on the same units (grid points, test subjects, seeds), so the tests are
paired: a paired t-test on the differences, a Wilcoxon signed-rank test as a check that does
not assume normality, Bonferroni (or Holm) correction across all comparisons made, and effect
sizes (Cohen's d_z of the differences and d_av against the methods' average SD), as in Oh et
al. 2021's fair-comparison protocol.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

CORRECTIONS = ("bonferroni", "holm", "none")


def bonferroni(pvalues, method: str = "bonferroni") -> np.ndarray:
    """Adjust p-values for multiple comparisons.

    Parameters
    ----------
    pvalues : array_like
        Raw p-values of the comparisons (NaN entries are ignored and stay NaN; they do not
        count as comparisons).
    method : {"bonferroni", "holm", "none"}
        ``"bonferroni"`` multiplies by the number of comparisons; ``"holm"`` is the uniformly
        more powerful step-down version with the same family-wise error guarantee.

    Returns
    -------
    ndarray
        Adjusted p-values, clipped to 1.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {method!r}")
    p = np.asarray(pvalues, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0 or method == "none":
        out[ok] = p[ok]
        return out
    if method == "bonferroni":
        out[ok] = np.minimum(1.0, p[ok] * m)
        return out
    valid = p[ok]
    order = np.argsort(valid)
    stepped = np.maximum.accumulate((m - np.arange(m)) * valid[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, stepped)
    out[ok] = adjusted
    return out


def paired_effect_size(a, b) -> dict:
    """Effect sizes of the paired difference ``a - b``.

    Returns
    -------
    dict
        ``mean_diff``, ``sd_diff``, ``cohen_dz`` (mean difference over the SD of the
        differences), ``cohen_dav`` (mean difference over the average of the two SDs) and
        ``n`` (pairs where both values are finite).
    """
    a, b = _paired(a, b)
    d = a - b
    n = d.size
    mean_diff = float(d.mean()) if n else float("nan")
    sd_diff = float(d.std(ddof=1)) if n > 1 else float("nan")
    sd_av = 0.5 * (a.std(ddof=1) + b.std(ddof=1)) if n > 1 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = mean_diff / sd_diff if sd_diff > 0 else (0.0 if mean_diff == 0 else np.sign(mean_diff) * np.inf)
        dav = mean_diff / sd_av if sd_av > 0 else (0.0 if mean_diff == 0 else np.sign(mean_diff) * np.inf)
    return {"n": n, "mean_diff": mean_diff, "sd_diff": sd_diff, "cohen_dz": float(dz), "cohen_dav": float(dav)}


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def _as_columns(data) -> dict:
    if isinstance(data, pd.DataFrame):
        return {str(c): data[c].to_numpy(dtype=np.float64) for c in data.columns}
    if isinstance(data, dict):
        cols = {str(k): np.asarray(v, dtype=np.float64).ravel() for k, v in data.items()}
        lengths = {v.size for v in cols.values()}
        if len(lengths) > 1:
            raise ValueError(f"all methods need the same number of paired values, got lengths {sorted(lengths)}")
        return cols
    raise ValueError(f"data must be a DataFrame (one column per method) or a dict of arrays, got {type(data).__name__}")


def paired_comparisons(
    data,
    pairs=None,
    alpha: float = 0.05,
    correction: str = "bonferroni",
    reference: str | None = None,
) -> pd.DataFrame:
    """Paired t-tests between methods with multiple-comparison correction and effect sizes.

    Parameters
    ----------
    data : DataFrame or dict of array_like
        One column (or dict entry) per method; row ``k`` of every column belongs to the same
        unit (grid point, subject, seed). Non-finite values drop that pair from a comparison.
    pairs : sequence of (str, str), optional
        Comparisons to make; default every pair of methods, or every method against
        ``reference`` when that is given.
    alpha : float
        Family-wise significance level applied to the corrected p-values.
    correction : {"bonferroni", "holm", "none"}
        Correction across all the comparisons made in this call.
    reference : str, optional
        Method every other one is compared with.

    Returns
    -------
    DataFrame
        One row per comparison ``a`` vs ``b`` (differences are ``a - b``): ``a``, ``b``, ``n``,
        ``mean_a``, ``mean_b``, ``mean_diff``, ``ci_low``, ``ci_high`` (``1 - alpha`` t-interval of
        the mean difference, uncorrected), ``t``, ``df``, ``p_value``, ``p_adjusted``,
        ``significant``, ``cohen_dz``, ``cohen_dav``, ``wilcoxon_p``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    cols = _as_columns(data)
    if len(cols) < 2:
        raise ValueError("need at least two methods to compare")
    if pairs is None:
        if reference is not None:
            if reference not in cols:
                raise ValueError(f"reference {reference!r} is not among the methods {list(cols)}")
            pairs = [(reference, m) for m in cols if m != reference]
        else:
            pairs = list(combinations(cols, 2))
    pairs = [(str(a), str(b)) for a, b in pairs]
    for a, b in pairs:
        for name in (a, b):
            if name not in cols:
                raise ValueError(f"method {name!r} in pairs is not in the data {list(cols)}")
        if a == b:
            raise ValueError(f"cannot compare method {a!r} with itself")
    rows = []
    for a, b in pairs:
        xa, xb = _paired(cols[a], cols[b])
        eff = paired_effect_size(xa, xb)
        n = eff["n"]
        row = {"a": a, "b": b, "n": n, "mean_a": float(xa.mean()) if n else np.nan,
               "mean_b": float(xb.mean()) if n else np.nan, "mean_diff": eff["mean_diff"]}
        if n < 2:
            row.update(ci_low=np.nan, ci_high=np.nan, t=np.nan, df=np.nan, p_value=np.nan, wilcoxon_p=np.nan)
        else:
            df = n - 1
            se = eff["sd_diff"] / np.sqrt(n)
            if se > 0:
                t = eff["mean_diff"] / se
                p = float(2 * sps.t.sf(abs(t), df))
            else:  # identical differences: no sampling variability
                t = 0.0 if eff["mean_diff"] == 0 else float(np.sign(eff["mean_diff"]) * np.inf)
                p = 1.0 if eff["mean_diff"] == 0 else 0.0
            half = sps.t.ppf(1 - alpha / 2, df) * se
            diff = xa - xb
            if np.all(diff == 0):
                wp = 1.0
            else:
                wp = float(sps.wilcoxon(xa, xb, zero_method="wilcox").pvalue)
            row.update(ci_low=eff["mean_diff"] - half, ci_high=eff["mean_diff"] + half, t=float(t), df=df,
                       p_value=p, wilcoxon_p=wp)
        row.update(cohen_dz=eff["cohen_dz"], cohen_dav=eff["cohen_dav"])
        rows.append(row)
    table = pd.DataFrame(rows, columns=["a", "b", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "t",
                                        "df", "p_value", "wilcoxon_p", "cohen_dz", "cohen_dav"])
    table["p_adjusted"] = bonferroni(table["p_value"].to_numpy(float), correction)
    table["significant"] = table["p_adjusted"] < alpha
    table["correction"] = correction
    return table


def compare_on_grid(result, metric: str = "abs_error", parameters=None, **kwargs) -> pd.DataFrame:
    """Paired comparisons of every method over the grid points of a :class:`GridResult`.

    Parameters
    ----------
    result : GridResult
    metric : {"abs_error", "abs_bias", "sd", "rmse"}
        Per-point quantity compared: ``abs_bias`` = ``|bias|``, ``abs_error`` = ``rmse`` (the
        per-point RMSE), ``sd``.
    parameters : sequence of str, optional
        Default: the grid's varied parameters.
    **kwargs
        Passed to :func:`paired_comparisons` (``pairs``, ``alpha``, ``reference``, ...). The
        correction runs over all comparisons of all parameters together.

    Returns
    -------
    DataFrame with a ``parameter`` and a ``metric`` column in front of the
    :func:`paired_comparisons` columns.
    """
    pick = {"abs_bias": lambda m, i: np.abs(result.bias[m][:, i]), "abs_error": lambda m, i: result.rmse[m][:, i],
            "rmse": lambda m, i: result.rmse[m][:, i], "sd": lambda m, i: result.sd[m][:, i]}
    if metric not in pick:
        raise ValueError(f"metric must be one of {sorted(pick)}, got {metric!r}")
    params = list(result.grid.varied) if parameters is None else list(parameters)
    alpha = kwargs.pop("alpha", 0.05)
    correction = kwargs.pop("correction", "bonferroni")
    frames = []
    for name in params:
        i = list(result.param_names).index(name)
        data = {m: pick[metric](m, i) for m in result.methods}
        t = paired_comparisons(data, alpha=alpha, correction="none", **kwargs)
        t.insert(0, "metric", metric)
        t.insert(0, "parameter", name)
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    table["p_adjusted"] = bonferroni(table["p_value"].to_numpy(float), correction)
    table["significant"] = table["p_adjusted"] < alpha
    table["correction"] = correction
    return table
