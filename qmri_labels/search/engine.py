"""One Optuna search, in one process or shared by workers on many machines.

A search is an Optuna study: in memory for one process, or in an Optuna storage (SQLite for one
machine, any SQL database URL for many) that any number of processes started with the same
settings and study name share. Its trials are numbered by their *search index*: the order in
which they were first taken from the store (a trial run again after its worker died keeps its
index). What a search finds depends on the seed and the index alone, never on how many
processes ran it or which ran what:

* **Trial-seeded sampling** (:func:`trial_seeded_sampler`). The draws of trial ``i`` come from
  ``(seed, i)``: random search, or TPE (``algorithm="tpe"``) whose first
  :data:`TPE_STARTUP_TRIALS` trials draw at random and whose later ones model the finished
  trials of lower index only (a worker waits for those still running elsewhere). Trial 0 may
  be a given point (``first``: the untuned design).
* **Median pruning in index order** (:class:`OrderedMedianPruner`): Optuna's median rule over the
  completed trials of lower index at the same step (waiting, as above, for those still running).
* **A budget of trials** (:func:`run_trials`): processes take trials until ``n_trials`` of them
  are taken (complete, pruned or running; a trial that failed for good is replaced), so a rerun
  with a larger budget resumes. Processes that look at the same moment may each take one more;
  the search's result is its first ``n_trials`` finished trials in index order
  (:func:`finished_trials`), which later trials cannot change.
* **Heartbeats**: a running trial of a shared store beats every ``heartbeat_seconds``; a trial
  whose process was killed is failed once its heartbeat is two intervals old, or, if it died
  before its first beat, once it has run ``grace_seconds`` without being marked begun
  (:func:`mark_trial_begun`), and is queued again with the same parameters up to ``retries``
  times. A process started as a worker (``finish=False``) only runs trials; a finishing one then
  waits until no trial runs, so that the search is complete when it returns.

A killed worker is the one event that can change what a TPE search or the pruning sees (the
trials of lower index are then those that had finished when the search went on); random search
stays the same point by point.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
import platform
import time
import warnings
from typing import Callable, Mapping

import optuna
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled  # Optuna exports no public test for it
from optuna.trial import FrozenTrial, TrialState

__all__ = ["STORAGE_ENV", "STARTED_ATTR", "ALGORITHMS", "TPE_STARTUP_TRIALS", "trial_seeded_sampler",
           "OrderedMedianPruner", "open_study", "run_trials", "mark_trial_begun", "finished_trials", "search_index",
           "safe_url"]

#: environment variable with the default storage URL of the hyperparameter study
STORAGE_ENV = "QMRI_LABELS_OPTUNA_STORAGE"
#: user attribute a trial's objective sets first (to its own number), see :func:`mark_trial_begun`
STARTED_ATTR = "objective_started"
ALGORITHMS = ("random", "tpe")
#: trials a TPE search draws at random before it models the finished ones (Optuna's default)
TPE_STARTUP_TRIALS = 10
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_ALIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def _indices(trials) -> dict[int, int]:
    """Storage number -> search index of every trial of a study (retries keep their first
    trial's index; see the module docstring)."""
    fresh = sorted(t.number for t in trials if "failed_trial" not in t.system_attrs)
    first = {number: i for i, number in enumerate(fresh)}
    return {t.number: first.get(t.system_attrs.get("failed_trial", t.number), t.number) for t in trials}


def search_index(study, trial) -> int:
    """The search index of ``trial`` (a trial of ``study``)."""
    return _indices(study.get_trials(deepcopy=False)).get(trial.number, trial.number)


def _grouped(trials) -> dict[int, list[FrozenTrial]]:
    index = _indices(trials)
    groups: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(index[t.number], []).append(t)
    return groups


def finished_trials(study, n_trials: int | None = None) -> list[tuple[int, FrozenTrial]]:
    """``(search index, trial)`` of the finished (complete or pruned) trials in index order, the
    first ``n_trials`` of them (None: all): the search's result, whoever ran it."""
    rows = []
    for index, attempts in sorted(_grouped(study.get_trials(deepcopy=False)).items()):
        done = [t for t in attempts if t.state in FINISHED]
        if done:
            rows.append((index, done[0]))
    return rows if n_trials is None else rows[: int(n_trials)]


class _Reaper:
    """Fails the trials of dead workers: heartbeat-stale ones and never-begun ones."""

    def __init__(self, grace_seconds: float, retries: int, poll_seconds: float):
        self.grace_seconds, self.retries, self.poll_seconds = float(grace_seconds), int(retries), float(poll_seconds)

    def __call__(self, study) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        _fail_trials_never_begun(study, self.grace_seconds, self.retries)


class _Earlier:
    """A read-only view of ``study`` holding its trials of search index below ``index``, once none
    of them runs any more (the trials a trial of that index is conditioned on)."""

    def __init__(self, study, index: int, reaper: _Reaper | None):
        self._study = study
        while True:
            trials = study.get_trials(deepcopy=False)
            index_of = _indices(trials)
            earlier = [t for t in trials if index_of[t.number] < index]
            if reaper is None or not any(t.state == TrialState.RUNNING for t in earlier):
                break
            reaper(study)
            time.sleep(reaper.poll_seconds)
        self._trials = earlier

    def get_trials(self, deepcopy: bool = False, states=None, **_) -> list[FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]

    _get_trials = get_trials

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name):
        return getattr(self._study, name)


def _trial_seed(seed: int, index: int, name: str) -> int:
    key = hashlib.sha256(f"{int(seed)}/{index}/{name}".encode()).digest()
    return int.from_bytes(key[:4], "little")


class _TrialSeededSampler(optuna.samplers.BaseSampler):
    def __init__(self, seed: int, algorithm: str, first: Mapping | None, reaper: _Reaper | None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.seed, self.algorithm, self.first, self.reaper = int(seed), algorithm, dict(first or {}), reaper
        self._index: dict[int, int] = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial._trial_id not in self._index:
            self._index = {trial._trial_id: search_index(study, trial)}
        index = self._index[trial._trial_id]
        if index == 0 and param_name in self.first:
            return self.first[param_name]
        seed = _trial_seed(self.seed, index, param_name)
        if self.algorithm == "random" or index < TPE_STARTUP_TRIALS:
            return optuna.samplers.RandomSampler(seed=seed).sample_independent(study, trial, param_name,
                                                                               param_distribution)
        tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
        return tpe.sample_independent(_Earlier(study, index, self.reaper), trial, param_name, param_distribution)


def trial_seeded_sampler(seed: int, algorithm: str = "random", first: Mapping | None = None,
                         reaper: _Reaper | None = None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler whose draws for the trial of search index ``i`` depend on ``(seed, i)``
    (and, for TPE, on the finished trials of lower index) only.

    Parameters
    ----------
    seed : int
    algorithm : {"random", "tpe"}
        Random search, or TPE after :data:`TPE_STARTUP_TRIALS` random trials.
    first : mapping or None
        Values of trial 0 (e.g. the untuned design); names it lacks are drawn.
    reaper : optional
        Fails dead workers' trials while a TPE draw waits for trials of lower index (set by
        :func:`open_study`; None: nothing is waited for, as in one process).

    Returns
    -------
    optuna.samplers.BaseSampler
        A trial run again after a failure keeps the failed trial's values and draws any missing
        ones as the failed trial would have.
    """
    return _TrialSeededSampler(seed, algorithm, first, reaper)


class OrderedMedianPruner(optuna.pruners.BasePruner):
    """Optuna's median rule (:class:`optuna.pruners.MedianPruner`) over the completed trials of
    lower search index: the same decisions however many processes share the search.

    Parameters
    ----------
    n_startup_trials : int
        Trials of lower index are never pruned (they set the median).
    n_warmup_steps : int
        Steps (epochs) of every trial before pruning.
    reaper : optional
        Fails dead workers' trials while waiting for trials of lower index (set by
        :func:`open_study`; None: nothing is waited for, as in one process).
    """

    def __init__(self, n_startup_trials: int, n_warmup_steps: int, reaper: _Reaper | None = None):
        self.n_startup_trials, self.n_warmup_steps, self.reaper = int(n_startup_trials), int(n_warmup_steps), reaper
        self._median = optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                                   n_warmup_steps=self.n_warmup_steps)

    def prune(self, study, trial) -> bool:
        index = search_index(study, trial)
        # below either threshold the rule cannot prune: no need to wait for the earlier trials
        if index < self.n_startup_trials or trial.last_step is None or trial.last_step < self.n_warmup_steps:
            return False
        return self._median.prune(_Earlier(study, index, self.reaper), trial)


def open_study(storage: str | None, study_name: str | None, seed: int, heartbeat_seconds: int = 60, retries: int = 1,
               signature: Mapping | None = None, *, algorithm: str = "random", first: Mapping | None = None,
               median_pruning: tuple[int, int] | None = None):
    """Create or load a search: in memory (``storage=None``) or in a shared store.

    Parameters
    ----------
    storage : str or None
        Database URL (``sqlite:///path/optuna.db``, ``postgresql://user@host/db``); None: a study
        in this process's memory.
    study_name : str or None
        Name of the study in the store (the same on every worker).
    seed : int
        Seed of the trial-seeded sampler (:func:`trial_seeded_sampler`).
    heartbeat_seconds : int
        A running trial's heartbeat interval in a store; a trial silent for twice as long is failed.
    retries : int
        How often a failed trial is queued again with the same parameters.
    signature : mapping or None
        What defines the search (data, space, fixed settings); stored with a new study, and a
        process whose signature differs is refused, so one study never mixes two searches.
    algorithm : {"random", "tpe"}
    first : mapping or None
        Values of trial 0.
    median_pruning : (n_startup_trials, n_warmup_steps) or None
        Prune with :class:`OrderedMedianPruner`; None: never prune.

    Returns
    -------
    optuna.Study
    """
    heartbeat_seconds, retries = int(heartbeat_seconds), int(retries)
    reaper = None if storage is None else _Reaper(2 * heartbeat_seconds, retries, min(5.0, float(heartbeat_seconds)))
    sampler = trial_seeded_sampler(seed, algorithm, first, reaper)
    pruner = (OrderedMedianPruner(*median_pruning, reaper=reaper) if median_pruning is not None
              else optuna.pruners.NopPruner())
    if storage is None:
        return optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"storage must be a database URL such as sqlite:///path/optuna.db or "
                         f"postgresql://user@host/db, got {storage!r}")
    callback_kw = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                   in inspect.signature(RDBStorage.__init__).parameters else "failed_trial_callback")
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(5):
            # workers starting together may race to create the tables of a new store
            try:
                rdb = RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds,
                                 grace_period=2 * heartbeat_seconds, **{callback_kw: _retry_callback(retries)})
                study = optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler, pruner=pruner,
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
            raise ValueError(f"study {study_name!r} at {safe_url(storage)} holds another search (differs in "
                             f"{differing}); give this configuration its own study_name")
    return study


def run_trials(study, objective: Callable, n_trials: int, finish: bool, poll_seconds: float = 5.0,
               grace_seconds: float = 120.0, retries: int = 1) -> int:
    """Run trials of ``study`` until ``n_trials`` are taken; returns how many ran here.

    Parameters
    ----------
    study : optuna.Study
        From :func:`open_study`.
    objective : callable
        ``objective(trial) -> float``; it is marked begun (:func:`mark_trial_begun`) first, and
        its ``worker`` user attribute names the host and process that ran it.
    n_trials : int
        The budget of the whole search: trials taken by every process together (a trial that
        failed for good is replaced; one queued again after a failure is run on top; processes
        that look at the same moment may each take one more).
    finish : bool
        Afterwards wait until no trial of the study runs (trials of killed workers are failed
        meanwhile) and run the trials queued again after a failure, so that the search is
        complete when this returns; False: a worker that only runs trials.
    poll_seconds : float
        Pause between looks at a store while waiting.
    grace_seconds : float
        A running trial never marked begun (its worker died between taking it and starting its
        objective, so no heartbeat can go stale) is failed after this long.
    retries : int
        As in :func:`open_study`.

    Returns
    -------
    int
    """
    ran = 0

    worker = f"{platform.node()}:{os.getpid()}"

    def marked(trial):
        mark_trial_begun(study, trial)
        trial.set_user_attr("worker", worker)
        return objective(trial)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            taken = sum(any(t.state in _ALIVE for t in attempts) for attempts in _grouped(trials).values())
            if waiting or taken < n_trials:
                # one trial per call: the budget is checked against every worker's trials before each
                study.optimize(marked, n_trials=1, gc_after_trial=False)
                ran += 1
                continue
            if not finish:
                return ran
            _Reaper(grace_seconds, retries, poll_seconds)(study)
            states = {t.state for t in study.get_trials(deepcopy=False)}
            if TrialState.WAITING in states:
                continue
            if TrialState.RUNNING not in states:
                return ran
            time.sleep(poll_seconds)


def mark_trial_begun(study, trial) -> None:
    """Record a heartbeat of ``trial`` (in a store), then mark it begun (:data:`STARTED_ATTR`).

    Optuna's heartbeat thread starts with the objective and writes its first beat when the
    thread gets to run. A worker killed after the objective began but before that first beat
    would leave a trial that is neither stale (no heartbeat to age) nor never begun, and a
    finishing run would wait for it forever. Beating first closes the gap: killed before the
    mark, the trial is failed as never begun; after it, by its stale heartbeat.
    """
    storage = study._storage  # the RDBStorage of open_study; Optuna has no public accessor
    if is_heartbeat_enabled(storage):
        study_id = storage.get_study_id_from_name(study.study_name)
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    trial.set_user_attr(STARTED_ATTR, trial.number)


def _retry_callback(retries: int):
    """Optuna's callback that queues a failed trial again (renamed in Optuna 4.9)."""
    retry = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
             or optuna.storages.RetryFailedTrialCallback)
    return retry(max_retry=int(retries))


def _fail_trials_never_begun(study, grace_seconds: float, retries: int) -> None:
    """Fail running trials whose objective never began (their worker died between taking the
    trial and starting its heartbeat), and queue them again like heartbeat-stale ones."""
    if not is_heartbeat_enabled(study._storage):
        return  # one process: nothing runs that this process is not running
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        begun = trial.user_attrs.get(STARTED_ATTR) == trial.number
        if begun or trial.datetime_start is None or (now - trial.datetime_start).total_seconds() <= grace_seconds:
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # finished or failed by another process meanwhile
            continue
        failed = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        _retry_callback(retries)(study, failed)


def safe_url(url: str) -> str:
    """The storage URL without a password (it goes into reports)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
