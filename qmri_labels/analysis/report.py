"""Study reports: ``report.md`` with tables and figures, ``grid.csv`` with per-point results,
and :func:`read_grid_results` to rebuild the grid from them.

Files of a results folder written here (every one atomically):

- ``report.md``: setup, the findings in sentences (:mod:`qmri_labels.analysis.findings`), the
  beyond-RMSE table, the best method per metric and parameter, Spearman correlations, paired
  comparisons and the figures (one colour per method in all of them);
- ``grid.csv``: one row per grid point, method and parameter (:meth:`GridResult.to_frame`);
- ``grid_spec.json``: the :class:`GridSpec`, so that ``grid.csv`` can be read back;
- ``spearman.csv``, ``comparisons.csv``: the correlation and paired-test tables;
- ``figures/*.png`` (or ``.pdf``).

``summary.csv``, the config and the manifest belong to the study command. A whole folder is read
back by :func:`qmri_labels.load_results` (:mod:`qmri_labels.workflows.results`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from qmri_labels.analysis.calibration import summarize_calibration
from qmri_labels.analysis.findings import study_findings
from qmri_labels.analysis.grid import GridResult
from qmri_labels.analysis.metrics import spearman_table, summarize
from qmri_labels.analysis.stats import compare_on_grid
from qmri_labels.data.grid import GridSpec
from qmri_labels.fileio import atomic_write_bytes
from qmri_labels.physics import display_unit

GRID_CSV = "grid.csv"
GRID_SPEC = "grid_spec.json"
SUMMARY_CSV = "summary.csv"
SPEARMAN_CSV = "spearman.csv"
COMPARISONS_CSV = "comparisons.csv"
REPORT_MD = "report.md"
FIGURES = "figures"


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    _write_text(path, frame.to_csv(index=False, float_format="%.9g"))


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        return f"{value:.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, columns=None, headers: dict | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (floats to 4 significant digits)."""
    columns = list(frame.columns if columns is None else columns)
    headers = headers or {}
    lines = ["| " + " | ".join(str(headers.get(c, c)).replace("|", "\\|") for c in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for _, row in frame[columns].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def best_methods(summary: pd.DataFrame) -> pd.DataFrame:
    """Per parameter: the method with the lowest mean |bias|, mean SD and RMSE, and the one
    whose sensitivity is closest to 1 (varied parameters only)."""
    rows = []
    table = summary[summary["varied"]] if "varied" in summary else summary
    for name, sub in table.groupby("parameter", sort=False):
        row = {"parameter": name}
        for col, label in (("mean_abs_bias", "lowest mean abs bias"), ("mean_sd", "lowest SD"),
                           ("rmse", "lowest RMSE")):
            ok = sub[col].notna()
            row[label] = sub.loc[sub.loc[ok, col].idxmin(), "method"] if ok.any() else "–"
        if "sensitivity" in sub:
            dist = (sub["sensitivity"] - 1).abs()
            row["sensitivity closest to 1"] = sub.loc[dist.idxmin(), "method"] if dist.notna().any() else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def make_figures(result: GridResult, summary: pd.DataFrame, figures_dir, fmt: str = "png", alpha_sweep=None,
                 reference: str | None = None, colors: dict | None = None) -> dict:
    """Write the standard figures of a study and return ``name -> path``.

    Figures: ``bias_sd_rmse`` (3 x 3 panel), ``quiver_<x>_<y>`` (bias vectors in the planes
    (f, D*) and (f, D) for IVIM; the first two varied parameters otherwise),
    ``hist2d_<reference>_vs_<method>`` (per-point RMSE of each method against the reference),
    ``alpha_sweep`` when the summary holds a hybrid sweep and ``reliability`` when the result
    holds a calibration. Every figure draws a method in the colour ``colors`` gives it
    (default: :func:`~qmri_labels.analysis.plots.method_colors` of the result's methods).

    Parameters
    ----------
    result : GridResult
    summary : DataFrame
    figures_dir : str or Path
    fmt : {"png", "pdf", "svg"}
    alpha_sweep : DataFrame, False or None
        As in :func:`write_report`.
    reference : str, optional
    colors : dict, optional
        Method -> colour, the one map every figure uses.

    Returns
    -------
    dict of figure name -> Path
    """
    from qmri_labels.analysis import plots  # matplotlib: heavy, loaded only for figures

    figures_dir = Path(figures_dir)
    written = {}
    colors = colors if colors is not None else plots.method_colors(result.methods)

    def save(name, fig):
        written[name] = plots.save_figure(fig, figures_dir / name, fmt)

    save("bias_sd_rmse", plots.plot_bias_sd_rmse(result, colors=colors))
    varied = list(result.grid.varied)
    if len(varied) >= 2:
        planes = [("f", "Dstar"), ("f", "D")] if {"f", "D", "Dstar"} <= set(varied) else [tuple(varied[:2])]
        for x, y in planes:
            save(f"quiver_{x}_{y}", plots.plot_bias_quiver(result, x, y, colors=colors))
    reference = _reference(result, reference)
    for m in result.methods:
        if m != reference:
            save(f"hist2d_{reference}_vs_{m}", plots.plot_error_hist2d(result, reference, m))
    sweep = _sweep(summary, alpha_sweep)
    if sweep is not None and sweep["alpha"].nunique() >= 2:
        save("alpha_sweep", plots.plot_alpha_sweep(sweep, units=result.units, colors=colors))
    if result.calibration is not None and result.calibration.methods:
        save("reliability", plots.plot_reliability(result.calibration, parameters=varied or None, colors=colors))
    return written


def _reference(result: GridResult, reference) -> str:
    if reference is None:
        return "fit-mle" if "fit-mle" in result.methods else result.methods[0]
    if reference not in result.methods:
        raise ValueError(f"reference {reference!r} is not among the methods {result.methods}")
    return reference


def _sweep(summary, alpha_sweep):
    from qmri_labels.analysis.plots import alpha_sweep_table  # plots import matplotlib: heavy, loaded when used

    if alpha_sweep is False:
        return None
    if alpha_sweep is None:
        sweep = alpha_sweep_table(summary)
        if "varied" in sweep:
            sweep = sweep[sweep["varied"].astype(bool)]
        return sweep if not sweep.empty else None
    if not isinstance(alpha_sweep, pd.DataFrame):
        raise ValueError("alpha_sweep must be None, False or a DataFrame with columns alpha, parameter, ...")
    return alpha_sweep


def write_report(out_dir, result: GridResult, summary: pd.DataFrame | None = None, config: dict | None = None,
                 alpha_sweep=None, fmt: str = "png", reference: str | None = None, title: str = "Study report",
                 notes: str | None = None, figures: bool = True, results_by_snr: dict | None = None,
                 sections: list | None = None, seed_table: pd.DataFrame | None = None,
                 seed_findings: pd.DataFrame | None = None) -> Path:
    """Write ``report.md``, ``grid.csv``, ``grid_spec.json``, the tables and the figures.

    Parameters
    ----------
    out_dir : str or Path
        Results folder (created if missing).
    result : GridResult
    summary : DataFrame, optional
        :func:`summarize` output (computed when omitted); extra columns are kept.
    config : dict, optional
        The study's resolved configuration, shown in the report.
    alpha_sweep : DataFrame, False or None
        Table for the alpha figure (columns ``alpha``, ``parameter``, ``mean_abs_bias``,
        ``mean_sd``, ``rmse``); None derives it from hybrid methods in the summary; False
        leaves the figure out.
    fmt : {"png", "pdf", "svg"}
        Figure format.
    reference : str, optional
        Method the others are compared with (default ``fit-mle`` if present, else the first).
    title : str
    notes : str, optional
        Markdown appended under "Notes".
    figures : bool
        Draw the figures (False writes the tables only, e.g. for quick runs).
    results_by_snr : dict of float to GridResult, optional
        The same grid at several SNRs (``result`` is one of them, the report's main one):
        ``grid.csv`` then holds every SNR (column ``snr``), the report gains a table of the
        metrics across SNRs and ``figures/snr-<s>/`` the bias/SD/RMSE figure of each SNR.
    sections : list of str, optional
        Further markdown sections (e.g. tuned vs default, seeds), placed before the
        configuration.
    seed_table, seed_findings : DataFrame, optional
        With several training seeds: :func:`~qmri_labels.analysis.fairness.seed_summary` and
        :func:`~qmri_labels.analysis.fairness.seed_findings`, so that the findings say which
        differences exceed the seed-to-seed spread.

    Returns
    -------
    Path
        Path of ``report.md``.
    """
    if not isinstance(result, GridResult):
        raise ValueError(f"result must be a GridResult, got {type(result).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if summary is None:
        summary = summarize(result)
    missing = {"method", "parameter", "mean_abs_bias", "mean_sd", "rmse"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary lacks columns {sorted(missing)}")
    reference = _reference(result, reference)

    by_snr = dict(results_by_snr or {})
    if by_snr and not any(r is result for r in by_snr.values()):
        raise ValueError("results_by_snr must include result (the report's main SNR)")
    if len(by_snr) > 1:
        _write_csv(out_dir / GRID_CSV, pd.concat([r.to_frame() for _, r in sorted(by_snr.items())], ignore_index=True))
    else:
        _write_csv(out_dir / GRID_CSV, result.to_frame())
    _write_text(out_dir / GRID_SPEC, json.dumps(result.grid.to_dict(), indent=2))
    spearman = spearman_table(result)
    _write_csv(out_dir / SPEARMAN_CSV, spearman)
    comparisons = None
    if len(result.methods) >= 2:
        comparisons = compare_on_grid(result, metric="abs_error", reference=reference)
        _write_csv(out_dir / COMPARISONS_CSV, comparisons)
    snr_figures, colors = {}, None
    if figures:
        from qmri_labels.analysis import plots  # matplotlib: heavy, loaded only for figures

        colors = plots.method_colors(list(dict.fromkeys([*result.methods,
                                                         *(m for r in by_snr.values() for m in r.methods)])))
        if len(by_snr) > 1:
            for snr, res in sorted(by_snr.items()):
                snr_figures[snr] = plots.save_figure(plots.plot_bias_sd_rmse(res, colors=colors),
                                                     out_dir / FIGURES / f"snr-{snr:g}" / "bias_sd_rmse", fmt)
    figures = make_figures(result, summary, out_dir / FIGURES, fmt, alpha_sweep, reference, colors) if figures else {}
    if result.calibration is not None and not set(CALIBRATION_COLUMNS) <= set(summary.columns):
        summary = add_calibration(summary, result)

    grid = result.grid
    lines = [f"# {title}", ""]
    lines += ["## Setup", "",
              f"- model: `{grid.model}`, protocol ({len(grid.protocol)} measurements): "
              f"{', '.join(f'{b:g}' for b in grid.protocol)}",
              f"- noise: {grid.noise}, SNR {grid.snr:g} (sigma = {grid.sigma:.4g}), seed {grid.seed}",
              f"- evaluation grid: {grid.n_points} points "
              f"({' x '.join(f'{len(grid.axes[n])} {n}' for n in grid.varied)}), "
              f"{grid.repeats} noise repeats each; fixed: "
              + ", ".join(f"{k} = {v:g}" for k, v in grid.fixed.items()),
              "- axes: " + "; ".join(f"{n} in [{min(grid.axes[n]):.4g}, {max(grid.axes[n]):.4g}] "
                                     f"{display_unit(result.units[n])}" for n in grid.varied), ""]
    findings = study_findings(summary, comparisons, seed_table, seed_findings, parameters=list(grid.varied) or None)
    if findings:
        lines += ["## Findings", "",
                  "Read off the tables below (mean over the grid; paired tests on the per-point RMSE"
                  + (", seed spread over the training seeds" if seed_table is not None else "") + ").", "",
                  *findings, ""]
    lines += ["## Beyond RMSE", "",
              "Per method and parameter over the grid: mean |bias|, mean SD over the noise repeats, RMSE, "
              "*sensitivity* (slope of the mean estimate against the truth: 1 ideal, 0 = ignores the truth) "
              "and *efficiency* (median over points of CRLB / observed variance: > 1 is only possible "
              "with bias). Units are the parameters' own ("
              + ", ".join(f"{n} in {display_unit(result.units[n])}" for n in grid.varied) + ").", ""]
    cols = [c for c in ("method", "parameter", "mean_abs_bias", "mean_sd", "rmse", "sensitivity", "efficiency",
                        "mean_crlb_sd", "valid_fraction") if c in summary.columns]
    shown = summary[summary["varied"].astype(bool)] if "varied" in summary else summary
    lines += [markdown_table(shown, cols, {"mean_abs_bias": "mean abs bias", "mean_sd": "mean SD",
                                           "rmse": "RMSE", "mean_crlb_sd": "mean CRLB SD",
                                           "valid_fraction": "valid"}), ""]
    lines += ["### Best per parameter", "", markdown_table(best_methods(summary)), ""]
    if "bias_sd_rmse" in figures:
        lines += ["## Bias, SD and RMSE across the parameter range", "",
                  "Each curve is averaged over the other parameters; dashed: the Cramer-Rao bound, the smallest "
                  "SD an unbiased estimator can reach.", "",
                  f"![bias, SD and RMSE]({FIGURES}/{figures['bias_sd_rmse'].name})", ""]
    if result.calibration is not None:
        lines += calibration_section(result, summary, figures.get("reliability"))
    quivers = [k for k in figures if k.startswith("quiver_")]
    if quivers:
        lines += ["## Bias vectors", "", "Arrows go from the true value to the mean estimate.", ""]
        lines += [f"![{k}]({FIGURES}/{figures[k].name})" for k in quivers] + [""]
    hists = [k for k in figures if k.startswith("hist2d_")]
    if hists:
        lines += [f"## Per-point RMSE against {reference}", ""]
        lines += [f"![{k}]({FIGURES}/{figures[k].name})" for k in hists] + [""]
    if "alpha_sweep" in figures:
        lines += ["## Alpha sweep", "", "Hybrid loss `alpha * L_mle + (1 - alpha) * L_gt`; net-gt is alpha = 0 and "
                  "net-mle alpha = 1.", "", f"![alpha sweep]({FIGURES}/{figures['alpha_sweep'].name})", ""]
    if len(by_snr) > 1:
        lines += snr_section(by_snr, snr_figures)
    lines += ["## Correlations between estimates (Spearman)", "",
              "`noise_rho`: over the noise repeats of a point, averaged over points; `grid_rho`: of the mean "
              "estimates over the grid (the truth's own is `true_rho`, 0 on a full grid).", "",
              markdown_table(spearman), ""]
    if comparisons is not None:
        lines += [f"## Paired comparisons against {reference}", "",
                  f"Per-point RMSE over the {grid.n_points} grid points, paired t-test (differences are "
                  f"{reference} minus the other), Bonferroni-corrected over all {len(comparisons)} comparisons; "
                  "effect size Cohen's d_z.", "",
                  markdown_table(comparisons, ["parameter", "a", "b", "mean_diff", "t", "p_adjusted", "significant",
                                               "cohen_dz"], {"mean_diff": "mean diff", "p_adjusted": "p (Bonferroni)"}),
                  ""]
    if result.timings:
        lines += ["## Estimator time on the grid", "",
                  markdown_table(pd.DataFrame({"method": list(result.timings),
                                               "seconds": list(result.timings.values())})), ""]
    for section in sections or []:
        lines += [section.rstrip(), ""]
    if config is not None:
        lines += ["## Configuration", "", "```yaml",
                  yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=None).rstrip(), "```", ""]
    if notes:
        lines += ["## Notes", "", notes.rstrip(), ""]
    lines += [f"Per-point results: `{GRID_CSV}` (grid spec in `{GRID_SPEC}`), correlations `{SPEARMAN_CSV}`"
              + (f", comparisons `{COMPARISONS_CSV}`." if comparisons is not None else "."), ""]
    path = out_dir / REPORT_MD
    _write_text(path, "\n".join(lines))
    return path


#: summary.csv columns of the calibration of reported SDs (NaN for a method that reports none)
CALIBRATION_COLUMNS = ("coverage_50", "coverage_90", "coverage_95", "mean_halfwidth_50", "mean_halfwidth_90",
                       "mean_halfwidth_95", "crps", "z_rms", "sd_reported_fraction")
#: z_rms above which (with 95 % coverage below nominal) the report calls a method over-confident
OVERCONFIDENT_Z_RMS = 1.1


def add_calibration(summary: pd.DataFrame, result: GridResult) -> pd.DataFrame:
    """``summary`` with the :data:`CALIBRATION_COLUMNS` of ``result.calibration`` merged on
    (method, parameter); NaN for methods that reported no SD (and for all when none did)."""
    summary = summary.drop(columns=[c for c in CALIBRATION_COLUMNS if c in summary.columns])
    if result.calibration is not None and result.calibration.methods:
        table = summarize_calibration(result.calibration).rename(columns={"reported_fraction": "sd_reported_fraction"})
        table = table[["method", "parameter", *CALIBRATION_COLUMNS]]
    else:
        table = pd.DataFrame(columns=["method", "parameter", *CALIBRATION_COLUMNS])
    merged = summary.merge(table, on=["method", "parameter"], how="left")
    for col in CALIBRATION_COLUMNS:
        merged[col] = merged[col].astype(float)
    return merged


def overconfidence_sentences(summary: pd.DataFrame, methods, parameters) -> list:
    """One sentence per method: over-confident by how much (z_rms, 95 % coverage), calibrated,
    or SD not reported."""
    out = []
    for method in methods:
        sub = summary[(summary["method"] == method) & summary["parameter"].isin(parameters)].set_index("parameter")
        if sub.empty:
            continue
        if "z_rms" not in sub or sub["z_rms"].isna().all():
            out.append(f"- **{method}**: SD not reported (no uncertainty head or ensemble), so its calibration is "
                       "not assessed.")
            continue
        over = [(p, sub.loc[p, "z_rms"], sub.loc[p, "coverage_95"]) for p in parameters if p in sub.index
                and sub.loc[p, "z_rms"] > OVERCONFIDENT_Z_RMS and sub.loc[p, "coverage_95"] < 0.95]
        if over:
            parts = [f"{p} (errors {z:.2g}x the reported SD, 95 % intervals cover {100 * c:.0f} %)"
                     for p, z, c in over]
            out.append(f"- **{method}** is over-confident for " + ", ".join(parts) + ".")
        else:
            under = any(sub.loc[p, "z_rms"] < 1 / OVERCONFIDENT_Z_RMS for p in parameters if p in sub.index)
            shown = ", ".join(f"{p} z_rms {sub.loc[p, 'z_rms']:.2g} / coverage {100 * sub.loc[p, 'coverage_95']:.0f} %"
                              for p in parameters if p in sub.index)
            verdict = "is not over-confident" + ("; its SDs are too wide (under-confident) where z_rms < 0.91"
                                                 if under else "")
            out.append(f"- **{method}** {verdict} ({shown}).")
    return out


def calibration_section(result: GridResult, summary: pd.DataFrame, figure=None) -> list:
    """Report lines on the calibration of reported SDs: table, reliability figure, and one
    sentence per method."""
    parameters = list(result.grid.varied) or list(result.param_names)
    shown = summary[summary["parameter"].isin(parameters)]
    cols = ["method", "parameter", "coverage_50", "coverage_90", "coverage_95", "mean_halfwidth_95", "crps", "z_rms"]
    cols += [c for c in ("mean_sd", "mean_crlb_sd") if c in summary.columns]
    lines = ["## Calibration of the reported uncertainty", "",
             "Each method's reported SD turned into central intervals `estimate -/+ z SD` and checked against the "
             "truth over every grid point and noise repeat: *coverage* of the nominal 50/90/95 % intervals "
             "(calibrated: the nominal level), the mean 95 % half-width (sharpness), the CRPS (a proper score in "
             "the parameter's units, lower is better) and *z_rms*, the RMS of (truth - estimate) / SD (1 calibrated; "
             "2: the errors are twice what the SDs say). Beside them the observed mean SD over the noise repeats "
             "and the Cramer-Rao bound. The MLE reports Wald SEs from the Fisher information; networks the SD of "
             "their heteroscedastic head or ensemble, calibrated against the truth on their validation split "
             "(`NetworkEstimator` docstring). "
             "Methods without an SD show `–`.", "",
             markdown_table(shown, [c for c in cols if c in shown.columns],
                            {"mean_halfwidth_95": "mean 95 % half-width", "mean_sd": "mean SD",
                             "mean_crlb_sd": "mean CRLB SD"}), ""]
    lines += overconfidence_sentences(summary, result.methods, parameters) + [""]
    if figure is not None:
        lines += ["Reliability diagram: observed against nominal coverage (diagonal: calibrated; below it: "
                  "over-confident).", "", f"![reliability]({FIGURES}/{Path(figure).name})", ""]
    return lines


def snr_table(results_by_snr: dict, metrics=("mean_abs_bias", "mean_sd", "rmse", "sensitivity")) -> pd.DataFrame:
    """Summary metrics of every method and varied parameter at every SNR (long table)."""
    frames = []
    for snr, res in sorted(results_by_snr.items()):
        summary = summarize(res)
        summary = summary[summary["varied"].astype(bool)] if "varied" in summary else summary
        summary.insert(0, "snr", snr)
        frames.append(summary[["snr", "method", "parameter", *[m for m in metrics if m in summary]]])
    return pd.concat(frames, ignore_index=True)


def snr_section(results_by_snr: dict, figures: dict | None = None) -> list:
    """Markdown lines: RMSE (and bias, SD) per method and parameter across the SNRs."""
    table = snr_table(results_by_snr)
    lines = ["## Across SNRs", "",
             "The same grid and noise draws at each SNR; networks are the same at every SNR (trained once).", ""]
    for metric, header in (("rmse", "RMSE"), ("mean_abs_bias", "mean abs bias"), ("mean_sd", "mean SD")):
        wide = table.pivot_table(index=["parameter", "method"], columns="snr", values=metric, sort=False).reset_index()
        wide.columns = [c if isinstance(c, str) else f"SNR {c:g}" for c in wide.columns]
        lines += [f"### {header}", "", markdown_table(wide), ""]
    for snr, path in sorted((figures or {}).items()):
        lines += [f"![bias, SD and RMSE at SNR {snr:g}]({FIGURES}/snr-{snr:g}/{Path(path).name})"]
    return lines + [""]


def _plain(obj):
    """Config values as YAML-safe plain types."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_grid_results(folder) -> dict[float, GridResult]:
    """The evaluation grid of a results folder (``grid.csv`` + ``grid_spec.json``) by SNR.

    Parameters
    ----------
    folder : str or Path

    Returns
    -------
    dict
        ``{snr: GridResult}``, empty if the folder has no ``grid.csv``.

    Raises
    ------
    ValueError
        If ``grid.csv`` is there without the ``grid_spec.json`` it needs.
    """
    folder = Path(folder)
    if not (folder / GRID_CSV).exists():
        return {}
    if not (folder / GRID_SPEC).exists():
        raise ValueError(f"{folder}: {GRID_CSV} without {GRID_SPEC}; cannot rebuild the grid")
    grid = GridSpec.from_dict(json.loads((folder / GRID_SPEC).read_text()))
    frame = pd.read_csv(folder / GRID_CSV)
    snrs = sorted(set(frame["snr"].astype(float))) if "snr" in frame else [grid.snr]
    return {s: GridResult.from_frame(frame[frame["snr"] == s] if "snr" in frame else frame, grid.replace(snr=s))
            for s in snrs}
