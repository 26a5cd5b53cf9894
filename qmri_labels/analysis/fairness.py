"""A fair label comparison: tuned vs default designs, label rankings, and seed-to-seed spread.

* :func:`label_ranking` orders the labels by each beyond-RMSE metric (lower |bias|, SD and
  RMSE are better; a sensitivity closer to 1 is better);
* :func:`tuned_vs_default` puts each label's default and tuned network side by side, says
  whether the ranking of the labels changes with tuning, and tests tuned vs default per label
  over the grid points (paired t-tests, Bonferroni-corrected);
* :func:`seed_summary` and :func:`seed_findings` give the mean and spread over training seeds
  and keep only label differences larger than the seed-to-seed spread as findings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from qmri_labels.analysis.stats import bonferroni, compare_on_grid

#: metric -> how to score it (lower score = better)
RANKED_METRICS = {"mean_abs_bias": lambda v: v, "mean_sd": lambda v: v, "sensitivity": lambda v: np.abs(1.0 - v),
                  "rmse": lambda v: v}
METRICS = tuple(RANKED_METRICS)


def _varied(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["varied"].astype(bool)] if "varied" in summary else summary


def label_ranking(summary: pd.DataFrame, methods) -> pd.DataFrame:
    """Rank ``methods`` by each metric for each (varied) parameter.

    Returns
    -------
    DataFrame with columns ``parameter``, ``metric``, ``ranking`` (method names, best first,
    joined by ``" > "``) and ``best``.
    """
    methods = list(methods)
    rows = []
    frame = _varied(summary)
    for parameter in dict.fromkeys(frame["parameter"]):
        sub = frame[frame["parameter"] == parameter].set_index("method")
        for metric, score in RANKED_METRICS.items():
            if metric not in sub:
                continue
            present = [m for m in methods if m in sub.index]
            order = sorted(present, key=lambda m: (score(float(sub.loc[m, metric])), present.index(m)))
            rows.append({"parameter": parameter, "metric": metric, "ranking": " > ".join(order),
                         "best": order[0] if order else None})
    return pd.DataFrame(rows, columns=["parameter", "metric", "ranking", "best"])


def tuned_vs_default(summary: pd.DataFrame, result, pairs: dict, alpha: float = 0.05) -> dict:
    """Each label's tuned network against its default one.

    Parameters
    ----------
    summary : DataFrame
        :func:`~qmri_labels.analysis.summarize` output holding both networks of every label.
    result : GridResult
        Per-point results of the same methods (for the paired tests).
    pairs : dict
        ``default method -> tuned method`` (e.g. ``{"net-gt": "net-gt-tuned"}``).
    alpha : float
        Family-wise level of the paired tests.

    Returns
    -------
    dict with ``table`` (metric values side by side), ``ranking`` (default and tuned rankings
    of the labels per parameter and metric, ``changed``), ``tests`` (paired t-tests of the
    per-point |bias|, SD and RMSE, tuned minus default, Bonferroni over all of them) and
    ``ranking_changed`` (bool: whether any ranking changed).
    """
    frame = _varied(summary)
    rows = []
    for default, tuned in pairs.items():
        for parameter in dict.fromkeys(frame["parameter"]):
            a = frame[(frame["method"] == default) & (frame["parameter"] == parameter)]
            b = frame[(frame["method"] == tuned) & (frame["parameter"] == parameter)]
            if a.empty or b.empty:
                raise ValueError(f"summary lacks {default!r} or {tuned!r} for parameter {parameter!r}")
            row = {"label": default, "parameter": parameter}
            for metric in METRICS:
                row[f"{metric}_default"] = float(a[metric].iloc[0])
                row[f"{metric}_tuned"] = float(b[metric].iloc[0])
            rows.append(row)
    table = pd.DataFrame(rows)
    before = label_ranking(summary, list(pairs))
    after = label_ranking(summary, list(pairs.values()))
    # tuned rankings in the default names, so that the two read alike
    rename = {t: d for d, t in pairs.items()}
    after["ranking"] = after["ranking"].map(lambda r: " > ".join(rename[m] for m in r.split(" > ")))
    ranking = before.rename(columns={"ranking": "default", "best": "best_default"})
    ranking["tuned"] = after["ranking"].to_numpy()
    ranking["changed"] = ranking["default"] != ranking["tuned"]
    tests = []
    for metric in ("abs_bias", "sd", "rmse"):
        t = compare_on_grid(result, metric=metric, pairs=[(tuned, default) for default, tuned in pairs.items()],
                            alpha=alpha, correction="none")
        tests.append(t)
    tests = pd.concat(tests, ignore_index=True)
    tests["p_adjusted"] = bonferroni(tests["p_value"].to_numpy(float), "bonferroni")
    tests["significant"] = tests["p_adjusted"] < alpha
    return {"table": table, "ranking": ranking[["parameter", "metric", "default", "tuned", "changed"]],
            "tests": tests, "ranking_changed": bool(ranking["changed"].any())}


def seed_summary(per_seed: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """Mean and spread over seeds of each method's summary metrics.

    Parameters
    ----------
    per_seed : DataFrame
        Summaries stacked with a ``seed`` column (one per training seed).

    Returns
    -------
    DataFrame with ``method``, ``parameter``, ``n_seeds`` and ``<metric>_mean``,
    ``<metric>_sd`` (ddof 1; NaN with one seed) for each metric.
    """
    if "seed" not in per_seed:
        raise ValueError("per_seed needs a seed column")
    frame = _varied(per_seed)
    rows = []
    for (method, parameter), sub in frame.groupby(["method", "parameter"], sort=False):
        row = {"method": method, "parameter": parameter, "n_seeds": int(sub["seed"].nunique())}
        for metric in metrics:
            values = sub[metric].to_numpy(float)
            row[f"{metric}_mean"] = float(np.mean(values))
            row[f"{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def seed_findings(per_seed: pd.DataFrame, pairs, metrics=METRICS) -> pd.DataFrame:
    """Paired differences between methods over seeds, with the seed-to-seed spread.

    For each pair ``(a, b)``, parameter and metric: the mean over seeds of ``a - b`` (seed
    ``k`` of ``a`` paired with seed ``k`` of ``b``), the seed-to-seed spread (the larger SD over
    seeds of the two methods' metric) and ``finding``: whether ``|mean diff|`` exceeds that
    spread. With one seed there is no spread and nothing is a finding.
    """
    frame = _varied(per_seed)
    rows = []
    for a, b in pairs:
        for parameter in dict.fromkeys(frame["parameter"]):
            sa = frame[(frame["method"] == a) & (frame["parameter"] == parameter)].set_index("seed").sort_index()
            sb = frame[(frame["method"] == b) & (frame["parameter"] == parameter)].set_index("seed").sort_index()
            seeds = sa.index.intersection(sb.index)
            for metric in metrics:
                score = RANKED_METRICS[metric]
                xa, xb = score(sa.loc[seeds, metric].to_numpy(float)), score(sb.loc[seeds, metric].to_numpy(float))
                diff = xa - xb
                spread = max(np.std(xa, ddof=1), np.std(xb, ddof=1)) if len(seeds) > 1 else float("nan")
                mean_diff = float(np.mean(diff)) if len(diff) else float("nan")
                rows.append({"a": a, "b": b, "parameter": parameter,
                             "metric": metric if metric != "sensitivity" else "abs(1 - sensitivity)",
                             "n_seeds": int(len(seeds)), "mean_diff": mean_diff, "seed_spread": float(spread),
                             "finding": bool(np.isfinite(spread) and abs(mean_diff) > spread)})
    return pd.DataFrame(rows)
