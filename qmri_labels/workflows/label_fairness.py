"""The fair-comparison parts of the IVIM label study: network design options and
presets from the configuration, per-label tuning with an equal budget, training seeds, and
the report sections that go with them. :mod:`qmri_labels.workflows.ivim` wires them in."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from qmri_labels.analysis.report import markdown_table
from qmri_labels.estimators import DESIGN_PRESETS, clone
from qmri_labels.search.tuning import CRITERIA, resolve_prune, tune
from qmri_labels.workflows.common import check_count
from qmri_labels.workflows.jobs import JobProgress, JobRunner

#: ``network`` entries of the study configuration (NetworkEstimator keywords, plus ``preset``).
NETWORK_DEFAULTS: dict[str, Any] = {
    "preset": None, "hidden_layers": 3, "width": None, "activation": "elu", "output": "sigmoid",
    "output_bounds": None, "parallel": False, "batch_norm": False, "dropout": 0.0, "bounds_margin": 0.0,
    "fit_s0": True, "weight_decay": 0.0, "lr_schedule": None,
}
#: ``tune`` entries: trials per label (0: no tuning), the criterion, the validation split of
#: the training data, the epoch budget of a trial (None: the study's), the rows searched on,
#: whether trials that fall behind stop early (None: with criterion val_loss; see
#: qmri_labels.search.tuning), and an Optuna storage URL with a study name that the searches
#: share with the same study run on other machines (None: each search lives in its process;
#: the name of a label's search is ``<study_name>-<method>``)
TUNE_DEFAULTS: dict[str, Any] = {"n_trials": 0, "criterion": "val_loss", "validation_fraction": 0.2,
                                 "max_epochs": None, "max_rows": None, "prune": None, "storage": None,
                                 "study_name": None}
#: study keys that a preset may set (they override the preset only when changed from DEFAULTS)
TRAINING_KEYS = ("lr", "batch_size", "max_epochs", "patience")
SEED_STRIDE = 1_000_003


def resolve_network(cfg: Mapping, defaults: Mapping) -> dict:
    """NetworkEstimator keywords of the design from ``cfg["network"]`` and the training keys.

    A ``preset`` (see :data:`qmri_labels.estimators.DESIGN_PRESETS`) gives the base; network
    and training entries that differ from the workflow's defaults override it.
    """
    network = dict(cfg["network"])
    unknown = set(network) - set(NETWORK_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown network options {sorted(unknown)}; known: {sorted(NETWORK_DEFAULTS)}")
    preset = network.pop("preset", None)
    if preset is not None and preset not in DESIGN_PRESETS:
        raise ValueError(f"network.preset must be one of {sorted(DESIGN_PRESETS)} or null, got {preset!r}")
    out = dict(DESIGN_PRESETS[preset]) if preset else {}
    for key, value in network.items():
        if preset is None or key not in out or value != NETWORK_DEFAULTS[key]:
            out[key] = value
    for key in TRAINING_KEYS:
        if preset is None or key not in out or cfg[key] != defaults[key]:
            out[key] = cfg[key]
    return out


def check_tune(cfg: Mapping) -> dict:
    tune = dict(cfg["tune"])
    unknown = set(tune) - set(TUNE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tune options {sorted(unknown)}; known: {sorted(TUNE_DEFAULTS)}")
    tune["n_trials"] = check_count(tune["n_trials"], "tune.n_trials", 0)
    if tune["criterion"] not in CRITERIA:
        raise ValueError(f"tune.criterion must be one of {CRITERIA}, got {tune['criterion']!r}")
    if not (0.0 < float(tune["validation_fraction"]) < 1.0):
        raise ValueError(f"tune.validation_fraction must lie in (0, 1), got {tune['validation_fraction']!r}")
    for key in ("max_epochs", "max_rows"):
        if tune[key] is not None and (int(tune[key]) != tune[key] or tune[key] < 1):
            raise ValueError(f"tune.{key} must be a positive integer or null, got {tune[key]!r}")
    resolve_prune(tune["prune"], tune["criterion"], name="tune.prune")
    if tune["storage"] is not None and (not isinstance(tune["storage"], str) or "://" not in tune["storage"]):
        raise ValueError(f"tune.storage must be a database URL such as sqlite:///path/tune.db or "
                         f"postgresql://user@host/db, or null, got {tune['storage']!r}")
    if tune["study_name"] is not None and (not isinstance(tune["study_name"], str) or not tune["study_name"]):
        raise ValueError(f"tune.study_name must be a non-empty string or null, got {tune['study_name']!r}")
    return tune


def check_seeds(value) -> int:
    return check_count(value, "seeds", 1, "training runs per method")


def seed_name(name: str, k: int) -> str:
    """Method name of seed ``k`` (seed 0 keeps the plain name)."""
    return name if k == 0 else f"{name}@s{k}"


def with_seeds(estimators: Mapping, n_seeds: int, seed: int) -> dict:
    """``n_seeds`` copies of every estimator that differ in weight init and batch order only
    (the train/validation split stays that of ``seed``)."""
    out = {}
    for name, est in estimators.items():
        for k in range(n_seeds):
            copy_ = clone(est)
            if k:
                copy_.set_params(init_seed=seed + k * SEED_STRIDE, shuffle_seed=seed + k * SEED_STRIDE)
            out[seed_name(name, k)] = copy_
    return out


def tune_design(est, train, mle_labels, tune_cfg: Mapping, seed: int, name: str):
    """Tune one label's design (a job of :mod:`qmri_labels.workflows.jobs`).

    Parameters
    ----------
    est : NetworkEstimator
        The label's untuned design.
    train : Dataset
    mle_labels : MLELabels or None
    tune_cfg : mapping
        The study's ``tune`` entries.
    seed : int
    name : str
        The method's name (names its search in a shared ``tune_cfg["storage"]``).

    Returns
    -------
    estimator : NetworkEstimator
        Unfitted, with the best trial's design (``est`` otherwise unchanged).
    record : dict
        The tuning record (:attr:`NetworkEstimator.tuning_`).
    """
    params = est.get_params()
    base = {k: v for k, v in params.items() if k not in ("label", "alpha", "seed", "weights")}
    base["progress"] = False  # one bar per trial would drown the study's own progress lines
    if tune_cfg["max_epochs"] is not None:
        base["max_epochs"] = int(tune_cfg["max_epochs"])
    best = tune(est.label, train, n_trials=tune_cfg["n_trials"], seed=seed, criterion=tune_cfg["criterion"],
                alpha=est.alpha, base=base, validation_fraction=tune_cfg["validation_fraction"],
                mle_labels=mle_labels if est.label in ("mle", "hybrid") else None, max_rows=tune_cfg["max_rows"],
                prune=tune_cfg["prune"], refit=False,  # the study retrains the design on all rows
                storage=tune_cfg["storage"],
                study_name=f"{tune_cfg['study_name']}-{name}" if tune_cfg["study_name"] else None)
    final = clone(est)
    final.set_params(**best.tuning_["best_params"])
    return final, best.tuning_


def fit_design(est, train, mle_labels, show_progress: bool = True):
    """Train one network of the study (a job of :mod:`qmri_labels.workflows.jobs`); returns it.

    ``show_progress=False`` hides the progress bar of this training only (bars of jobs running
    side by side would overwrite each other); the estimator keeps its own ``progress`` setting,
    so what it records does not depend on how the study ran it.
    """
    if show_progress or not est.progress:
        return est.fit(train, mle_labels=mle_labels)
    est.set_params(progress=False)
    try:
        est.fit(train, mle_labels=mle_labels)
    finally:
        est.set_params(progress=True)
    return est


def train_designs(defaults: Mapping, train, mle_labels, tune_cfg: Mapping | None, n_seeds: int, seed: int,
                  workers: int, needs_mle, report, then: tuple[str, float] | None = None
                  ) -> tuple[dict, dict, dict, dict]:
    """Tune (with ``tune_cfg``) and train every design at every seed, over ``workers`` processes.

    Every tuning search and every training is an independent, self-seeded job, so the networks
    do not depend on the number of workers or on the order in which jobs finish
    (``tests/workflows/test_study_workers.py``). The searches are submitted first (they take longest, and
    their designs' trainings wait for them).

    Parameters
    ----------
    defaults : mapping of method name -> unfitted NetworkEstimator
    tune_cfg : mapping or None
        The study's ``tune`` entries; None: no tuning.
    needs_mle : callable
        ``needs_mle(estimator)``: whether its loss reads the MLE labels.
    report : callable
        ``report(message, detail=None)`` after each finished job; the message ends with the time
        spent on these jobs and an estimate of the time they still need.
    then : (str, float) or None
        What follows the trainings and its estimated seconds (:class:`JobProgress`), so that
        each line also estimates the time left in the study.

    Returns
    -------
    designs : dict of method name -> estimator (defaults, then ``<name>-tuned``), in report order
    fitted : dict of ``<name>[@s<k>]`` -> fitted estimator, in report order
    tuning_records : dict of method name -> the search's record
    seconds : dict of ``tune_<name>`` / ``train_<name>`` -> seconds of that job
    """
    tuned_names = {name: f"{name}-tuned" for name in defaults} if tune_cfg else {}
    designs = {**defaults, **{tuned: None for tuned in tuned_names.values()}}
    fitted, records, seconds = {}, {}, {}
    # a search per label, then every design (default and tuned) at every seed
    progress = JobProgress(len(defaults) * (1 + 2 * n_seeds if tune_cfg else n_seeds), then=then)

    def submit_trainings(runner, named):
        for name, est in with_seeds(named, n_seeds, seed).items():
            runner.submit(("fit", name), fit_design, est, train, mle_labels if needs_mle(est) else None, workers == 1)

    with JobRunner(workers) as runner:
        for name, est in defaults.items() if tune_cfg else ():
            runner.submit(("tune", name), tune_design, est, train, mle_labels, tune_cfg, seed, name)
        submit_trainings(runner, defaults)
        for (job, name), result, took in runner.completed():
            seconds[f"{job if job == 'tune' else 'train'}_{name}"] = took
            if job == "tune":
                design, record = result
                default = record.get("default") or {}
                report(f"tuned {name}: {record['n_trials']} trials ({record['criterion']}, {record['n_pruned']} "
                       f"pruned), {took:.1f} s; training {progress.finished()}",
                       f"      best {record['criterion']} {record['best_value']:.4g} "
                       f"(default {default.get(record['criterion'], float('nan')):.4g})")
                records[name] = record
                designs[tuned_names[name]] = design
                submit_trainings(runner, {tuned_names[name]: design})
            else:
                report(f"trained {name}: {result.n_epochs_} epochs, best epoch {result.best_epoch_}, "
                       f"val loss {result.best_val_loss_:.4g}, {took:.1f} s; training {progress.finished()}")
                fitted[name] = result
    order = [seed_name(name, k) for name in designs for k in range(n_seeds)]
    return (designs, {name: fitted[name] for name in order},
            {name: records[name] for name in defaults if name in records}, seconds)


def trials_table(records: Mapping) -> pd.DataFrame:
    """One row per trial of every label's search: its design, both criteria, epochs, seconds
    and whether it was pruned."""
    rows = []
    for name, rec in records.items():
        for trial in rec["trials"]:
            rows.append({"method": name, "trial": trial["number"], "pruned": trial.get("pruned", False),
                         "val_loss": trial["val_loss"], "param_rmse": trial["param_rmse"],
                         "epochs": trial["epochs"], "seconds": trial["seconds"],
                         **trial["params"]})
    return pd.DataFrame(rows)


def tuning_table(records: Mapping) -> pd.DataFrame:
    """One row per label: both criteria of the default and of the best trial."""
    rows = []
    for name, rec in records.items():
        default = rec.get("default") or {}
        best = rec["best_scores"]
        rows.append({"method": name, "criterion": rec["criterion"], "trials": rec["n_trials"],
                     "val_loss_default": default.get("val_loss", np.nan), "val_loss_tuned": best["val_loss"],
                     "param_rmse_default": default.get("param_rmse", np.nan), "param_rmse_tuned": best["param_rmse"],
                     "best_params": ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in rec["best_params"].items())})
    return pd.DataFrame(rows)


def tuning_section(records: Mapping, comparison: Mapping) -> str:
    """Markdown: the search per label, tuned vs default on the grid, and the ranking change."""
    table = comparison["table"]
    cols = ["label", "parameter"] + [f"{m}_{w}" for m in ("mean_abs_bias", "mean_sd", "sensitivity", "rmse")
                                     for w in ("default", "tuned")]
    tests = comparison["tests"]
    lines = ["## Tuned vs default design per label", "",
             "Every label was tuned with the same number of trials over the same design space, on a validation "
             "split of the training data (never the evaluation grid); the untuned design is trial 0. Both "
             "criteria are given for the default and the best trial (`val_loss`: the label's own loss; "
             "`param_rmse`: normalised parameter RMSE on the simulated validation rows).", "",
             markdown_table(tuning_table(records)), "",
             "### On the evaluation grid", "", markdown_table(table, cols), "",
             "### Label ranking (best first)", "",
             ("**The ranking of the labels changes with tuning** for at least one parameter and metric."
              if comparison["ranking_changed"] else "The ranking of the labels is the same with and without tuning."),
             "", markdown_table(comparison["ranking"]), "",
             "### Paired tests, tuned minus default, over the grid points", "",
             "Per-point |bias|, SD and RMSE; paired t-test, Bonferroni-corrected over all rows.", "",
             markdown_table(tests, ["parameter", "metric", "a", "b", "mean_diff", "t", "p_adjusted", "significant"]),
             ""]
    return "\n".join(lines)


def seeds_section(seed_table: pd.DataFrame, findings: pd.DataFrame, n_seeds: int) -> str:
    """Markdown: mean and spread over seeds, and the label differences that exceed the spread."""
    cols = ["method", "parameter"] + [f"{m}_{s}" for m in ("mean_abs_bias", "mean_sd", "sensitivity", "rmse")
                                      for s in ("mean", "sd")]
    kept = findings[findings["finding"]]
    lines = [f"## Over {n_seeds} training seeds", "",
             "Each network was trained with different weight initialisation and batch order (same data and "
             "split). Mean and SD over seeds:", "", markdown_table(seed_table, cols), "",
             "### Findings", "",
             "A paired difference between two labels (seed k against seed k) counts as a finding only when its "
             "mean over seeds exceeds the seed-to-seed spread (the larger SD over seeds of the two); "
             f"{len(kept)} of {len(findings)} differences do.", ""]
    if len(kept):
        lines += [markdown_table(kept, ["a", "b", "parameter", "metric", "mean_diff", "seed_spread"]), ""]
    return "\n".join(lines)
