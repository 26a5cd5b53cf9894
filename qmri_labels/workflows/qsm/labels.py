"""The QSM label study (kind ``qsm_labels``): one U-Net per label choice (gt, mle = COSMOS, self,
hybrid alphas, graf) trained on the same synthetic phantoms and compared with TKD, Tikhonov, TV
and COSMOS on held-out phantoms (NRMSE, demeaned NRMSE, SSIM, HFEN, PSNR)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Mapping

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
    "kind": "qsm_labels",
    "labels": ["gt", "mle", "self", "hybrid", "graf"],
    "alpha": [0.5],  # hybrid MLE weights, one network each (the study flag --alpha)
    "field_weight": 1.0,
}


def run(config: Mapping | None, out: Path, quiet: bool = True) -> dict:
    """Run the label study of ``config`` (merged over :data:`DEFAULTS`).

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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, val, test = make_phantom_sets(config)
    timings = {"phantoms": time.perf_counter() - t0}
    networks, histories = {}, {}
    for label in config["labels"]:
        alphas = config["alpha"] if label == "hybrid" else [None]
        alphas = [alphas] if np.isscalar(alphas) else alphas
        for alpha in alphas:
            name = f"net-{label}" if alpha is None else f"net-hybrid-{float(alpha):g}"
            show(quiet, f"[qsm_labels] training {name}")
            t1 = time.perf_counter()
            est = study_estimator(config, int(config["seed"]), label=label, alpha=alpha,
                             field_weight=float(config["field_weight"])).fit(train, validation=val)
            timings[name] = time.perf_counter() - t1
            networks[name] = est
            histories[name] = est.history_
    rows, estimates = evaluate_methods(networks, test, train, tkd_threshold=float(config["tkd_threshold"]),
                                       tikhonov_lambdas=config["tikhonov_lambdas"], tv_lambdas=config["tv_lambdas"])
    table = pd.DataFrame(rows)
    write_table(out / "results.csv", table)
    hist_rows = [{"method": n, **r} for n, h in histories.items() for r in h]
    write_table(out / "history.csv", pd.DataFrame(hist_rows))
    fig = slices_figure(test, estimates, 0, 2)
    save_png(fig, out / "slices.png")
    report = ["# QSM label-choice study", "",
              f"Held-out phantoms: {len(test)} of shape {list(test.chi.shape[1:])}, input: {field_label(test)}, "
              f"field noise {test.spec.noise_sigma} ppm, COSMOS from {test.fields.shape[1]} orientations; "
              "Tikhonov and TV lambdas tuned on the training phantoms.", "",
              markdown(table),
              "", "![slices](slices.png)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(report).encode())
    timings["total"] = time.perf_counter() - t0
    write_manifest(config, out, {"train": train, "val": val, "test": test}, timings)
    show(quiet, table.to_string(index=False))
    return {"results": rows, "history": hist_rows, "out": str(out), "timings_s": timings,
            "summary_text": table.to_string(index=False, float_format=lambda v: f"{v:.3f}")}
