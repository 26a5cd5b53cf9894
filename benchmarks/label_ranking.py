"""The label-ranking tables of label-study results folders, as Markdown (for docs/label_ranking.md).

Reads each folder's ``summary.csv`` (at the study's primary SNR), ``config.yaml`` and, for a
fat-water study, ``swap_rates.csv``, and prints per model and varied parameter every method's
mean |bias|, mean SD, RMSE and sensitivity, the methods ordered by mean |bias|; whether IVIM's
label ranking holds (the study report's own sentence); where ``bias_reduced`` sits on the
bias/SD plane against the GT and MLE labels; and the swap rates::

    python benchmarks/label_ranking.py runs/ivim runs/t2 runs/fatwater > tables.md

Nothing is computed beyond what the study wrote: the numbers are the folders' own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from qmri_labels.analysis.findings import label_ranking, ranking_sentences

METRICS = {"mean_abs_bias": "mean abs bias", "mean_sd": "mean SD", "rmse": "RMSE", "sensitivity": "sensitivity"}


def _number(value) -> str:
    return "-" if pd.isna(value) else f"{value:.4g}"


def _table(frame: pd.DataFrame, columns: dict) -> list[str]:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(row[c]) if isinstance(row[c], str) else _number(row[c])
                                       for c in columns) + " |")
    return lines


def _swap_lines(rates: pd.DataFrame) -> list[str]:
    """Swap fractions as a method x band Markdown table (methods and bands in the file's order)."""
    wide = rates.pivot(index="method", columns="band", values="swap_fraction")
    wide = wide.loc[list(dict.fromkeys(rates["method"])), list(dict.fromkeys(rates["band"]))]
    wide.columns.name = None
    wide = wide.reset_index()
    return _table(wide, {c: c for c in wide.columns})


def primary_summary(folder: Path) -> pd.DataFrame:
    """The folder's summary rows at its primary (first) SNR."""
    summary = pd.read_csv(folder / "summary.csv")
    if "snr" in summary:
        summary = summary[summary["snr"] == summary["snr"].iloc[0]]
    return summary


def placement(sub: pd.DataFrame) -> str | None:
    """Where net-bias_reduced sits against net-gt (bias) and net-mle (SD), in a sentence."""
    rows = sub.set_index("method")
    if not {"net-bias_reduced", "net-gt", "net-mle"} <= set(rows.index):
        return None
    b, s = rows.loc["net-bias_reduced", "mean_abs_bias"], rows.loc["net-bias_reduced", "mean_sd"]
    gt_b, mle_s = rows.loc["net-gt", "mean_abs_bias"], rows.loc["net-mle", "mean_sd"]
    where = ("where Mao et al. place it" if b < gt_b and s < mle_s else
             "not where Mao et al. place it (" + " and ".join(
                 text for text, miss in (("bias not below GT's", b >= gt_b), ("SD not below MLE's", s >= mle_s))
                 if miss) + ")")
    fitter = (f", the MLE fit {_number(rows.loc['fit-mle', 'mean_sd'])}" if "fit-mle" in rows.index else "")
    return (f"bias_reduced: mean |bias| {_number(b)} (GT labels {_number(gt_b)}), mean SD {_number(s)} "
            f"(MLE labels {_number(mle_s)}{fitter}): {where}.")


def folder_tables(folder: Path) -> list[str]:
    """Markdown lines for one results folder."""
    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    summary = primary_summary(folder)
    model = config.get("model", "?")
    model = model if isinstance(model, str) else model.get("class", "?")
    snr = summary["snr"].iloc[0] if "snr" in summary else config.get("snr")
    lines = [f"### {model} (`{folder.name}`: SNR {snr:g}, n_train {config.get('n_train')}, "
             f"max_epochs {config.get('max_epochs')}, grid {config.get('grid', {}).get('points_per_axis')} points "
             f"per axis x {config.get('grid', {}).get('repeats')} repeats)", ""]
    varied = summary[summary["varied"].astype(bool)] if "varied" in summary else summary
    for parameter in dict.fromkeys(varied["parameter"]):
        sub = varied[varied["parameter"] == parameter].sort_values("mean_abs_bias", kind="stable")
        unit = sub["unit"].iloc[0] if "unit" in sub else ""
        lines += [f"**{parameter}** [{unit}]", "", *_table(sub, {"method": "method", **METRICS}), ""]
        sentences = ranking_sentences(sub, model)
        sentence = placement(sub)
        if sentence:
            sentences.append(f"- {sentence}")
        lines += [*sentences, ""] if sentences else []
    swaps = folder / "swap_rates.csv"
    if swaps.is_file():
        lines += ["Fat/water swap fraction of the held-out voxels by true PDFF band (`swap_rates.csv`):", "",
                  *_swap_lines(pd.read_csv(swaps)), ""]
    return lines


#: edges of the true-R2* bands (1/s) of :func:`fitter_swaps`' second table
R2STAR_BANDS = (0.0, 250.0, 500.0, 750.0, 1000.0)


def fitter_swaps(folder: Path, n_starts: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Swap rates of the MLE fitter with ``n_starts`` starts beside the study's default fitter,
    on the study's own held-out set (regenerated from its manifest's spec, the known sigma):
    by band of true PDFF (:func:`~qmri_labels.analysis.swaps.swap_rates`), and by band of true
    R2* (method x band, the last band closed)."""
    import json

    from qmri_labels.analysis.swaps import swap_rates, swapped
    from qmri_labels.data import DatasetSpec
    from qmri_labels.fitting import fit_mle

    spec = dict(json.loads((folder / "manifest.json").read_text())["data"]["heldout"]["spec"])
    heldout = DatasetSpec.from_dict(spec).generate()
    names = list(heldout.param_names)
    i, j = names.index("PDFF"), names.index("R2star")
    fits = {}
    for name, starts in (("fit-mle (default starts)", None), (f"fit-mle ({n_starts} start)", n_starts)):
        options = {} if starts is None else {"n_starts": starts}
        fit = fit_mle(heldout.signals, heldout.protocol, model=heldout.spec.model, noise=heldout.spec.noise,
                      sigma=heldout.sigma, **options)
        fits[name] = fit.params[:, i]
    truth = heldout.theta_true
    by_r2 = []
    for name, estimate in fits.items():
        swaps = swapped(estimate, truth[:, i])
        row = {"method": name}
        for k, (low, high) in enumerate(zip(R2STAR_BANDS[:-1], R2STAR_BANDS[1:])):
            last = k == len(R2STAR_BANDS) - 2
            sel = (truth[:, j] >= low) & ((truth[:, j] <= high) if last else (truth[:, j] < high))
            row[f"R2* {low:g}-{high:g}"] = float(swaps[sel].mean()) if sel.any() else float("nan")
        by_r2.append(row)
    return swap_rates(fits, truth[:, i]), pd.DataFrame(by_r2)


def _varied_parameters(folders):
    """``(folder, its config, model name, parameter, its summary rows)`` for every varied
    parameter of every study folder, at the study's primary SNR."""
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        model = config.get("model", "?") if isinstance(config.get("model"), str) else "?"
        summary = primary_summary(folder)
        varied = summary[summary["varied"].astype(bool)] if "varied" in summary else summary
        for parameter in dict.fromkeys(varied["parameter"]):
            yield folder, config, model, parameter, varied[varied["parameter"] == parameter]


def overview(folders) -> list[str]:
    """One Markdown table over the folders: per model and varied parameter, the mean |bias| and
    mean SD of GT, MLE and self-supervised labels and whether IVIM's ranking holds."""
    rows = []
    for folder, config, model, parameter, rows_p in _varied_parameters(folders):
        ranking = label_ranking(rows_p)
        if ranking is None:
            continue
        cells = [f"{_number(ranking['bias'].get(m))} / {_number(ranking['sd'].get(m))}"
                 for m in ("net-gt", "net-mle", "net-self")]
        verdict = "holds" if ranking["holds"] else "differs: " + " and ".join(
            what for what, ok in (("GT's bias not highest", ranking["bias_holds"]),
                                  ("GT's SD not lowest", ranking["sd_holds"])) if not ok)
        rows.append(f"| {model} | `{folder.name}` | {parameter} | " + " | ".join(cells) + f" | {verdict} |")
    return ["| model | run | parameter | GT: mean abs bias / mean SD | MLE | self | IVIM's ranking |",
            "|---|---|---|---|---|---|---|", *rows]


def placements(folders) -> list[str]:
    """One Markdown table over the folders: per model and varied parameter, net-bias_reduced's
    mean |bias| beside GT labels' and its mean SD beside MLE labels' and the MLE fit's."""
    rows = []
    for folder, config, model, parameter, rows_p in _varied_parameters(folders):
        rows_p = rows_p.set_index("method")
        if not {"net-bias_reduced", "net-gt", "net-mle"} <= set(rows_p.index):
            continue
        br, gt, mle = (rows_p.loc[m] for m in ("net-bias_reduced", "net-gt", "net-mle"))
        fit = _number(rows_p.loc["fit-mle", "mean_sd"]) if "fit-mle" in rows_p.index else "-"
        below_gt = br["mean_abs_bias"] < gt["mean_abs_bias"]
        below_mle = br["mean_sd"] < mle["mean_sd"]
        rows.append(f"| {model} ({config.get('n_train')}) | {parameter} | {_number(br['mean_abs_bias'])} | "
                    f"{_number(gt['mean_abs_bias'])} | {_number(br['mean_sd'])} | {_number(mle['mean_sd'])} | "
                    f"{fit} | {'yes' if below_gt and below_mle else 'no'} |")
    return ["| model (training signals) | parameter | bias_reduced: mean abs bias | GT labels | bias_reduced: "
            "mean SD | MLE labels | MLE fit | lower bias than GT and SD below MLE labels? |",
            "|---|---|---|---|---|---|---|---|", *rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="label-study results folders")
    parser.add_argument("--single-start", action="store_true",
                        help="fat-water folders: also fit the held-out set from one (water-dominant) start and "
                             "give both fitters' swap rates")
    parser.add_argument("--overview", action="store_true",
                        help="print only one table over all folders (GT, MLE and self-supervised labels)")
    parser.add_argument("--placement", action="store_true",
                        help="print only one table over all folders of where bias_reduced sits (bias against GT "
                             "labels, SD against MLE labels)")
    args = parser.parse_args(argv)
    if args.placement:
        print("\n".join(placements(args.folders)))
        return 0
    if args.overview:
        print("\n".join(overview(args.folders)))
        return 0
    for folder in args.folders:
        print("\n".join(folder_tables(folder)))
        if args.single_start and (folder / "swap_rates.csv").is_file():
            by_pdff, by_r2 = fitter_swaps(folder)
            print("\n".join(["MLE fitter, default starts against one start, on the same held-out voxels, by true "
                             "PDFF:", "", *_swap_lines(by_pdff), "", "and by true R2* (1/s):", "",
                             *_table(by_r2, {c: c for c in by_r2.columns}), ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
