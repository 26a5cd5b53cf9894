"""The QSM activation study (kind ``qsm_activation``), after Graf et al. (2023): ReLU / leaky ReLU /
ELU x 16 and 32 initial channels; validation loss and NRMSE per epoch, convergence plots, a final
NRMSE/SSIM table and example slices with difference maps."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np
import pandas as pd

from qmri_labels.fileio import atomic_write_bytes
from qmri_labels.workflows.common import add_correction, markdown, merge_config, paired_test
from qmri_labels.workflows.qsm.common import (
    FREE_FORM_KEYS,
    STUDY_DEFAULTS,
    evaluate_methods,
    field_label,
    make_phantom_sets,
    save_png,
    show,
    slices_figure,
    study_estimator,
    write_manifest,
    write_table,
)

DEFAULTS: dict[str, Any] = {
    **copy.deepcopy(STUDY_DEFAULTS),
    "kind": "qsm_activation",
    "label": "graf",
    "field_weight": 1.0,
    "activations": [["relu", 0.0], ["leaky_relu", 0.2], ["elu", 0.0]],
    "channels": [16, 32],
    "example_slices": 3,
    # seeds of the networks' initialisation and batch order (the heads are those of `seed`); None:
    # [seed]. With several, each activation x channels runs once per seed, and the report says
    # whether an activation's convergence differs by more than the spread between seeds
    "training_seeds": None,
    # validation loss whose first epoch is each run's "epochs to reach" (None: the worst run's
    # best validation loss, a level that every run reaches)
    "reach_loss": None,
}
DEFAULTS["phantom"]["n_orientations"] = 1


def run(config: Mapping | None, out: Path, quiet: bool = True) -> dict:
    """Run the activation study of ``config`` (merged over :data:`DEFAULTS`).

    Parameters
    ----------
    config : mapping or None
        Entries over :data:`DEFAULTS` (a key it does not have is an error).
    out : Path
        Results folder: results.csv, history.csv, report.md, figures, manifest.json.
    quiet : bool

    Returns
    -------
    dict
        ``results`` (rows per method), ``history``, ``out``, ``timings_s``, ``summary_text``.
    """
    return run_resolved(merge_config(DEFAULTS, config, FREE_FORM_KEYS), out, quiet)


def run_resolved(config: Mapping, out: Path, quiet: bool = True) -> dict:
    """:func:`run` of a configuration merged over :data:`DEFAULTS`: nothing is merged again.

    Parameters
    ----------
    config : mapping
        The complete configuration.
    out : Path
        Results folder.
    quiet : bool

    Returns
    -------
    dict
        As :func:`run`.
    """
    # pyplot is imported when a figure is drawn, after the backend is chosen
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, val, test = make_phantom_sets(config)
    timings = {"phantoms": time.perf_counter() - t0}
    networks, histories, runs = {}, {}, {}
    seeds = [int(config["seed"])] if config["training_seeds"] is None else [int(s) for s in config["training_seeds"]]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"training_seeds must be distinct integers, got {config['training_seeds']!r}")
    for seed in seeds:
        for act, slope in config["activations"]:
            for ch in config["channels"]:
                name = f"{act}-{int(ch)}" + (f"-s{seed}" if len(seeds) > 1 else "")
                show(quiet, f"[qsm_activation] training {name}")
                t1 = time.perf_counter()
                est = study_estimator(config, seed, label=config["label"], field_weight=float(config["field_weight"]),
                                      unet={"activation": act,
                                            "negative_slope": float(slope) if act == "leaky_relu" else 0.2,
                                            "init_channels": int(ch)}).fit(train, validation=val)
                timings[name] = time.perf_counter() - t1
                networks[name] = est
                histories[name] = est.history_
                runs[name] = {"activation": act, "channels": int(ch), "seed": seed}
    rows, estimates = evaluate_methods(networks, test, train, tkd_threshold=float(config["tkd_threshold"]),
                                       tikhonov_lambdas=config["tikhonov_lambdas"], tv_lambdas=config["tv_lambdas"],
                                       include_cosmos=False)
    table = pd.DataFrame(rows)
    write_table(out / "results.csv", table)
    hist = pd.DataFrame([{"network": n, **r} for n, h in histories.items() for r in h])
    write_table(out / "history.csv", hist)

    convergence, summary, elu = seed_analysis(histories, runs, table, config)
    write_table(out / "convergence.csv", convergence)
    write_table(out / "seed_summary.csv", summary)
    if len(elu):
        write_table(out / "elu_tests.csv", elu)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in histories.items():
        ep = [r["epoch"] for r in h]
        axes[0].plot(ep, [r.get("val_loss", np.nan) for r in h], marker="o", label=name)
        axes[1].plot(ep, [r.get("val_nrmse", np.nan) for r in h], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="validation loss", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="validation NRMSE (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "convergence.png")
    fig = slices_figure(test, estimates, 0, int(config["example_slices"]))
    save_png(fig, out / "slices.png")
    report = ["# QSM activation / channel study (after Graf et al. 2023)", "",
              f"Label {config['label']!r}; {len(train)} training and {len(test)} held-out phantoms of shape "
              f"{list(test.chi.shape[1:])}, input: {field_label(test)}.", "",
              markdown(table), "",
              f"## Convergence (training seeds {seeds})", "",
              f"Epochs to reach a validation loss of {convergence['reach_loss'].iloc[0]:.4g} (the first epoch at "
              f"or below it, counting from 1; empty: not reached), best and mean validation loss over the "
              f"epochs, per run:", "", markdown(convergence), "",
              "Mean and SD over the training seeds:", "", markdown(summary), ""]
    if len(elu):
        report += [f"ELU against the other activations at each channel count, paired by training seed "
                   f"(paired t-tests, Bonferroni over the {len(elu)} comparisons; no t-test where every seed "
                   f"differs by the same amount; wilcoxon_p: the exact signed-rank test, uncorrected, whose "
                   f"smallest value with {len(seeds)} seeds is {2 / 2 ** len(seeds):.3g}); 'beyond_spread' says "
                   f"whether the mean difference exceeds the larger of the two seed SDs:", "", markdown(elu), ""]
    report += ["![convergence](convergence.png)", "", "![slices](slices.png)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(report).encode())
    timings["total"] = time.perf_counter() - t0
    write_manifest(config, out, {"train": train, "val": val, "test": test}, timings)
    show(quiet, table.to_string(index=False))
    return {"results": rows, "history": hist.to_dict("records"), "out": str(out), "timings_s": timings,
            "summary_text": table.to_string(index=False, float_format=lambda v: f"{v:.3f}")}


def seed_analysis(histories: Mapping[str, list], runs: Mapping[str, dict], results: pd.DataFrame, config: Mapping):
    """Convergence per run, its mean and SD over training seeds, and ELU against the others.

    Parameters
    ----------
    histories : mapping
        Run name -> the network's ``history_`` (one dict per epoch with ``val_loss``).
    runs : mapping
        Run name -> ``{"activation", "channels", "seed"}``.
    results : DataFrame
        The held-out scores (``method`` = run name, ``nrmse``, ``ssim``).
    config : mapping
        The study's configuration (``reach_loss``, ``alpha`` if given).

    Returns
    -------
    convergence, summary, elu_tests : DataFrame
    """
    losses = {n: np.array([r.get("val_loss", np.nan) for r in h], dtype=float) for n, h in histories.items()}
    reach = config.get("reach_loss")
    if reach is None:
        reach = float(max(np.nanmin(v) for v in losses.values()))
    scores = results.set_index("method")
    rows = []
    for name, v in losses.items():
        hit = np.flatnonzero(v <= reach)
        rows.append({"run": name, **runs[name], "reach_loss": float(reach),
                     "epochs_to_reach": float(hit[0] + 1) if hit.size else np.nan,
                     "best_val_loss": float(np.nanmin(v)), "mean_val_loss": float(np.nanmean(v)),
                     "final_val_loss": float(v[-1]), "nrmse": float(scores.loc[name, "nrmse"]),
                     "ssim": float(scores.loc[name, "ssim"])})
    convergence = pd.DataFrame(rows)
    measures = ["epochs_to_reach", "mean_val_loss", "best_val_loss", "nrmse", "ssim"]
    grouped = convergence.groupby(["activation", "channels"], sort=False)[measures]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_sd")).reset_index()
    summary.insert(2, "n_seeds", grouped.size().to_numpy())
    tests = []
    if convergence["seed"].nunique() > 1:
        for ch in sorted(convergence["channels"].unique()):
            at = convergence[convergence["channels"] == ch]
            elu = at[at["activation"] == "elu"].set_index("seed")
            for other in [a for a in at["activation"].unique() if a != "elu"]:
                rival = at[at["activation"] == other].set_index("seed")
                common = sorted(set(elu.index) & set(rival.index))
                for measure in ("epochs_to_reach", "mean_val_loss"):
                    a, b = elu.loc[common, measure].to_numpy(float), rival.loc[common, measure].to_numpy(float)
                    stats = paired_test(a, b, "elu", other)
                    if not np.nanstd(a - b) > 0:
                        # every seed differs by the same amount (whole epochs often do): the t
                        # statistic is infinite and its p-value meaningless; the rank test stays
                        stats.update(t=np.nan, p_value=np.nan)
                    spread = float(max(np.nanstd(a, ddof=1), np.nanstd(b, ddof=1)))
                    tests.append({"channels": int(ch), "measure": measure, "other": other, "n_seeds": len(common),
                                  "elu_mean": float(np.nanmean(a)), "other_mean": float(np.nanmean(b)),
                                  "mean_diff": stats["mean_diff"], "seed_sd": spread,
                                  "beyond_spread": bool(abs(stats["mean_diff"]) > spread), "t": stats["t"],
                                  "p_value": stats["p_value"], "wilcoxon_p": stats["wilcoxon_p"]})
    elu_tests = pd.DataFrame(tests)
    if len(elu_tests):
        elu_tests = add_correction(elu_tests, float(config.get("alpha", 0.05)), "bonferroni")
        # a comparison without a t-test was still made: Bonferroni counts every one of them
        elu_tests["p_adjusted"] = np.minimum(1.0, elu_tests["p_value"] * len(elu_tests))
        elu_tests["significant"] = elu_tests["p_adjusted"] < float(config.get("alpha", 0.05))
    return convergence, summary, elu_tests
