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
from qmri_labels.workflows.common import markdown, merge_config
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
    networks, histories = {}, {}
    for act, slope in config["activations"]:
        for ch in config["channels"]:
            name = f"{act}-{int(ch)}"
            show(quiet, f"[qsm_activation] training {name}")
            t1 = time.perf_counter()
            est = study_estimator(config, int(config["seed"]), label=config["label"],
                             field_weight=float(config["field_weight"]),
                             unet={"activation": act, "negative_slope": float(slope) if act == "leaky_relu" else 0.2,
                                   "init_channels": int(ch)}).fit(train, validation=val)
            timings[name] = time.perf_counter() - t1
            networks[name] = est
            histories[name] = est.history_
    rows, estimates = evaluate_methods(networks, test, train, tkd_threshold=float(config["tkd_threshold"]),
                                       tikhonov_lambdas=config["tikhonov_lambdas"], tv_lambdas=config["tv_lambdas"],
                                       include_cosmos=False)
    table = pd.DataFrame(rows)
    write_table(out / "results.csv", table)
    hist = pd.DataFrame([{"network": n, **r} for n, h in histories.items() for r in h])
    write_table(out / "history.csv", hist)

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
              markdown(table),
              "", "![convergence](convergence.png)", "", "![slices](slices.png)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(report).encode())
    timings["total"] = time.perf_counter() - t0
    write_manifest(config, out, {"train": train, "val": val, "test": test}, timings)
    show(quiet, table.to_string(index=False))
    return {"results": rows, "history": hist.to_dict("records"), "out": str(out), "timings_s": timings,
            "summary_text": table.to_string(index=False, float_format=lambda v: f"{v:.3f}")}
