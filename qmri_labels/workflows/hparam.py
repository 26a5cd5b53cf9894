"""Hyperparameter search per dataset: random search, pick by validation L2, then test
"reference" against "tuned" hyperparameters with a paired t-test.

Oh et al. (2021): a network retrained on new data needs its hyperparameters retuned before it
is compared with another. The search uses random draws over learning rate, batch size,
width, depth, activation and weight decay. Each trial trains the library's
:class:`~qmri_labels.estimators.NetworkEstimator` on the dataset's train split and scores the
mean squared normalised parameter error (L2) on its ``validation`` split (never on the test
split). The best trial's hyperparameters and the reference ones are then trained once more
with the same seed and compared on the test split.

Many workers, one search. Trials live in an Optuna study store: SQLite in the output folder by
default, or any SQL database URL (``storage`` in the config, ``--storage`` on the command
line, or the ``QMRI_LABELS_OPTUNA_STORAGE`` environment variable). Any number of processes,
on one machine or many, started with the same configuration, ``storage`` and ``study_name``,
share one search:

* ``n_trials`` is the budget of the whole study: every process runs trials until the study
  holds ``n_trials`` completed ones (a process that finds it reached does nothing), so a rerun
  resumes. Processes that finish at the same moment may complete a few more (at most one each).
* The hyperparameters of trial number ``i`` are drawn from ``(seed, i)`` alone, so the search
  is the same whichever process runs which trial and however many run.
* Each trial is recorded once (the store numbers them). A running trial sends a heartbeat
  every ``heartbeat_seconds``; a trial whose process was killed is marked failed once its
  heartbeat is two intervals old (checked by every process before it starts a trial), and
  is queued again with the same hyperparameters up to ``failed_trial_retries`` times (the
  finishing run, below, does the same for a trial whose process died before its first
  heartbeat). The other processes go on.
* A process started with ``worker: true`` (``--worker``) only runs trials. One process
  without it (started with or after the workers) runs trials as well, then waits until no
  trial is running, runs any re-queued ones, and does the reference-vs-tuned comparison over
  all completed trials of the study.

Outputs under ``out``: ``trials.csv`` (every trial of the study), ``manifest.json`` and, for
the comparison run, ``best_params.json``, ``comparison.csv`` (reference vs tuned on
validation and test, paired t-test on the test samples), ``search.png``, ``report.md``,
``networks/reference`` and ``networks/tuned`` (bundles), and ``optuna.db`` with the default
storage.

Run by name: ``python -m qmri_labels.study --config hparam_ivim``; workers:
``python -m qmri_labels.study --config hparam_ivim --storage URL --study-name NAME --worker``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from qmri_labels.data.definitions import get_definition
from qmri_labels.data.registry import load_dataset
from qmri_labels.estimators import train_network
from qmri_labels.fileio import write_json, write_text
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

STORAGE_ENV = "QMRI_LABELS_OPTUNA_STORAGE"
#: user attribute a trial's objective sets first (to its own number)
STARTED_ATTR = "objective_started"

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
    # list -> categorical choice; {low, high, log} -> float (int when both bounds are integers and
    # log is false)
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
}

#: sub-mappings of the config checked by their consumer (the search-space check, NetworkEstimator), not against DEFAULTS
FREE_FORM_KEYS = ("search_space", "reference", "network")

SEARCHABLE = ("lr", "batch_size", "width", "hidden_layers", "activation", "weight_decay", "optimiser", "label",
              "alpha", "val_fraction")


def _check_space(space: Mapping) -> dict:
    if not isinstance(space, Mapping) or not space:
        raise ValueError("search_space must be a non-empty mapping of hyperparameter -> choices or range")
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise ValueError(f"cannot search over {name!r}; searchable: {', '.join(SEARCHABLE)}")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError(f"search_space.{name}: empty list of choices")
        elif isinstance(spec, Mapping):
            if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
                raise ValueError(f"search_space.{name}: a range needs low < high, got {dict(spec)}")
            if spec.get("log") and spec["low"] <= 0:
                raise ValueError(f"search_space.{name}: a log range needs low > 0")
        else:
            raise ValueError(f"search_space.{name}: give a list of choices or {{low, high, log}}, got {spec!r}")
    return dict(space)


def suggest(trial, space: Mapping) -> dict:
    """Draw one set of hyperparameters from ``space`` with an Optuna trial."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, (list, tuple)):
            params[name] = trial.suggest_categorical(name, list(spec))
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            params[name] = trial.suggest_int(name, spec["low"], spec["high"])
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return params


def _validation_split(config, definition, train_seed: int):
    n = {"n": int(config["n_validation"])} if config["n_validation"] else {}
    if "validation" in definition.splits:
        return load_dataset(definition, "validation", **n)
    return load_dataset(definition, "train", seed=train_seed + 1_000_003, **n)


def run(config: Mapping, out: Path, quiet: bool = False) -> dict:
    """Run the search and the reference-vs-tuned comparison (see the module docstring)."""
    import optuna

    t0, started = time.perf_counter(), time.time()
    config = merge_config(DEFAULTS, config, FREE_FORM_KEYS)
    space = _check_space(config["search_space"])
    n_trials = int(config["n_trials"])
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    worker = _check_worker_settings(config)
    fixed = dict(config["network"])
    clash = set(fixed) & set(space)
    if clash:
        raise ValueError(f"{sorted(clash)} are both fixed (network) and searched (search_space)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)

    definition = get_definition(config["dataset"])
    if definition.kind != "voxel":
        raise ValueError(f"hparam searches voxel-wise networks; dataset {definition.name!r} is {definition.kind}")
    train = load_dataset(definition, "train", **({"n": int(config["n_train"])} if config["n_train"] else {}))
    validation = _validation_split(config, definition, definition.splits["train"]["seed"])
    test = load_dataset(definition, "test", **({"n": int(config["n_test"])} if config["n_test"] else {}))
    fingerprints = {"train": train.fingerprint, "validation": validation.fingerprint, "test": test.fingerprint}
    if len(set(fingerprints.values())) != 3:
        raise ValueError("train, validation and test data must differ")
    settings = DeterminismSettings(seed=int(config["seed"]), num_threads=config["num_threads"])
    params_of = config["parameters"]

    def train_and_score(hyper: Mapping, data=validation):
        run_ = train_network(train, settings, **{**fixed, **hyper})
        return run_.estimator, per_sample_l2(run_.estimator.predict(data.signals), data, params_of)

    storage = config["storage"] or os.environ.get(STORAGE_ENV) or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study_name = config["study_name"] or f"hparam-{definition.name}"
    optuna.logging.set_verbosity(optuna.logging.WARNING if quiet else optuna.logging.INFO)
    signature = {"dataset": definition.name, "data_fingerprints": fingerprints, "parameters": list(params_of),
                 "search_space": space, "network": fixed, "seed": int(config["seed"])}
    study = open_study(storage, study_name, int(config["seed"]), int(config["heartbeat_seconds"]),
                       int(config["failed_trial_retries"]), signature)
    say(quiet, f"random search: {n_trials} trials in study {study_name!r} at {_safe_url(storage)} on "
               f"{definition.name} ({len(train)} training rows)" + (" (worker: trials only)" if worker else ""))
    worker_id = f"{platform.node()}:{os.getpid()}"

    def objective(trial):
        # first: marks the trial as begun, its first heartbeat recorded (see run_trials)
        mark_trial_begun(study, trial)
        trial.set_user_attr("worker", worker_id)
        hyper = suggest(trial, space)
        start = time.perf_counter()
        estimator, errors = train_and_score(hyper)
        trial.set_user_attr("epochs", int(estimator.n_epochs_))
        trial.set_user_attr("fit_seconds", time.perf_counter() - start)
        trial.set_user_attr("validation_rmse", float(np.sqrt(np.nanmean(errors))))
        trial.set_user_attr("validation_fingerprint", validation.fingerprint)
        value = float(np.nanmean(errors))
        return value if math.isfinite(value) else float("inf")

    ran = run_trials(study, objective, n_trials, finish=not worker,
                     poll_seconds=min(5.0, float(config["heartbeat_seconds"])),
                     grace_seconds=2 * int(config["heartbeat_seconds"]), retries=int(config["failed_trial_retries"]))
    trials = study.trials_dataframe()
    # only trials scored on this validation data count (a shared store may hold others)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get("validation_fingerprint") == validation.fingerprint]
    write_csv(out / "trials.csv", trials)
    optuna_record = {"storage": _safe_url(storage), "study_name": study_name, "sampler": "TrialSeededRandomSampler",
                     "worker": worker, "worker_id": worker_id, "trials_here": ran,
                     "trials_in_study": len(complete)}
    if worker:
        manifest = run_manifest("hparam", config, started, t0, data_fingerprints=fingerprints, optuna=optuna_record)
        write_json(out / "manifest.json", manifest)
        summary = (f"worker {worker_id}: ran {ran} trials; study {study_name!r} holds {len(complete)} completed "
                   f"of {n_trials}")
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
    ref_test = per_sample_l2(ref_est.predict(test.signals), test, params_of)
    tuned_test = per_sample_l2(tuned_est.predict(test.signals), test, params_of)
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
        est.save(out / "networks" / name, metrics={"validation_l2": float(np.nanmean(val)),
                                                   "test_l2": float(np.nanmean(tst))},
                 extra={"data_fingerprints": fingerprints})
    figure = _figure(complete, float(np.nanmean(ref_val)), out / "search.png")
    report = _report(config, definition.name, len(train), len(validation), len(test), len(complete), storage,
                     study_name, comparison, test_row, fingerprints)
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


def _check_worker_settings(config: Mapping) -> bool:
    if not isinstance(config["worker"], bool):
        raise ValueError(f"worker must be true (only run trials) or false, got {config['worker']!r}")
    for key, low in (("heartbeat_seconds", 1), ("failed_trial_retries", 0)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    return config["worker"]


def trial_seeded_sampler(seed: int):
    """An Optuna random sampler whose draws for trial number ``i`` depend on ``(seed, i)`` only.

    Workers sharing a study then search the same points whichever of them runs which trial
    (Optuna's :class:`~optuna.samplers.RandomSampler` draws from one stream per process). A
    trial queued again after a failure keeps the failed trial's values and draws any missing
    ones as the failed trial would have.
    """
    import optuna

    class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, param_name, param_distribution):
            # a trial queued again after a failure draws what the failed trial would have drawn
            number = trial.system_attrs.get("failed_trial", trial.number)
            key = hashlib.sha256(f"{int(seed)}/{number}/{param_name}".encode()).digest()
            draw = optuna.samplers.RandomSampler(seed=int.from_bytes(key[:4], "little"))
            return draw.sample_independent(study, trial, param_name, param_distribution)

    return TrialSeededRandomSampler(seed=int(seed))


def open_study(storage: str, study_name: str, seed: int, heartbeat_seconds: int, retries: int,
               signature: Mapping | None = None):
    """Create or load the shared study, with heartbeats and re-queueing of failed trials.

    ``signature`` (data, search space, fixed settings) is stored with a new study; a worker
    whose signature differs is refused, so one study never mixes two searches.
    """
    import optuna
    from optuna.storages import RDBStorage

    callback_kw = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                   in inspect.signature(RDBStorage.__init__).parameters else "failed_trial_callback")

    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"storage must be a database URL such as sqlite:///path/optuna.db or "
                         f"postgresql://user@host/db, got {storage!r}")
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(5):
            # workers starting together may race to create the tables of a new store
            try:
                rdb = RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=int(heartbeat_seconds),
                                 grace_period=2 * int(heartbeat_seconds),
                                 **{callback_kw: _retry_callback(retries)})
                study = optuna.create_study(study_name=study_name, storage=rdb, sampler=trial_seeded_sampler(seed),
                                            direction="minimize", load_if_exists=True)
                break
            except Exception as exc:  # sqlalchemy's OperationalError / IntegrityError of a concurrent creation
                if attempt == 4 or type(exc).__module__.split(".")[0] != "sqlalchemy":
                    raise
                time.sleep(0.5 + attempt)
    if signature is not None:
        plain = json.loads(json.dumps(dict(signature), sort_keys=True, default=str))
        stored = study.user_attrs.get("search_signature")
        if stored is None:
            study.set_user_attr("search_signature", plain)
        elif stored != plain:
            differing = sorted(k for k in set(stored) | set(plain) if stored.get(k) != plain.get(k))
            raise ValueError(f"study {study_name!r} at {_safe_url(storage)} holds another search (differs in "
                             f"{differing}); give this configuration its own study_name")
    return study


def run_trials(study, objective, n_trials: int, finish: bool, poll_seconds: float = 5.0,
               grace_seconds: float = 120.0, retries: int = 1) -> int:
    """Run trials until the study holds ``n_trials`` completed ones; returns how many ran here.

    ``finish``: afterwards wait until no trial of the study runs (trials of killed workers
    are failed by their stale heartbeat meanwhile) and run the trials queued again after a
    failure, so that the study is complete when this returns. A trial whose worker died
    before its objective began has no heartbeat that could go stale; it is failed (and queued
    again) once it has run for ``grace_seconds`` without its objective setting
    :data:`STARTED_ATTR`; ``retries`` as in :func:`open_study`.
    """
    import optuna

    states = optuna.trial.TrialState
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            counts = _state_counts(study)
            if counts[states.COMPLETE] < n_trials or (finish and counts[states.WAITING]):
                # one trial per call: the budget is checked against every worker's trials before each
                study.optimize(objective, n_trials=1, gc_after_trial=False)
                ran += 1
                continue
            if not finish:
                return ran
            optuna.storages.fail_stale_trials(study)
            _fail_trials_never_begun(study, grace_seconds, retries)
            counts = _state_counts(study)
            if not counts[states.RUNNING] and not counts[states.WAITING]:
                return ran
            if not counts[states.WAITING]:
                time.sleep(poll_seconds)


def mark_trial_begun(study, trial) -> None:
    """Record a heartbeat of ``trial``, then mark it begun (:data:`STARTED_ATTR`).

    Optuna's heartbeat thread starts with the objective and writes its first beat when the
    thread gets to run. A worker killed after the objective began but before that first beat
    left a trial that was neither stale (no heartbeat to age) nor never begun, and the finishing
    run waited for it forever (CI's killed-worker test hung this way on a loaded machine).
    Beating first closes the gap: killed before the mark, the trial is failed as never begun;
    after it, by its stale heartbeat.
    """
    storage = study._storage  # the RDBStorage of open_study; Optuna has no public accessor
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    trial.set_user_attr(STARTED_ATTR, trial.number)


def _retry_callback(retries: int):
    """Optuna's callback that queues a failed trial again (renamed in Optuna 4.9)."""
    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return retry(max_retry=int(retries))


def _fail_trials_never_begun(study, grace_seconds: float, retries: int) -> None:
    """Fail running trials whose objective never began (their worker died between taking the
    trial and starting its heartbeat), and queue them again like heartbeat-stale ones."""
    import datetime

    import optuna

    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        begun = trial.user_attrs.get(STARTED_ATTR) == trial.number
        if begun or trial.datetime_start is None or (now - trial.datetime_start).total_seconds() <= grace_seconds:
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # finished or failed by another process meanwhile
            continue
        failed = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        _retry_callback(retries)(study, failed)


def _state_counts(study) -> dict:
    import optuna

    counts = dict.fromkeys(optuna.trial.TrialState, 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def _describe(hyper: Mapping, fixed: Mapping) -> dict:
    return {k: (v if not isinstance(v, float) else float(v)) for k, v in {**fixed, **hyper}.items()
            if k in SEARCHABLE}


def _safe_url(url: str) -> str:
    """The storage URL without a password (it goes into reports)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _figure(trials, reference_l2: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from qmri_labels.analysis.plots import save_figure

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
            fingerprints) -> str:
    lines = [f"# {config['title']}", "",
             f"Dataset `{dataset}`: {n_train} training, {n_val} validation, {n_test} test rows. Random search "
             f"(trial i drawn from seed {config['seed']} and i), {n_trials} completed trials "
             f"in study `{study_name}` at `{_safe_url(storage)}`; chosen by validation L2 (mean squared error of "
             f"{config['parameters']}, each divided by its prior range).", "",
             "## Reference vs tuned", "", markdown(comparison), "",
             f"Paired t-test on the test samples (tuned - reference): mean difference {test_row['mean_diff']:.4g}, "
             f"t = {test_row['t']:.4g}, p = {test_row['p_value']:.4g} "
             f"({'significant' if test_row['significant'] else 'not significant'} at alpha = {test_row['alpha']}).",
             "", "## Data fingerprints", ""] + [f"- {k}: `{v}`" for k, v in fingerprints.items()]
    return "\n".join(lines) + "\n"
