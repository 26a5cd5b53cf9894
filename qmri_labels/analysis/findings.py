"""What a study found, said in sentences made from its numbers.

Every sentence is generated from the summary table (and, when given, the paired tests and the
spread over training seeds): which method has the lowest bias, SD and RMSE per parameter,
which keep the sensitivity near 1, which differences the corrected paired tests call
significant, and whether those exceed what retraining with another seed changes. Nothing here
is fixed text about a particular study: other numbers give other sentences.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: a method "keeps" the sensitivity when it lies within this distance of 1
SENSITIVITY_TOLERANCE = 0.1
#: summary column -> how a finding names it
LOWEST = {"mean_abs_bias": "mean |bias|", "mean_sd": "SD", "rmse": "RMSE"}
#: seed_findings metric -> how a finding says that one method does better on it
SEED_METRIC_PHRASES = {"mean_abs_bias": "has the lower mean |bias|", "mean_sd": "has the lower SD",
                       "rmse": "has the lower RMSE", "abs(1 - sensitivity)": "keeps the sensitivity closer to 1"}


def number(value) -> str:
    """A value as the report prints it: 4 significant digits, ``–`` for a missing one."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    return f"{float(value):.4g}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _parameters(summary: pd.DataFrame, parameters) -> list:
    if parameters is not None:
        return list(parameters)
    frame = summary[summary["varied"].astype(bool)] if "varied" in summary else summary
    return list(dict.fromkeys(frame["parameter"]))


def lowest_sentence(sub: pd.DataFrame, parameter: str) -> str | None:
    """``"f: A has the lowest mean |bias| (0.01) and RMSE (0.02); B the lowest SD (0.003)."``"""
    winners: dict[str, list[str]] = {}
    for column, name in LOWEST.items():
        if column not in sub or not sub[column].notna().any():
            continue
        best = sub.loc[sub[column].idxmin()]
        winners.setdefault(str(best["method"]), []).append(f"{name} ({number(best[column])})")
    if not winners:
        return None
    parts = [f"{method} has the lowest {_join(items)}" if k == 0 else f"{method} the lowest {_join(items)}"
             for k, (method, items) in enumerate(winners.items())]
    return f"**{parameter}**: " + "; ".join(parts) + "."


def sensitivity_sentence(sub: pd.DataFrame, parameter: str, tolerance: float = SENSITIVITY_TOLERANCE) -> str | None:
    """Which methods keep the sensitivity (slope of mean estimate against truth) within
    ``tolerance`` of 1, and which do not."""
    if "sensitivity" not in sub or not sub["sensitivity"].notna().any():
        return None
    rows = sub[sub["sensitivity"].notna()]
    near = rows[(rows["sensitivity"] - 1).abs() <= tolerance]
    far = rows[(rows["sensitivity"] - 1).abs() > tolerance]

    def listed(frame):
        return _join([f"{m} ({number(s)})" for m, s in zip(frame["method"], frame["sensitivity"])])

    if near.empty:
        closest = rows.loc[(rows["sensitivity"] - 1).abs().idxmin()]
        return (f"No method keeps the sensitivity of {parameter} within {tolerance:g} of 1; the closest is "
                f"{closest['method']} ({number(closest['sensitivity'])}).")
    text = f"The sensitivity of {parameter} stays within {tolerance:g} of 1 for {listed(near)}"
    if far.empty:
        return text + ", every method."
    below, above = far[far["sensitivity"] < 1], far[far["sensitivity"] > 1]
    misses = []
    if not below.empty:
        misses.append(f"{listed(below)} (below: estimates pulled towards the middle of the training range)")
    if not above.empty:
        misses.append(f"{listed(above)} (above: differences exaggerated)")
    return text + "; not for " + "; nor for ".join(misses) + "."


def _seed_spread(seed_table: pd.DataFrame | None, parameter: str, methods) -> float:
    """The larger SD over training seeds of the RMSE of ``methods`` (NaN when none has seeds)."""
    if seed_table is None or "rmse_sd" not in seed_table:
        return float("nan")
    rows = seed_table[(seed_table["parameter"] == parameter) & seed_table["method"].isin(list(methods))]
    values = rows["rmse_sd"].to_numpy(float)
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else float("nan")


def significance_sentence(comparisons: pd.DataFrame, parameter: str, seed_table: pd.DataFrame | None = None
                          ) -> str | None:
    """What the corrected paired tests of ``parameter`` say, and (with seeds) whether each
    significant difference exceeds the seed-to-seed spread of the RMSE."""
    rows = comparisons[comparisons["parameter"] == parameter]
    if rows.empty:
        return None
    correction = str(rows["correction"].iloc[0]).capitalize() if "correction" in rows else "Multiplicity"
    reference = str(rows["a"].iloc[0]) if rows["a"].nunique() == 1 else None
    significant, plain = [], []
    for _, row in rows.iterrows():
        a, b, diff = str(row["a"]), str(row["b"]), float(row["mean_diff"])
        lower, higher = (a, b) if diff < 0 else (b, a)
        if not bool(row["significant"]):
            plain.append((b if reference else f"{a} against {b}") + f" (p = {number(row['p_adjusted'])})")
            continue
        text = f"{lower} lower than {higher} by {number(abs(diff))} (p = {number(row['p_adjusted'])})"
        spread = _seed_spread(seed_table, parameter, (a, b))
        if np.isfinite(spread):
            text += (", larger than the seed spread" if abs(diff) > spread else ", but within the seed spread") \
                + f" ({number(spread)})"
        significant.append(text)
    metric = str(rows["metric"].iloc[0]) if "metric" in rows else "error"
    what = "per-point RMSE" if metric in ("abs_error", "rmse") else metric.replace("_", " ")
    head = f"Paired tests of the {what} of {parameter} ({correction}-corrected over all {len(comparisons)} tests): "
    if not significant:
        return head + "no difference is significant."
    text = head + "significant: " + "; ".join(significant)
    if plain:
        text += "; not significant" + (f" against {reference}" if reference else "") + ": " + _join(plain)
    return text + "."


def seed_sentence(seed_findings: pd.DataFrame, parameter: str) -> str | None:
    """Differences between networks of ``parameter`` larger than the seed-to-seed spread."""
    rows = seed_findings[seed_findings["parameter"] == parameter]
    if rows.empty or int(rows["n_seeds"].max()) < 2:
        return None
    kept = rows[rows["finding"].astype(bool)]
    n = int(rows["n_seeds"].max())
    if kept.empty:
        return (f"Over {n} training seeds, no difference between the networks in {parameter} exceeds the "
                "seed-to-seed spread.")
    parts = []
    for _, row in kept.iterrows():
        lower, higher = (row["a"], row["b"]) if row["mean_diff"] < 0 else (row["b"], row["a"])
        phrase = SEED_METRIC_PHRASES.get(row["metric"], f"has the lower {row['metric']}")
        parts.append(f"{lower} {phrase} than {higher} (by {number(abs(row['mean_diff']))}, "
                     f"spread {number(row['seed_spread'])})")
    return f"Over {n} training seeds, larger than the seed-to-seed spread in {parameter}: " + "; ".join(parts) + "."


def study_findings(summary: pd.DataFrame, comparisons: pd.DataFrame | None = None,
                   seed_table: pd.DataFrame | None = None, seed_findings: pd.DataFrame | None = None,
                   parameters=None, sensitivity_tolerance: float = SENSITIVITY_TOLERANCE) -> list[str]:
    """The study's findings, one Markdown bullet per sentence, grouped by parameter.

    Parameters
    ----------
    summary : DataFrame
        :func:`~qmri_labels.analysis.metrics.summarize` output (``method``, ``parameter``,
        ``mean_abs_bias``, ``mean_sd``, ``rmse``, optionally ``sensitivity`` and ``varied``).
    comparisons : DataFrame, optional
        :func:`~qmri_labels.analysis.stats.compare_on_grid` output (``comparisons.csv``).
    seed_table : DataFrame, optional
        :func:`~qmri_labels.analysis.fairness.seed_summary` output (``seeds.csv``): its
        ``rmse_sd`` is the spread a significant difference is held against.
    seed_findings : DataFrame, optional
        :func:`~qmri_labels.analysis.fairness.seed_findings` output (``seed_findings.csv``).
    parameters : sequence of str, optional
        Default: the varied parameters of the summary.
    sensitivity_tolerance : float
        How far from 1 a sensitivity may lie and still count as kept.

    Returns
    -------
    list of str
        Markdown bullet lines (``"- ..."``).
    """
    missing = {"method", "parameter"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary lacks columns {sorted(missing)}")
    lines = []
    for parameter in _parameters(summary, parameters):
        sub = summary[summary["parameter"] == parameter]
        sentences = [lowest_sentence(sub, parameter), sensitivity_sentence(sub, parameter, sensitivity_tolerance)]
        if comparisons is not None and not comparisons.empty:
            sentences.append(significance_sentence(comparisons, parameter, seed_table))
        if seed_findings is not None and not seed_findings.empty:
            sentences.append(seed_sentence(seed_findings, parameter))
        lines += [f"- {s}" for s in sentences if s]
    return lines


#: the networks whose order the seed paper reports on IVIM (Epstein et al., MELBA 2024): GT labels
#: the lowest SD and the highest bias, MLE and self-supervised labels the lowest bias and highest SD
RANKING_METHODS = ("net-gt", "net-mle", "net-self")


def label_ranking(sub: pd.DataFrame) -> dict | None:
    """Whether one parameter's rows keep IVIM's label ranking (GT: higher mean |bias| and lower SD
    than every MLE-like label present); None without net-gt and net-mle or net-self.

    Returns
    -------
    dict or None
        ``holds`` (bool), ``bias_holds``, ``sd_holds`` and the values by method (``bias``, ``sd``).
    """
    rows = sub.drop_duplicates("method").set_index("method")
    present = [m for m in RANKING_METHODS if m in rows.index]
    if "net-gt" not in present or len(present) < 2:
        return None
    bias = {m: float(rows.loc[m, "mean_abs_bias"]) for m in present}
    sd = {m: float(rows.loc[m, "mean_sd"]) for m in present}
    others = [m for m in present if m != "net-gt"]
    bias_holds = all(bias["net-gt"] > bias[m] for m in others)
    sd_holds = all(sd["net-gt"] < sd[m] for m in others)
    return {"holds": bias_holds and sd_holds, "bias_holds": bias_holds, "sd_holds": sd_holds, "bias": bias, "sd": sd}


def ranking_sentences(summary: pd.DataFrame, model: str, parameters=None) -> list[str]:
    """One Markdown bullet per parameter: does this model keep IVIM's label ranking?

    Parameters
    ----------
    summary : DataFrame
        :func:`~qmri_labels.analysis.metrics.summarize` output.
    model : str
        The study's model, named in the sentences.
    parameters : sequence of str, optional
        Default: the varied parameters of the summary.

    Returns
    -------
    list of str
    """
    lines = []
    for parameter in _parameters(summary, parameters):
        ranking = label_ranking(summary[summary["parameter"] == parameter])
        if ranking is None:
            continue
        values = "; ".join(f"{m}: mean |bias| {number(ranking['bias'][m])}, SD {number(ranking['sd'][m])}"
                           for m in ranking["bias"])
        if ranking["holds"]:
            verdict = "holds on " + model
        else:
            broken = [what for what, ok in (("GT's higher bias", ranking["bias_holds"]),
                                            ("GT's lower SD", ranking["sd_holds"])) if not ok]
            verdict = f"differs on {model} ({_join(broken)} not seen)"
        lines.append(f"- **{parameter}**: IVIM's label ranking (GT labels: more bias, less SD than MLE and "
                     f"self-supervised labels) {verdict}: {values}.")
    return lines
