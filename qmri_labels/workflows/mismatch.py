"""Train/test mismatch study: train on each dataset variant, test on each.

Oh et al. (2021) found that a network does best on test data with its own training data's
characteristics, so a comparison on one network's "home" data is not fair to another. This
workflow trains one network per named dataset (SNR, protocol or prior variants for IVIM;
resolution or background-field removal method for QSM), evaluates every network on every test
set, and writes:

* ``matrix.csv`` / ``matrix.md``: test error (rows: training data, columns: test data);
* ``cells.csv``: one row per cell with per-parameter errors and both data fingerprints;
* ``ttests.csv``: paired t-tests between the cells of each column (they share test data),
  Bonferroni-corrected over all the comparisons made;
* ``heatmap.png``, ``report.md``, ``manifest.json``, ``config.json``, and the trained
  networks (model bundles) under ``networks/``.

Run by name: ``python -m qmri_labels.study --config mismatch_ivim`` (``mismatch_qsm``: Oh et al.'s
resolution experiment, 1x1x1 vs 1x1x3 mm from the same masked local fields; ``mismatch_qsm_bfr``:
their BFR experiment, four networks on the same phantoms' total fields after V-SHARP, LBV, PDF
and RESHARP, a 4x4 NRMSE matrix and 12 Bonferroni-corrected paired t-tests;
``mismatch_qsm_anatomical`` and ``mismatch_qsm_bfr_anatomical``: both on anatomical heads, with a
pilot that sets the number of held-out heads for the wanted power, ``power.csv``).

"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from qmri_labels.analysis.image_metrics import image_metrics
from qmri_labels.analysis.plots import save_figure
from qmri_labels.analysis.power import paired_t_power, paired_t_sample_size
from qmri_labels.analysis.stats import paired_effect_size
from qmri_labels.data.comparability import check_comparable
from qmri_labels.data.definitions import get_definition
from qmri_labels.data.registry import load_dataset
from qmri_labels.estimators import QSMEstimator, train_network
from qmri_labels.fileio import write_json, write_text
from qmri_labels.training.reproducibility import DeterminismSettings
from qmri_labels.workflows.common import (
    add_correction,
    check_count,
    markdown,
    merge_config,
    normalised_errors,
    paired_test,
    run_manifest,
    say,
    write_csv,
)

DEFAULTS: dict = {
    "kind": "mismatch",
    "title": "Train/test mismatch",
    # dataset names (or inline definitions) from studies/datasets; one network per entry
    "datasets": ["ivim_epstein_snr15", "ivim_epstein_snr30"],
    # training rows taken from each dataset's train split (None: the split as defined)
    "n_train": 20000,
    # test rows (None: the test split as defined)
    "n_test": None,
    # parameters that enter the test error (None: all of the model's); IVIM's S0 is a nuisance
    "parameters": ["f", "D", "Dstar"],
    # NetworkEstimator hyperparameters
    "network": {"label": "gt", "hidden_layers": 3, "width": None, "activation": "elu", "lr": 1e-3,
                "batch_size": 256, "max_epochs": 50, "patience": 5},
    "seed": 0,
    "num_threads": 1,
    "alpha": 0.05,
    "correction": "bonferroni",
    # paired t-tests inside each test column: "all_pairs" of networks, or "matched_vs_others"
    # (the network trained on the column's own data against each other one; Oh et al.'s 4x4
    # BFR study: 4 columns x 3 = 12 comparisons)
    "comparisons": "all_pairs",
    # QSM only: QSMEstimator settings over QSM_TRAINING (the matrix then holds NRMSE in %)
    "qsm": {},
    # QSM only: the number of test volumes from a pilot (None: n_test). A mapping over
    # POWER_DEFAULTS: after training, every network is scored on pilot_n volumes of each test
    # set drawn with the test seed + pilot_seed_offset (never the test volumes); each primary
    # comparison's pilot effect size dz gives the pairs its paired t-test needs for power
    # `target` at alpha / (the number of comparisons made); the test sets then hold the largest
    # of these, within [min_n, max_n]
    "power": None,
}

#: keys of a mismatch study's ``power`` entry. ``primary``: ``"all"`` (every comparison made)
#: or a list of ``[test, train]`` pairs, each naming the comparison of the network trained on
#: ``test``'s own data with the one trained on ``train``'s, on ``test``'s test set
POWER_DEFAULTS: dict = {"pilot_n": 8, "pilot_seed_offset": 100_000, "target": 0.8, "min_n": 8, "max_n": 60,
                        "primary": "all"}

#: sub-mappings of the config checked by their consumer (NetworkEstimator, QSMEstimator), not against DEFAULTS
FREE_FORM_KEYS = ("network", "qsm")

#: QSMEstimator settings of the QSM mismatch study (CPU size; a GPU can take more)
QSM_TRAINING: dict = {"label": "gt", "preset": "graf", "unet": {"levels": 3, "init_channels": 8},
                      "inputs": ["field", "tkd"], "patch_size": None, "batch_size": 2, "max_epochs": 6,
                      "samples_per_epoch": 8, "lr": 1e-3, "weight_decay": 0.01}


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------


def run(config: Mapping | None, out: Path, quiet: bool = False) -> dict:
    """Run the mismatch study; see the module docstring for what is written under ``out``.

    Parameters
    ----------
    config : mapping or None
        Entries over :data:`DEFAULTS` (a key it does not have is an error).
    out : Path
        Results folder.
    quiet : bool

    Returns
    -------
    dict
        ``matrix``, ``ttests``, ``findings``, ``figure``, ``summary_text``, ``manifest`` and ``out``.
    """
    return run_resolved(merge_config(DEFAULTS, config, FREE_FORM_KEYS), out, quiet)


def run_resolved(config: Mapping, out: Path, quiet: bool = False) -> dict:
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
    t0 = time.perf_counter()
    started = time.time()
    names = config["datasets"]
    if config["comparisons"] not in ("all_pairs", "matched_vs_others"):
        raise ValueError(f"comparisons must be 'all_pairs' or 'matched_vs_others', got {config['comparisons']!r}")
    if not isinstance(names, (list, tuple)) or len(names) < 2:
        raise ValueError("mismatch needs a list of at least two datasets")
    definitions = [get_definition(d) for d in names]
    labels = [d.name for d in definitions]
    if len(set(labels)) != len(labels):
        raise ValueError(f"datasets must have distinct names, got {labels}")
    kinds = {d.kind for d in definitions}
    if len(kinds) != 1:
        raise ValueError(f"datasets mix kinds {sorted(kinds)}; a mismatch study crosses one kind of data")
    power = _power_settings(config, labels, kinds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    pilot = None
    if kinds == {"qsm"}:
        cells, trained, pilot = _run_qsm(definitions, config, out, quiet, power)
        metric = "nrmse"
    else:
        cells, trained = _run_voxel(definitions, config, out, quiet)
        metric = "rmse"
    return _report(cells, trained, labels, config, out, quiet, t0, started, metric, pilot)


def _power_settings(config, labels, kinds) -> dict | None:
    """The ``power`` entry merged over :data:`POWER_DEFAULTS` and checked (None when unset)."""
    if config.get("power") is None:
        return None
    if kinds != {"qsm"}:
        raise ValueError("power: the pilot and power analysis are made for QSM mismatch studies")
    if config["n_test"] is not None:
        raise ValueError("set n_test or power, not both: with power the pilot decides the number of test volumes")
    unknown = set(config["power"]) - set(POWER_DEFAULTS)
    if unknown:
        raise ValueError(f"power: unknown keys {sorted(unknown)}; known: {sorted(POWER_DEFAULTS)}")
    power = {**POWER_DEFAULTS, **config["power"]}
    for key in ("pilot_n", "min_n", "max_n"):
        check_count(power[key], f"power.{key}", 2)
    if not power["min_n"] <= power["max_n"]:
        raise ValueError(f"power: min_n {power['min_n']} > max_n {power['max_n']}")
    if not 0 < float(power["target"]) < 1:
        raise ValueError(f"power.target must be in (0, 1), got {power['target']}")
    primary = power["primary"]
    if primary != "all":
        if not isinstance(primary, (list, tuple)) or not primary:
            raise ValueError(f"power.primary must be 'all' or a list of [test, train] pairs, got {primary!r}")
        for pair in primary:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not set(pair) <= set(labels) \
                    or pair[0] == pair[1]:
                raise ValueError(f"power.primary: {pair!r} is not a [test, train] pair of two of {labels}")
        power["primary"] = [list(p) for p in primary]
    return power


def _training_overrides(config, split: str) -> dict:
    n = config["n_train"] if split == "train" else config["n_test"]
    return {} if n is None else {"n": int(n)}


def _run_voxel(definitions, config, out: Path, quiet: bool):
    settings = DeterminismSettings(seed=int(config["seed"]), num_threads=config["num_threads"])
    tests = {d.name: load_dataset(d, "test", **_training_overrides(config, "test")) for d in definitions}
    trained, cells = {}, []
    for i, definition in enumerate(definitions):
        train = load_dataset(definition, "train", **_training_overrides(config, "train"))
        say(quiet, f"[{i + 1}/{len(definitions)}] training on {definition.name} ({len(train)} rows)")
        start = time.perf_counter()
        run_ = train_network(train, settings, **config["network"])
        estimator = run_.estimator
        seconds = time.perf_counter() - start
        trained[definition.name] = {"train_fingerprint": train.fingerprint, "fit_seconds": seconds,
                                    "epochs": estimator.n_epochs_, "best_val_loss": estimator.best_val_loss_}
        say(quiet, f"  {estimator.n_epochs_} epochs in {seconds:.1f} s")
        for test_name, test in tests.items():
            cell = {"train": definition.name, "test": test_name, "train_fingerprint": train.fingerprint,
                    "test_fingerprint": test.fingerprint, "n_test": len(test)}
            reason = _incompatible(train, test)
            if reason:
                cell.update(error=np.full(len(test), np.nan), score=math.nan, skipped=reason)
            else:
                # simulated signals are compared as simulated: no rescaling to the training scale
                pred = estimator.predict(test.signals, signal_scale=1.0)
                err, pnames = normalised_errors(pred, test, config["parameters"])
                cell["error"] = np.mean(err**2, axis=1)
                cell["score"] = float(np.sqrt(np.nanmean(cell["error"])))
                cell.update({f"rmse_{p}": float(np.sqrt(np.nanmean(err[:, k] ** 2))) for k, p in enumerate(pnames)})
            cells.append(cell)
        metrics = {c["test"]: c["score"] for c in cells
                   if c["train"] == definition.name and "skipped" not in c}
        estimator.save(out / "networks" / definition.name, metrics={"normalised_rmse_by_test_set": metrics},
                       extra={"data_fingerprints": {"train": train.fingerprint,
                                                    "tests": {k: v.fingerprint for k, v in tests.items()}},
                              "determinism_record": run_.record})
    return cells, trained


def _incompatible(train, test) -> str:
    if train.spec.model != test.spec.model:
        return f"model {train.spec.model} vs {test.spec.model}"
    if len(train.spec.protocol) != len(test.spec.protocol):
        return f"{len(train.spec.protocol)} inputs vs {len(test.spec.protocol)} measurements"
    return ""


def _run_qsm(definitions, config, out: Path, quiet: bool, power: dict | None = None):
    """QSM mismatch (resolution or BFR method): one U-Net per dataset, NRMSE per test volume
    (XSIM, HFEN and SSIM reported beside it in cells.csv); with ``power``, the test sets' size
    from a pilot (see :data:`DEFAULTS`). Returns cells, training records and the pilot record
    (None without ``power``)."""
    settings = dict(QSM_TRAINING)
    settings.update(config["qsm"] or {})
    trained, estimators = {}, {}
    for i, definition in enumerate(definitions):
        train = load_dataset(definition, "train", **_training_overrides(config, "train"))
        say(quiet, f"[{i + 1}/{len(definitions)}] training a U-Net on {definition.name} "
                   f"({len(train)} volumes of {train.chi.shape[1:]} at {train.voxel_size} mm)")
        start = time.perf_counter()
        validation = None
        if "validation" in definition.splits:
            validation = load_dataset(definition, "validation")
        estimator = QSMEstimator(seed=int(config["seed"]), progress=not quiet, **settings)
        estimator.fit(train, validation=validation)
        seconds = time.perf_counter() - start
        trained[definition.name] = {"train_fingerprint": train.fingerprint, "fit_seconds": seconds,
                                    "epochs": len(getattr(estimator, "history_", []) or [])}
        estimators[definition.name] = estimator
    pilot = None
    test_overrides = _training_overrides(config, "test")
    if power is not None:
        pilot = _pilot(definitions, estimators, trained, config, power, quiet)
        test_overrides = {"n": pilot["n_test"]}
    start = time.perf_counter()
    tests = {d.name: load_dataset(d, "test", **test_overrides) for d in definitions}
    cells = _score_qsm(estimators, trained, tests)
    say(quiet, f"scored {len(estimators)} networks on {len(tests)} test sets of {len(next(iter(tests.values())))} "
               f"volumes in {time.perf_counter() - start:.1f} s")
    for name, estimator in estimators.items():
        estimator.save(out / "networks" / name,
                       extra={"data_fingerprints": {"train": trained[name]["train_fingerprint"],
                                                    "tests": {k: v.fingerprint for k, v in tests.items()}}})
    return cells, trained, pilot


def _score_qsm(estimators, trained, tests) -> list[dict]:
    cells = []
    for train_name, estimator in estimators.items():
        for test_name, test in tests.items():
            chi = estimator.predict(test.field, test.mask, voxel_size=test.voxel_size, b0_dir=tuple(test.orientations[0]))
            metrics = [image_metrics(c, t, m) for c, t, m in zip(chi, test.chi, test.mask)]
            per_volume = np.array([r["nrmse"] for r in metrics])
            cells.append({"train": train_name, "test": test_name,
                          "train_fingerprint": trained[train_name]["train_fingerprint"],
                          "test_fingerprint": test.fingerprint, "n_test": len(test), "error": per_volume,
                          "score": float(np.mean(per_volume)),
                          **{k: float(np.mean([r[k] for r in metrics])) for k in ("xsim", "hfen", "ssim")}})
    return cells


def _comparisons(cells, labels, how: str):
    """The paired comparisons a study makes: ``(test, cell_a, cell_b)`` inside each test column."""
    for test_name in labels:
        column = [c for c in cells if c["test"] == test_name and "skipped" not in c]
        for i, a in enumerate(column):
            for b in column[i + 1:]:
                if how == "matched_vs_others" and test_name not in (a["train"], b["train"]):
                    continue
                yield test_name, a, b


def _pilot(definitions, estimators, trained, config, power: dict, quiet: bool) -> dict:
    """Score every network on pilot volumes (test seed + offset), and from each primary
    comparison's effect size the number of test volumes for the wanted power."""
    labels = [d.name for d in definitions]
    pilots = {}
    for d in definitions:
        seed = int(d.splits["test"]["seed"]) + int(power["pilot_seed_offset"])
        pilots[d.name] = load_dataset(d, "test", n=int(power["pilot_n"]), seed=seed)
    cells = _score_qsm(estimators, trained, pilots)
    made = list(_comparisons(cells, labels, config["comparisons"]))
    alpha = float(config["alpha"]) / (len(made) if config["correction"] == "bonferroni" else 1)
    rows = []
    for test_name, a, b in made:
        matched = test_name in (a["train"], b["train"])
        other = b["train"] if a["train"] == test_name else a["train"]
        is_primary = power["primary"] == "all" or (matched and [test_name, other] in power["primary"])
        dz = paired_effect_size(a["error"], b["error"])["cohen_dz"]
        need = None if np.isnan(dz) else paired_t_sample_size(dz, power=float(power["target"]), alpha=alpha)
        rows.append({"test": test_name, "train_a": a["train"], "train_b": b["train"], "primary": bool(is_primary),
                     "pilot_n": len(a["error"]), "pilot_mean_a": float(np.mean(a["error"])),
                     "pilot_mean_b": float(np.mean(b["error"])), "pilot_dz": dz, "alpha_corrected": alpha,
                     "n_needed": need})
    needed = [r["n_needed"] for r in rows if r["primary"]]
    if not needed:
        raise ValueError(f"power.primary {power['primary']!r} names none of the comparisons made")
    want = max(int(power["max_n"]) + 1 if n is None else n for n in needed)
    n_test = int(min(max(want, int(power["min_n"])), int(power["max_n"])))
    for r in rows:
        r["power_at_n_test"] = float("nan") if np.isnan(r["pilot_dz"]) else paired_t_power(r["pilot_dz"], n_test, alpha)
    say(quiet, f"pilot ({power['pilot_n']} volumes per test set): the primary comparisons need "
               f"{[('>' + str(power['max_n'])) if n is None else n for n in needed]} volumes for power "
               f"{power['target']} at alpha {alpha:.3g}; testing on {n_test}")
    return {"table": pd.DataFrame(rows), "n_test": n_test, "settings": power,
            "fingerprints": {k: v.fingerprint for k, v in pilots.items()}}


METRIC_TEXT = {
    "rmse": "normalised RMSE over {parameters} (each parameter divided by the test set's prior range); paired "
            "t-tests over the test samples' squared normalised errors",
    "nrmse": "NRMSE (%) of chi inside each test set's mask (inputs: masked local fields, or local fields after "
             "the dataset's BFR method on its eroded mask), mean over the test volumes; paired t-tests over the "
             "test volumes",
}


def _report(cells, trained, labels, config, out: Path, quiet: bool, t0: float, started: float,
            metric: str = "rmse", pilot: dict | None = None) -> dict:
    alpha, correction = float(config["alpha"]), config["correction"]
    rows = []
    for c in cells:
        row = {k: v for k, v in c.items() if k not in ("error", "score")}
        row[metric] = c["score"]
        row["matched"] = c["train"] == c["test"]
        rows.append(row)
    table = pd.DataFrame(rows)
    matrix = table.pivot(index="train", columns="test", values=metric).reindex(index=labels, columns=labels)

    # paired t-tests inside each column: the cells share the test data (checked by fingerprint)
    tests = []
    for test_name in labels:
        column = [c for c in cells if c["test"] == test_name and "skipped" not in c]
        if len(column) >= 2:
            check_comparable({f"{c['train']}->{c['test']}": c for c in column})
    for test_name, a, b in _comparisons(cells, labels, config["comparisons"]):
        stats = paired_test(a["error"], b["error"], a["train"], b["train"])
        tests.append({"test": test_name, "train_a": a["train"], "train_b": b["train"],
                      "a_is_matched": a["train"] == test_name, "b_is_matched": b["train"] == test_name,
                      **stats, "test_fingerprint": a["test_fingerprint"]})
    ttests = add_correction(pd.DataFrame(tests), alpha, correction) if tests else pd.DataFrame()

    # which training data is best on each test set, and is the matched network significantly better?
    findings = []
    for test_name in labels:
        col = matrix[test_name].dropna()
        if col.empty:
            continue
        best = col.idxmin()
        entry = {"test": test_name, "best_train": best, "matched_is_best": best == test_name,
                 "matched_error": float(matrix.loc[test_name, test_name]), "best_error": float(col.min())}
        if len(ttests):
            rel = ttests[(ttests["test"] == test_name) & (ttests["a_is_matched"] | ttests["b_is_matched"])]
            entry["matched_beats_all_significantly"] = bool(len(rel)) and bool(all(
                r.significant and ((r.mean_diff < 0) == r.a_is_matched) for r in rel.itertuples()))
        findings.append(entry)
    findings = pd.DataFrame(findings)

    write_csv(out / "cells.csv", table)
    write_csv(out / "matrix.csv", matrix.reset_index().rename(columns={"train": "train \\ test"}))
    if len(ttests):
        write_csv(out / "ttests.csv", ttests)
    write_csv(out / "findings.csv", findings)
    if pilot is not None:
        write_csv(out / "power.csv", pilot["table"])
    figure = _heatmap(matrix, out / "heatmap.png", config, "NRMSE (%)" if metric == "nrmse" else "normalised RMSE")
    md_matrix = markdown(matrix.reset_index().rename(columns={"train": "train \\ test"}))
    write_text(out / "matrix.md", md_matrix + "\n")
    lines = [f"# {config['title']}", "",
             "Test error: " + METRIC_TEXT[metric].format(parameters=config["parameters"] or "all parameters")
             + "; rows = training data, columns = test data.", "",
             md_matrix, ""]
    if metric == "nrmse":
        lines += ["## NRMSE, XSIM, HFEN and SSIM per cell", "",
                  markdown(table[["train", "test", "nrmse", "xsim", "hfen", "ssim"]]), ""]
    lines += ["## Best training data per test set", "", markdown(findings) if len(findings) else "(none)", ""]
    if len(ttests):
        lines += [f"## Paired t-tests within each test set ({correction}, alpha = {alpha}, "
                  f"{len(ttests)} comparisons)", "",
                  markdown(ttests[["test", "train_a", "train_b", "n", "mean_a", "mean_b", "mean_diff", "t", "p_value",
                                   "p_adjusted", "significant"]]), ""]
    if pilot is not None:
        p = pilot["settings"]
        lines += [f"## Power analysis (pilot of {p['pilot_n']} volumes per test set, seeds test + "
                  f"{p['pilot_seed_offset']})", "",
                  f"Primary comparisons: {p['primary']}. Each comparison's pilot effect size dz (mean over SD of "
                  f"the paired NRMSE differences) gives the volumes its two-sided paired t-test needs for power "
                  f"{p['target']} at the corrected alpha; the test sets hold the largest of the primary ones, "
                  f"within [{p['min_n']}, {p['max_n']}]: {pilot['n_test']} volumes (n_needed empty: more than "
                  f"100000).", "",
                  markdown(pilot["table"][["test", "train_a", "train_b", "primary", "pilot_n", "pilot_dz",
                                           "alpha_corrected", "n_needed", "power_at_n_test"]]), ""]
    skipped = table[table["skipped"].notna()] if "skipped" in table else table.iloc[:0]
    if len(skipped):
        lines += ["## Skipped cells", ""] + [f"- {r.train} -> {r.test}: {r.skipped}" for r in skipped.itertuples()] + [""]
    lines += ["## Data fingerprints", ""] + [f"- {name}: train {info['train_fingerprint'][:16]}, test "
                                             f"{table[table.test == name].test_fingerprint.iloc[0][:16]}"
                                             for name, info in trained.items()]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    manifest = run_manifest("mismatch", config, started, t0, trained=trained, data_fingerprints={
        name: {"train": info["train_fingerprint"],
               "test": next(c["test_fingerprint"] for c in cells if c["test"] == name),
               **({} if pilot is None else {"pilot": pilot["fingerprints"][name]})}
        for name, info in trained.items()},
        **({} if pilot is None else {"power": {"n_test": pilot["n_test"], "settings": pilot["settings"]}}))
    write_json(out / "manifest.json", manifest)
    summary = "\n".join([f"{config['title']}: {metric} (rows: train, columns: test)", matrix.to_string(
        float_format=lambda v: f"{v:.4f}")] + [
        f"  on {r.test}: best = {r.best_train}{' (matched)' if r.matched_is_best else ''}"
        for r in findings.itertuples()])
    say(quiet, summary)
    return {"out": str(out), "matrix": matrix, "ttests": ttests, "findings": findings, "figure": str(figure),
            "summary_text": summary, "manifest": manifest}


def _heatmap(matrix: pd.DataFrame, path: Path, config, label: str) -> Path:
    # pyplot is imported when a figure is drawn, after the backend is chosen
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * n_cols, 1.2 + 0.9 * n_rows))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis_r")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(range(n_cols), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(n_rows), matrix.index)
    ax.set_xlabel("test data")
    ax.set_ylabel("training data")
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    col_best = [int(np.nanargmin(values[:, j])) if np.isfinite(values[:, j]).any() else -1 for j in range(n_cols)]
    for i in range(n_rows):
        for j in range(n_cols):
            text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.4f}"
            if col_best[j] == i:
                text += " *"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(values[i, j]) and values[i, j] > middle else "black")
    ax.set_title(f"{config['title']} (* best per test set)", fontsize=10)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path
