"""Per-label hyperparameter search behind one call: :func:`tune`.

A label can win or lose a comparison for reasons that are not the label's: the network
design, the optimiser settings, the seed. Following Oh et al. (2021) -- retune when the data
change, pick by a validation loss -- every label gets the same search (the same space, the
same number of trials, the same data split, the same sampler seed) over the design space of
:class:`~qmri_labels.estimators.NetworkEstimator`.

The search runs on a validation split of the *training* data, never on an evaluation grid.
Each trial is scored by two criteria, both recorded:

* ``"val_loss"``: the label's own loss on the validation rows (GT loss for ``gt``, MLE-label
  loss for ``mle``, signal loss for ``self``). It needs no ground truth beyond what the label
  itself uses, so it is what a user with in vivo data can do for ``self``.
* ``"param_rmse"``: the RMSE of the estimated parameters against the simulated truth on the
  validation rows, each divided by its prior range and averaged over the tissue parameters
  (what published designs were tuned on).

``criterion`` picks the one that is minimised. By default the untuned design is the first
trial, so the tuned network is never worse than it on the criterion, and the report can show
both.

The search is :mod:`qmri_labels.search.engine`'s: TPE with trial-seeded draws, so that with
``storage`` (an Optuna database URL) processes on several machines share one search and find
what one process alone would (``tests/search/test_tuning.py``).

With ``criterion="val_loss"`` the search also *prunes* (Optuna's median rule): after each epoch
a trial reports the best label loss so far on its training run's own validation rows, and a
trial whose value is worse than the median of the earlier trials at the same epoch stops
there. The first :data:`PRUNE_STARTUP_TRIALS` trials (the default design among them) and the
first :data:`PRUNE_WARMUP_EPOCHS` epochs of every trial are never pruned. A pruned trial counts
as one of the ``n_trials`` (every label gets the same trials and the same rule) and cannot be
the best one. Pruning is off for ``"param_rmse"``: the label's loss does not track the
parameter error (for ``self`` least of all), so it would cut the trials that criterion wants.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import numpy as np
import optuna
import torch
from lightning.pytorch.callbacks import Callback

from qmri_labels.data.datasets import Dataset
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.search.engine import finished_trials, open_study, run_trials, safe_url, search_index
from qmri_labels.search.space import check_space, contains, suggest
from qmri_labels.training import (
    LabelLoss,
    ParameterNormalisation,
    compute_mle_labels,
    label_mle_options,
    noise_draw_count,
    parameter_weights,
    resolve_weights,
)
from qmri_labels.training.targets import DRAWS_SEED_STREAM, noise_draws
from qmri_labels.threads import torch_threads

CRITERIA = ("val_loss", "param_rmse")
#: trials that are never pruned (they set the median), and epochs of every trial before pruning
PRUNE_STARTUP_TRIALS = 5
PRUNE_WARMUP_EPOCHS = 10

#: The search space (:mod:`qmri_labels.search.space`'s format). ``width_factor`` multiplies the
#: number of measurements (the hidden width); every other name is a NetworkEstimator keyword.
DEFAULT_SPACE: dict[str, Any] = {
    "parallel": [False, True],
    "hidden_layers": {"low": 1, "high": 4},
    "width_factor": [1, 2, 4],
    "activation": ["elu", "relu", "gelu"],
    "batch_norm": [False, True],
    "dropout": [0.0, 0.05, 0.1],
    "bounds_margin": [0.0, 0.1, 0.3],
    # None: the model's (fitter's) bounds; "prior": the training prior's support
    "output_bounds": [None, "prior"],
    "lr": {"low": 1e-4, "high": 3e-3, "log": True},
    "batch_size": [64, 128, 256, 512],
    "weight_decay": [0.0, 1e-6, 1e-5, 1e-4],
    "lr_schedule": [None, "plateau", "cosine"],
}
#: NetworkEstimator keywords that tune sets itself (never searched)
FIXED = ("label", "alpha", "weights", "seed", "warm_start")


def _check_space(space: Mapping) -> dict:
    searchable = [n for n in NetworkEstimator._param_names() if n not in FIXED] + ["width_factor"]
    out = check_space(space, searchable)
    if "width" in out and "width_factor" in out:
        raise ValueError("search space has both width and width_factor; keep one")
    return out


def _estimator_params(params: Mapping, n_measurements: int) -> dict:
    """Trial parameters as NetworkEstimator keywords (``width_factor`` -> ``width``)."""
    params = dict(params)
    factor = params.pop("width_factor", None)
    if factor is not None:
        params["width"] = None if int(factor) == 1 else int(factor) * int(n_measurements)
    return params


def _default_trial(base: NetworkEstimator, space: Mapping, n_measurements: int) -> dict | None:
    """The untuned design as a point of the space, or None where the space cannot express it."""
    point = {}
    for name, spec in space.items():
        if name == "width_factor":
            value = 1 if base.width is None else int(base.width) / n_measurements
        else:
            value = getattr(base, name)
        if isinstance(value, np.ndarray) or not contains(spec, value):
            return None
        point[name] = int(value) if name == "width_factor" else value
    return point


def resolve_prune(prune, criterion: str, name: str = "prune") -> bool:
    """Whether a search with ``criterion`` prunes.

    Parameters
    ----------
    prune : bool or None
        None: prune with ``"val_loss"`` only; ValueError for anything else and for True with
        another criterion.
    criterion : str
    name : str
        The setting's name in the error (e.g. ``"tune.prune"`` of a study).

    Returns
    -------
    bool
    """
    if prune not in (None, True, False):
        raise ValueError(f"{name} must be True, False or None, got {prune!r}")
    if prune and criterion != "val_loss":
        raise ValueError(f"{name}=True needs criterion 'val_loss': trials report the label's validation loss, "
                         f"which does not track {criterion!r}")
    return criterion == "val_loss" if prune is None else bool(prune)


class PruneTrial(Callback):
    """Reports the best validation loss so far to an Optuna ``trial`` after each epoch and stops
    training once the search's pruner says so (``pruned`` is then True)."""

    def __init__(self, trial):
        self.trial = trial
        self.best = math.inf
        self.pruned = False

    def on_validation_end(self, trainer, pl_module):
        score = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or score is None:
            return
        self.best = min(self.best, float(score))
        self.trial.report(self.best, step=int(trainer.current_epoch))
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


def validation_criteria(estimator: NetworkEstimator, signals, targets: Mapping, theta_true, support,
                        model, protocol) -> dict:
    """Both criteria of a fitted estimator on validation rows.

    Parameters
    ----------
    estimator : NetworkEstimator
        Fitted.
    signals : ndarray (N, M)
    targets : mapping
        What the label's loss reads: ``theta`` and/or ``mle``, (N, P) each, and for the
        bias-reduced loss ``draws``, (N, K, M) noise draws of each signal.
    theta_true : ndarray (N, P) or None
        The simulated truth (None for data without one: ``param_rmse`` is then NaN).
    support : ndarray (2, P)
        The prior's support (the normalisation of both criteria).
    model : SignalModel
    protocol : array
        The b-values (or other protocol) of ``signals``.

    Returns
    -------
    dict
        ``val_loss`` and ``param_rmse``.
    """
    pred = estimator.predict(signals, signal_scale=1.0)  # validation rows, at the training scale
    normalisation = ParameterNormalisation.from_support(support, model.param_names)
    loss = LabelLoss(estimator.loss_weights_, model.name, protocol, normalisation,
                     param_weights=parameter_weights(estimator.label, estimator.weights, model.param_names))
    keep = np.ones(len(signals), dtype=bool)
    for value in targets.values():
        keep &= np.all(np.isfinite(value.reshape(len(value), -1)), axis=1)
    batch = {"signals": torch.as_tensor(signals[keep], dtype=torch.float32),
             **{k: torch.as_tensor(v[keep], dtype=torch.float32) for k, v in targets.items()}}
    # the bias-reduced loss scores the estimates of every noise draw of each signal
    scored = estimator.predict(targets["draws"][keep], signal_scale=1.0) if "draws" in targets else pred[keep]
    with torch.no_grad():
        val_loss, _ = loss(torch.as_tensor(scored), batch)
    out = {"val_loss": float(val_loss), "param_rmse": float("nan")}
    if theta_true is not None:
        scale = np.asarray(normalisation.scale)
        err = (pred.astype(np.float64) - theta_true.astype(np.float64)) / scale
        tissue = [i for i in range(len(model.param_names)) if i != model.scale_index]
        out["param_rmse"] = float(np.mean(np.sqrt(np.nanmean(err[:, tissue] ** 2, axis=0))))
    return out


def tune(label: str, dataset: Dataset, n_trials: int = 20, seed: int = 0, criterion: str = "val_loss",
         alpha: float = 0.5, base: Mapping[str, Any] | None = None, space: Mapping | None = None,
         validation_fraction: float = 0.2, include_default: bool = True, mle_labels=None,
         mle_options: Mapping | None = None, max_rows: int | None = None,
         prune: bool | None = None, refit: bool = True, storage: str | None = None,
         study_name: str | None = None, heartbeat_seconds: int = 60,
         failed_trial_retries: int = 1) -> NetworkEstimator:
    """Search the network design for one training label; return the best trial's network.

    Parameters
    ----------
    label : {"gt", "mle", "self", "hybrid", "mle_approx", "bias_reduced"}
    dataset : Dataset
        Training data. ``validation_fraction`` of its rows (drawn with ``seed``) score the
        trials; the rest train them. The evaluation grid is never seen.
    n_trials : int
        Trials of the search (give every label the same number: equal budget).
    seed : int
        Seeds the split, the search's trial-seeded TPE sampler and every trial's network.
    criterion : {"val_loss", "param_rmse"}
        Minimised criterion (both are recorded for every trial; see the module docstring).
    alpha : float
        MLE weight of ``hybrid``.
    base : mapping or None
        NetworkEstimator keywords of the untuned design (e.g. ``max_epochs``, device options);
        the search varies the keys of ``space`` around it.
    space : mapping or None
        Search space (:mod:`qmri_labels.search.space`; :data:`DEFAULT_SPACE` when None).
    validation_fraction : float in (0, 1)
    include_default : bool
        Make the untuned design (``base``) the first trial where the space can express it.
    mle_labels : ndarray (N, P), MLELabels or None
        MLE labels of ``dataset`` (computed and cached when the label needs them).
    mle_options : mapping or None
        Settings of computed MLE labels.
    max_rows : int or None
        Use only this many rows of the training data (a random subset drawn with ``seed``)
        for the search: a cheaper search at equal budget per label.
    prune : bool or None
        Stop trials that fall behind (see the module docstring); ``None``: prune with
        ``criterion="val_loss"``, not with ``"param_rmse"`` (where ``True`` is refused).
    refit : bool
        Trials leave out a ``uncertainty="variance_head"`` of ``base``: the head is trained at
        the detached mean, so the point estimates, and with them both criteria, are those of
        the plain network bit for bit, at about 2/3 of the cost. ``refit=True`` trains the best
        design again with the head (the same mean network); ``False`` returns the best trial's
        network as searched (its ``uncertainty`` is then None), for callers that only need
        ``tuning_["best_params"]``.
    storage : str or None
        Optuna database URL shared with other processes running the same search (e.g.
        ``sqlite:///runs/tune.db``, ``postgresql://user@host/db``); None: the search lives in
        this process. Each process runs trials until ``n_trials`` are taken, waits for the
        others' and returns the same best design (trained here again if another process ran it).
    study_name : str or None
        Name of the search in ``storage`` (None: made from the label, the data and the seed).
    heartbeat_seconds, failed_trial_retries : int
        With ``storage``: a trial's heartbeat interval, and how often a trial of a killed
        process is run again (:func:`qmri_labels.search.engine.open_study`).

    Returns
    -------
    NetworkEstimator
        Fitted (on the training rows of the split) with the best trial's design;
        ``tuning_`` records the criterion, the split, the default trial and every trial's
        parameters and both criteria.
    """
    if not isinstance(dataset, Dataset):
        raise ValueError(f"tune expects a qmri_labels Dataset, got {type(dataset).__name__}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if int(n_trials) != n_trials or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if not (0.0 < float(validation_fraction) < 1.0):
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    if not isinstance(refit, bool):
        raise ValueError(f"refit must be True or False, got {refit!r}")
    prune = resolve_prune(prune, criterion)
    space = _check_space(DEFAULT_SPACE if space is None else space)
    base = dict(base or {})
    fixed = {"label", "alpha", "seed"} & set(base)
    if fixed:
        raise ValueError(f"base must not set {sorted(fixed)}: tune sets them")
    base_estimator = NetworkEstimator(label=label, alpha=alpha, seed=int(seed), **base)
    trial_params = base_estimator.get_params()
    # the variance head cannot change a trial's score (see ``refit``): trials train without it
    headless = trial_params["uncertainty"] == "variance_head"
    if headless:
        trial_params["uncertainty"] = None
    weights = resolve_weights(label, alpha, base.get("weights"))

    model = dataset.model
    n, m = dataset.signals.shape
    order = np.random.default_rng(int(seed)).permutation(n)
    if max_rows is not None:
        if int(max_rows) != max_rows or max_rows < 2:
            raise ValueError(f"max_rows must be an integer >= 2, got {max_rows!r}")
        order = order[: int(max_rows)]
    n = len(order)
    n_val = max(int(round(n * float(validation_fraction))), 1)
    val_rows, fit_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(fit_rows) < 2:
        raise ValueError(f"dataset of {n} rows is too small for a validation fraction of {validation_fraction}")
    labels = {}
    if weights["gt"] > 0 or weights.get("bias", 0) > 0:
        labels["gt"] = dataset.theta_true
    if weights["mle"] > 0:
        if mle_labels is None:
            mle_labels = compute_mle_labels(dataset, progress=False,
                                            **label_mle_options(label, mle_options or base.get("mle_options") or {}))
        labels["mle"] = np.asarray(getattr(mle_labels, "params", mle_labels), dtype=np.float32)
        if labels["mle"].shape != dataset.theta_true.shape:
            raise ValueError(f"mle_labels must have shape {dataset.theta_true.shape}, got {labels['mle'].shape}")
    y_fit = None
    if labels:
        y_fit = ({k: v[fit_rows] for k, v in labels.items()} if len(labels) > 1
                 else next(iter(labels.values()))[fit_rows])
    val_targets = {{"gt": "theta", "mle": "mle"}[k]: v[val_rows] for k, v in labels.items()}
    # bias_reduced: noise draws around each true signal, the training's own (from the fit's
    # seed) and the validation rows' (from the tuning seed); the fit needs the noise level
    fit_sigma = dataset.sigma[fit_rows] if weights.get("bias", 0) > 0 else None
    if fit_sigma is not None:
        val_targets["draws"] = noise_draws(dataset.signals[val_rows], dataset.theta_true[val_rows],
                                           dataset.sigma[val_rows], dataset.protocol, model, dataset.spec.noise,
                                           noise_draw_count(label, base.get("weights")),
                                           seed=[int(seed), DRAWS_SEED_STREAM])
    support = dataset.prior_support

    def fit(params, callbacks=()):
        estimator = NetworkEstimator(**{**trial_params, **params})
        estimator.fit(dataset.signals[fit_rows], y_fit, protocol=dataset.protocol, bounds=support,
                      model=model.name, sigma=fit_sigma, callbacks=list(callbacks))
        return estimator

    # the best trial run in this process, (value, search index, estimator): another one's is trained again
    local: dict[str, Any] = {"key": (math.inf, math.inf), "estimator": None}

    def objective(trial):
        params = _estimator_params(suggest(trial, space), m)
        pruner = PruneTrial(trial) if prune else None
        t0 = time.perf_counter()
        estimator = None
        try:
            estimator = fit(params, [pruner] if pruner else [])
            # scored at the training's thread count: the same bytes in any process (study workers)
            with torch_threads(estimator.num_threads):
                scores = validation_criteria(estimator, dataset.signals[val_rows], val_targets,
                                             dataset.theta_true[val_rows], support, model, dataset.protocol)
        except (ValueError, RuntimeError) as exc:  # a diverged or impossible design scores +inf
            scores = {"val_loss": math.inf, "param_rmse": math.inf, "error": str(exc)}
        pruned = bool(pruner is not None and pruner.pruned)
        for key, value in {**scores, "seconds": time.perf_counter() - t0, "pruned": pruned,
                           "epochs": getattr(estimator, "n_epochs_", None)}.items():
            trial.set_user_attr(key, value)
        if pruned:
            raise optuna.TrialPruned()
        value = scores[criterion] if math.isfinite(scores[criterion]) else math.inf
        key = (value, search_index(trial.study, trial))
        if value < math.inf and key < local["key"]:
            local.update(key=key, estimator=estimator)
        return value

    default_point = _default_trial(base_estimator, space, m) if include_default else None
    if storage is not None and study_name is None:
        study_name = f"tune-{label}{alpha if label == 'hybrid' else ''}-{dataset.fingerprint[:12]}-s{int(seed)}"
    signature = {"label": label, "alpha": alpha if label == "hybrid" else None, "criterion": criterion,
                 "seed": int(seed), "space": space, "default": default_point, "prune": prune,
                 "dataset_fingerprint": dataset.fingerprint, "validation_fraction": float(validation_fraction),
                 "max_rows": max_rows, "network": {k: v for k, v in trial_params.items() if k != "progress"}}
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = open_study(storage, study_name, int(seed), heartbeat_seconds, failed_trial_retries, signature,
                           algorithm="tpe", first=default_point,
                           median_pruning=(PRUNE_STARTUP_TRIALS, PRUNE_WARMUP_EPOCHS) if prune else None)
        run_trials(study, objective, int(n_trials), finish=True, poll_seconds=min(5.0, float(heartbeat_seconds)),
                   grace_seconds=2 * int(heartbeat_seconds), retries=int(failed_trial_retries))
    finally:
        optuna.logging.set_verbosity(previous)
    finished = finished_trials(study, int(n_trials))
    records = [{"number": index, "params": _estimator_params({k: t.params[k] for k in space}, m),
                "val_loss": t.user_attrs["val_loss"], "param_rmse": t.user_attrs["param_rmse"],
                "seconds": t.user_attrs["seconds"], "epochs": t.user_attrs["epochs"],
                "pruned": t.state == optuna.trial.TrialState.PRUNED} for index, t in finished]
    scored = [(t.value, index, record) for (index, t), record in zip(finished, records)
              if t.state == optuna.trial.TrialState.COMPLETE and t.value < math.inf]
    if not scored:
        errors = [t.user_attrs.get("error") for _, t in finished if t.user_attrs.get("error")]
        raise ValueError(f"every one of the {n_trials} trials for label {label!r} failed; first error: "
                         f"{errors[0] if errors else '?'}")
    best_value, best_index, best_record = min(scored, key=lambda row: row[:2])
    best_params = best_record["params"]
    if headless and refit:
        estimator = NetworkEstimator(**{**base_estimator.get_params(), **best_params})
        estimator.fit(dataset.signals[fit_rows], y_fit, protocol=dataset.protocol, bounds=support, model=model.name,
                      sigma=fit_sigma)
    elif local["key"] == (best_value, best_index):
        estimator = local["estimator"]
    else:  # another process ran the best trial: the same training gives the same network
        estimator = fit(best_params)
    estimator.tuning_ = {
        "label": label, "alpha": alpha if label == "hybrid" else None, "criterion": criterion,
        "n_trials": int(n_trials), "seed": int(seed), "prune": prune, "trials_without_variance_head": headless,
        "n_pruned": int(sum(r["pruned"] for r in records)), "space": space,
        "base": {k: v for k, v in base.items()},
        "split": {"n_fit": int(len(fit_rows)), "n_validation": int(len(val_rows)),
                  "validation_fraction": float(validation_fraction), "dataset_fingerprint": dataset.fingerprint,
                  "max_rows": None if max_rows is None else int(max_rows)},
        "best_params": best_params, "best_value": best_value, "best_scores": best_record,
        "default": records[0] if default_point is not None and records and records[0]["number"] == 0 else None,
        "trials": records,
    }
    if storage is not None:
        estimator.tuning_["storage"] = {"url": safe_url(storage), "study_name": study_name}
    return estimator
