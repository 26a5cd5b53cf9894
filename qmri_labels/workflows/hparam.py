"""Hyperparameter search per dataset: random search, pick by validation L2, then test
"reference" against "tuned" hyperparameters with a paired t-test.

Oh et al. (2021): a network retrained on new data needs its hyperparameters retuned before it
is compared with another. The search uses random draws over learning rate, batch size,
width, depth, activation and weight decay. Each trial trains the library's
:class:`~qmri_labels.estimators.NetworkEstimator` on the dataset's train split and scores the
mean squared normalised parameter error (L2) on its ``validation`` split (never on the test
split). The best trial's hyperparameters and the reference ones are then trained once more
with the same seed and compared on the test split.

Many workers, one search (:mod:`qmri_labels.search.engine`). Trials live in an Optuna study
store: SQLite in the output folder by default, or any SQL database URL (``storage`` in the
config, ``--storage`` on the command line, or the ``QMRI_LABELS_OPTUNA_STORAGE`` environment
variable). Any number of processes, on one machine or many, started with the same
configuration, ``storage`` and ``study_name``, share one search: ``n_trials`` is the budget of
the whole study (a rerun with a larger one resumes), trial ``i`` draws its hyperparameters from
``(seed, i)`` alone, and a killed worker's trial is failed by its heartbeat (every
``heartbeat_seconds``) and run again with the same hyperparameters up to
``failed_trial_retries`` times. A process started with ``worker: true`` (``--worker``) only runs
trials. One process without it (started with or after the workers) runs trials as well, then
waits until no trial is running, runs any re-queued ones, and does the reference-vs-tuned
comparison over the study's first ``n_trials`` finished trials.

Outputs under ``out``: ``trials.csv`` (every trial of the study), ``manifest.json`` and, for
the comparison run, ``best_params.json``, ``comparison.csv`` (reference vs tuned on
validation and test, paired t-test on the test samples), ``search.png``, ``report.md``,
``networks/reference`` and ``networks/tuned`` (bundles), and ``optuna.db`` with the default
storage.

A QSM dataset (kind ``qsm``) searches a 3D U-Net (:class:`~qmri_labels.estimators.QSMEstimator`:
:data:`QSM_SEARCHABLE`, fixed settings under ``network``) the same way: each trial is fitted on
the training heads alone and scored by its validation L2, per head the mean squared chi error
(ppm^2) inside the head's mask (:func:`qsm_l2`), and reference and tuned are compared head by
head on the test heads (``hparam_qsm_anatomical``).

Run by name: ``python -m qmri_labels.study --config hparam_ivim``; workers:
``python -m qmri_labels.study --config hparam_ivim --storage URL --study-name NAME --worker``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import optuna
import pandas as pd

from qmri_labels.analysis.plots import save_figure
from qmri_labels.data.definitions import get_definition
from qmri_labels.data.registry import load_dataset
from qmri_labels.estimators import train_network
from qmri_labels.fileio import write_json, write_text
from qmri_labels.search.engine import STORAGE_ENV, finished_trials, open_study, run_trials, safe_url
from qmri_labels.search.space import check_space, suggest
from qmri_labels.training.reproducibility import DeterminismSettings
from qmri_labels.workflows.common import (
    markdown,
    merge_config,
    paired_test,
    per_sample_l2,
    run_manifest,
    say,
    write_csv,
)

DEFAULTS: dict = {
    "kind": "hparam",
    "title": "Hyperparameter search",
    "dataset": "ivim_epstein_snr30",
    "n_train": 20000,
    # rows of the validation split (None: as defined); a dataset without a validation split
    # gets one drawn like the training split with seed train_seed + 1_000_003
    "n_validation": 5000,
    "n_test": None,
    "parameters": ["f", "D", "Dstar"],
    # completed trials of the whole study (shared by all workers)
    "n_trials": 20,
    "seed": 0,
    # true: only run trials (no comparison); see the module docstring
    "worker": False,
    # Optuna storage URL (None: sqlite in the output folder) and study name (None: hparam-<dataset>)
    "storage": None,
    "study_name": None,
    # a running trial's heartbeat interval; a trial silent for twice as long is marked failed
    "heartbeat_seconds": 60,
    # how often a failed (e.g. killed) trial is queued again with the same hyperparameters
    "failed_trial_retries": 1,
    # qmri_labels.search.space's format: a list of choices, or {low, high, log} (integers when both
    # bounds are integers and log is false)
    "search_space": {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": [64, 128, 256, 512],
        "width": [10, 20, 40, 80],
        "hidden_layers": {"low": 1, "high": 5},
        "activation": ["elu", "relu", "tanh", "gelu"],
        "weight_decay": [0.0, 1e-6, 1e-5, 1e-4, 1e-3],
    },
    # Epstein et al.'s network: 3 hidden layers as wide as the number of b-values, ELU, Adam 1e-3
    "reference": {"lr": 1e-3, "batch_size": 256, "width": None, "hidden_layers": 3, "activation": "elu",
                  "weight_decay": 0.0},
    # fixed NetworkEstimator settings of every trial
    "network": {"label": "gt", "max_epochs": 30, "patience": 5},
    "num_threads": 1,
    "alpha": 0.05,
    # a QSM dataset's search (over QSM_DEFAULTS): its search_space, reference and network take
    # the place of the voxel-wise ones above, which then stay at their defaults
    "qsm": None,
}

#: the search of a QSM dataset: a 3D U-Net on masked local fields, the reference being the
#: settings of the QSM mismatch studies
QSM_DEFAULTS: dict = {
    "search_space": {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": [1, 2, 4],
        "weight_decay": [0.0, 1e-4, 1e-2, 1e-1],
        "levels": [2, 3],
        "init_channels": [4, 8, 12],
        "activation": ["relu", "leaky_relu", "elu"],
    },
    "reference": {"lr": 1e-3, "batch_size": 2, "weight_decay": 0.01, "levels": 3, "init_channels": 8,
                  "activation": "leaky_relu"},
    "network": {"label": "gt", "preset": "graf", "inputs": ["field", "tkd"], "patch_size": None, "max_epochs": 10,
                "samples_per_epoch": 12},
}

#: sub-mappings of the config checked by their consumer (the search-space check, NetworkEstimator), not against DEFAULTS
FREE_FORM_KEYS = ("search_space", "reference", "network", "qsm")

SEARCHABLE = ("lr", "batch_size", "width", "hidden_layers", "activation", "weight_decay", "optimiser", "label",
              "alpha", "val_fraction")
#: what a search over a QSM dataset (a 3D U-Net, :class:`~qmri_labels.estimators.QSMEstimator`)
#: may draw: its training settings, and the U-Net's depth, width and activation
QSM_SEARCHABLE = ("lr", "batch_size", "weight_decay", "levels", "init_channels", "activation", "patch_size",
                  "samples_per_epoch", "field_weight")
#: the U-Net's own settings among QSM_SEARCHABLE (they go into QSMEstimator's ``unet`` entry)
_UNET_KEYS = ("levels", "init_channels", "activation")


def _validation_split(config, definition, train_seed: int):
    n = {"n": int(config["n_validation"])} if config["n_validation"] else {}
    if "validation" in definition.splits:
        return load_dataset(definition, "validation", **n)
    return load_dataset(definition, "train", seed=train_seed + 1_000_003, **n)


def run(config: Mapping | None, out: Path, quiet: bool = False) -> dict:
    """Run the search and the reference-vs-tuned comparison (see the module docstring).

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
        ``out``, ``trials``, ``summary_text``, ``manifest``; for the comparison run also
        ``best_params``, ``comparison``, ``ttest`` and ``figure``.
    """
    return run_resolved(resolve_config(config), out, quiet)


def resolve_config(config: Mapping | None) -> dict:
    """Defaults merged with ``config`` (the one merge), checked; ValueError naming a bad entry."""
    return check_config(merge_config(DEFAULTS, config, FREE_FORM_KEYS))


def _searchable(config: Mapping) -> tuple[str, ...]:
    return QSM_SEARCHABLE if get_definition(config["dataset"]).kind == "qsm" else SEARCHABLE


def _resolve_qsm(config: dict) -> dict:
    """For a QSM dataset: ``qsm`` merged over :data:`QSM_DEFAULTS` (each entry replaced whole),
    written in place of the voxel-wise search_space, reference and network."""
    given = dict(config["qsm"] or {})
    unknown = set(given) - set(QSM_DEFAULTS)
    if unknown:
        raise ValueError(f"qsm: unknown keys {sorted(unknown)}; known: {sorted(QSM_DEFAULTS)}")
    qsm = {**QSM_DEFAULTS, **given}
    for key in QSM_DEFAULTS:
        if config[key] != DEFAULTS[key] and config[key] != qsm[key]:
            raise ValueError(f"dataset {config['dataset']!r} is a QSM dataset: give its {key} under qsm.{key}")
        config[key] = qsm[key]
    config["qsm"] = qsm
    return config


def check_config(config: dict) -> dict:
    """A merged configuration checked before anything is written; returns it."""
    if get_definition(config["dataset"]).kind == "qsm":
        config = _resolve_qsm(config)
    elif config["qsm"] is not None:
        raise ValueError(f"qsm settings given, but dataset {config['dataset']!r} is not a QSM dataset")
    check_space(config["search_space"], _searchable(config))
    if int(config["n_trials"]) < 1:
        raise ValueError(f"n_trials must be >= 1, got {config['n_trials']}")
    _check_worker_settings(config)
    clash = set(config["network"]) & set(config["search_space"])
    if clash:
        raise ValueError(f"{sorted(clash)} are both fixed (network) and searched (search_space)")
    return config


def run_resolved(config: Mapping, out: Path, quiet: bool = False) -> dict:
    """:func:`run` of a configuration that :func:`resolve_config` (or :func:`check_config` of a
    merged one) made: nothing is merged again.

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
    t0, started = time.perf_counter(), time.time()
    space = check_space(config["search_space"], _searchable(config))
    n_trials = int(config["n_trials"])
    worker = config["worker"]
    fixed = dict(config["network"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)

    definition = get_definition(config["dataset"])
    qsm = definition.kind == "qsm"
    train = load_dataset(definition, "train", **({"n": int(config["n_train"])} if config["n_train"] else {}))
    validation = _validation_split(config, definition, definition.splits["train"]["seed"])
    test = load_dataset(definition, "test", **({"n": int(config["n_test"])} if config["n_test"] else {}))
    fingerprints = {"train": train.fingerprint, "validation": validation.fingerprint, "test": test.fingerprint}
    if len(set(fingerprints.values())) != 3:
        raise ValueError("train, validation and test data must differ")
    settings = DeterminismSettings(seed=int(config["seed"]), num_threads=config["num_threads"])
    params_of = config["parameters"]

    def train_and_score(hyper: Mapping, data=validation):
        if qsm:
            estimator = _fit_qsm(train, {**fixed, **hyper}, int(config["seed"]))
            return estimator, qsm_l2(estimator, data)
        run_ = train_network(train, settings, **{**fixed, **hyper})
        return run_.estimator, per_sample_l2(run_.estimator.predict(data.signals, signal_scale=1.0), data, params_of)

    def score(estimator, data):
        if qsm:
            return qsm_l2(estimator, data)
        return per_sample_l2(estimator.predict(data.signals, signal_scale=1.0), data, params_of)

    storage = config["storage"] or os.environ.get(STORAGE_ENV) or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study_name = config["study_name"] or f"hparam-{definition.name}"
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    signature = {"dataset": definition.name, "data_fingerprints": fingerprints, "parameters": list(params_of),
                 "search_space": space, "network": fixed, "seed": int(config["seed"])}
    study = open_study(storage, study_name, int(config["seed"]), int(config["heartbeat_seconds"]),
                       int(config["failed_trial_retries"]), signature)
    say(quiet, f"random search: {n_trials} trials in study {study_name!r} at {safe_url(storage)} on "
               f"{definition.name} ({len(train)} training rows)" + (" (worker: trials only)" if worker else ""))
    worker_id = f"{platform.node()}:{os.getpid()}"

    def objective(trial):
        hyper = suggest(trial, space)
        start = time.perf_counter()
        estimator, errors = train_and_score(hyper)
        trial.set_user_attr("epochs", int(len(estimator.history_) if qsm else estimator.n_epochs_))
        trial.set_user_attr("fit_seconds", time.perf_counter() - start)
        trial.set_user_attr("validation_rmse", float(np.sqrt(np.nanmean(errors))))
        trial.set_user_attr("validation_fingerprint", validation.fingerprint)
        value = float(np.nanmean(errors))
        return value if math.isfinite(value) else float("inf")

    ran = run_trials(study, objective, n_trials, finish=not worker,
                     poll_seconds=min(5.0, float(config["heartbeat_seconds"])),
                     grace_seconds=2 * int(config["heartbeat_seconds"]), retries=int(config["failed_trial_retries"]))
    trials = study.trials_dataframe()

    def scored(rows):  # only trials scored on this validation data count (a shared store may hold others)
        return [t for _, t in rows if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get("validation_fingerprint") == validation.fingerprint]

    # the search's result: its first n_trials trials, whoever ran them (workers may have run more)
    complete = scored(finished_trials(study, n_trials))
    write_csv(out / "trials.csv", trials)
    optuna_record = {"storage": safe_url(storage), "study_name": study_name, "sampler": "TrialSeededRandomSampler",
                     "worker": worker, "worker_id": worker_id, "trials_here": ran,
                     "trials_in_study": len(scored(finished_trials(study))), "trials_compared": len(complete)}
    if worker:
        manifest = run_manifest("hparam", config, started, t0, data_fingerprints=fingerprints, optuna=optuna_record)
        write_json(out / "manifest.json", manifest)
        summary = (f"worker {worker_id}: ran {ran} trials; study {study_name!r} holds "
                   f"{optuna_record['trials_in_study']} completed of {n_trials}")
        say(quiet, summary)
        return {"out": str(out), "trials": trials, "summary_text": summary, "manifest": manifest}
    if not complete:
        raise ValueError("no completed trial on this dataset's validation data")
    best = min(complete, key=lambda t: t.value)
    tuned = {k: best.params[k] for k in space}
    reference = {k: v for k, v in dict(config["reference"]).items() if k not in fixed}

    say(quiet, "training the reference and the tuned network on the same data and seed")
    ref_est, ref_val = train_and_score(reference)
    tuned_est, tuned_val = train_and_score(tuned)
    ref_test, tuned_test = score(ref_est, test), score(tuned_est, test)
    stats = paired_test(tuned_test, ref_test, "tuned", "reference")
    significant = bool(stats["p_value"] < float(config["alpha"]))
    comparison = pd.DataFrame([
        {"network": "reference", **_describe(reference, fixed), "validation_l2": float(np.nanmean(ref_val)),
         "test_l2": float(np.nanmean(ref_test)), "test_rmse": float(np.sqrt(np.nanmean(ref_test)))},
        {"network": "tuned", **_describe(tuned, fixed), "validation_l2": float(np.nanmean(tuned_val)),
         "test_l2": float(np.nanmean(tuned_test)), "test_rmse": float(np.sqrt(np.nanmean(tuned_test)))},
    ])
    test_row = {"comparison": "tuned - reference (test, per-sample L2)", **stats, "alpha": float(config["alpha"]),
                "significant": significant}

    write_json(out / "best_params.json", {"trial": best.number, "validation_l2": best.value, "params": tuned,
                                          "data_fingerprints": fingerprints})
    write_csv(out / "comparison.csv", comparison)
    write_csv(out / "ttest.csv", pd.DataFrame([test_row]))
    for name, est, val, tst in (("reference", ref_est, ref_val, ref_test), ("tuned", tuned_est, tuned_val, tuned_test)):
        metrics = {"validation_l2": float(np.nanmean(val)), "test_l2": float(np.nanmean(tst))}
        if qsm:
            est.save(out / "networks" / name, extra={"data_fingerprints": fingerprints, "metrics": metrics})
        else:
            est.save(out / "networks" / name, metrics=metrics, extra={"data_fingerprints": fingerprints})
    figure = _figure(complete, float(np.nanmean(ref_val)), out / "search.png")
    report = _report(config, definition.name, len(train), len(validation), len(test), len(complete), storage,
                     study_name, comparison, test_row, fingerprints, qsm)
    write_text(out / "report.md", report)
    manifest = run_manifest("hparam", config, started, t0, data_fingerprints=fingerprints,
                            optuna={**optuna_record, "best_trial": best.number})
    write_json(out / "manifest.json", manifest)
    summary = (f"{config['title']} on {definition.name}: best of {len(complete)} trials (validation L2 "
               f"{best.value:.5f}) = {tuned}\n"
               f"  test RMSE reference {comparison.test_rmse[0]:.5f}, tuned {comparison.test_rmse[1]:.5f}; "
               f"paired t = {stats['t']:.3g}, p = {stats['p_value']:.3g} ({'significant' if significant else 'n.s.'} "
               f"at {config['alpha']})")
    say(quiet, summary)
    return {"out": str(out), "best_params": tuned, "comparison": comparison, "ttest": test_row, "trials": trials,
            "figure": str(figure), "summary_text": summary, "manifest": manifest}


def _fit_qsm(train, params: Mapping, seed: int):
    """A QSMEstimator of the fixed and drawn settings (U-Net keys into ``unet``), fitted on ``train``
    alone: the validation heads choose between trials, so no trial sees them while training."""
    from qmri_labels.estimators import QSMEstimator

    params = dict(params)
    unet = dict(params.pop("unet", None) or {})
    unet.update({k: params.pop(k) for k in _UNET_KEYS if k in params})
    if "inputs" in params:
        params["inputs"] = tuple(params["inputs"])
    return QSMEstimator(seed=seed, unet=unet, progress=False, **params).fit(train)


def qsm_l2(estimator, data) -> np.ndarray:
    """Per head, the mean squared chi error (ppm^2) inside the head's mask: the QSM search's L2.

    Parameters
    ----------
    estimator : QSMEstimator
    data : QSMPhantomSet

    Returns
    -------
    ndarray (N,)
    """
    chi = estimator.predict(data.field, data.mask, voxel_size=data.voxel_size, b0_dir=tuple(data.orientations[0]))
    return np.array([float(np.mean((c[m].astype(np.float64) - t[m]) ** 2))
                     for c, t, m in zip(chi, data.chi, data.mask)])


def _check_worker_settings(config: Mapping) -> bool:
    if not isinstance(config["worker"], bool):
        raise ValueError(f"worker must be true (only run trials) or false, got {config['worker']!r}")
    for key, low in (("heartbeat_seconds", 1), ("failed_trial_retries", 0)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    return config["worker"]


def _describe(hyper: Mapping, fixed: Mapping) -> dict:
    return {k: (v if not isinstance(v, float) else float(v)) for k, v in {**fixed, **hyper}.items()
            if k in SEARCHABLE or k in QSM_SEARCHABLE}


def _figure(trials, reference_l2: float, path: Path) -> Path:
    # pyplot is imported when a figure is drawn, after the backend is chosen
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    numbers = [t.number for t in trials]
    values = [t.value for t in trials]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.scatter(numbers, values, s=16, label="trial")
    ax.plot(numbers, np.minimum.accumulate(values), color="C1", lw=1, label="best so far")
    ax.axhline(reference_l2, color="grey", ls="--", lw=1, label="reference hyperparameters")
    ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation L2 (normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def _report(config, dataset, n_train, n_val, n_test, n_trials, storage, study_name, comparison, test_row,
            fingerprints, qsm: bool = False) -> str:
    lines = [f"# {config['title']}", "",
             f"Dataset `{dataset}`: {n_train} training, {n_val} validation, {n_test} test rows. Random search "
             f"(trial i drawn from seed {config['seed']} and i), {n_trials} completed trials "
             f"in study `{study_name}` at `{safe_url(storage)}`; chosen by validation L2 ("
             + (f"mean squared error of {config['parameters']}, each divided by its prior range)."
                if not qsm else "per head, the mean squared chi error in ppm^2 inside its mask).")
             + (" Rows are heads." if qsm else ""), "",
             "## Reference vs tuned", "", markdown(comparison), "",
             f"Paired t-test on the test samples (tuned - reference): mean difference {test_row['mean_diff']:.4g}, "
             f"t = {test_row['t']:.4g}, p = {test_row['p_value']:.4g} "
             f"({'significant' if test_row['significant'] else 'not significant'} at alpha = {test_row['alpha']}).",
             "", "## Data fingerprints", ""] + [f"- {k}: `{v}`" for k, v in fingerprints.items()]
    return "\n".join(lines) + "\n"
