"""How a :class:`~qmri_labels.estimators.NetworkEstimator` trains: its training rows from a
dataset or from arrays, and one Lightning run of one network (quiet, seeded, and leaving the
caller's global torch state as it found it).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from qmri_labels.data.datasets import Dataset
from qmri_labels.estimators.base import as_signals
from qmri_labels.physics import get_model
from qmri_labels.training import InMemoryDataModule, LabelLoss, LabelRegressor, LRSchedule, parameter_weights
from qmri_labels.training.likelihood_losses import HeteroscedasticLabelLoss, VarianceHeadLoss
from qmri_labels.threads import torch_threads
from qmri_labels.training.targets import array_targets, arrays_fingerprint, dataset_targets
from qmri_labels.training.trainer import build_trainer


@dataclass
class TrainingData:
    """The rows a network trains on and what the bundle records about them."""

    tensors: dict
    signal_model: object
    protocol: np.ndarray
    support: np.ndarray
    noise: str
    mle_info: dict
    n_excluded: int
    record: dict
    #: the true parameters of the rows where known (a simulated dataset, or ``gt`` labels of
    #: arrays): what the reported SD is calibrated against
    truth: np.ndarray | None = None


def training_data(params: Mapping, weights: Mapping, X, y=None, *, protocol=None, bounds=None, model: str = "ivim",
                  sigma=None, mle_labels=None) -> TrainingData:
    """Training rows of :meth:`NetworkEstimator.fit` (see there for the arguments).

    Rows whose MLE label is not finite are left out.

    Parameters
    ----------
    params : mapping
        The estimator's ``get_params()``.
    weights : mapping
        The loss's term weights.
    X, y, protocol, bounds, model, sigma, mle_labels
        As :meth:`NetworkEstimator.fit`.

    Returns
    -------
    TrainingData
    """
    mle_options, progress = params["mle_options"], bool(params["progress"])
    if isinstance(X, Dataset):
        if protocol is not None or bounds is not None or sigma is not None:
            raise ValueError("protocol, bounds and sigma are taken from the dataset; pass them only with arrays")
        if y is not None and mle_labels is not None:
            raise ValueError("give the dataset's MLE labels once (y or mle_labels)")
        signal_model = X.model
        tensors, mle_info = dataset_targets(X, weights, y if mle_labels is None else mle_labels,
                                            mle_options=mle_options, progress=progress, label=params["label"],
                                            label_weights=params["weights"])
        support = X.prior_support
        record = {"train_fingerprint_": X.fingerprint, "train_spec_": X.spec.to_dict()}
        train_protocol = X.protocol
        noise = X.spec.noise
        truth = np.asarray(X.theta_true)
    else:
        if mle_labels is not None:
            raise ValueError("with array input, give MLE labels as y")
        signal_model = get_model(model)
        # the noise model of the self label's signal-space likelihood: the MLE labels' one
        noise = dict(mle_options or {}).get("noise", "rician")
        if protocol is None:
            raise ValueError("fit(X) with X an array, not a Dataset, needs protocol=... (b-values in s/mm^2, one "
                             "per column of X)")
        train_protocol = np.asarray(signal_model.validate_protocol(protocol), dtype=np.float64)
        signals, _ = as_signals(X, train_protocol.size)
        tensors, mle_info = array_targets(params["label"], weights, signals, y, signal_model, train_protocol, sigma,
                                          mle_options=mle_options, progress=progress,
                                          label_weights=params["weights"], seed=int(params["seed"]))
        # gt labels are the true parameters; with other labels alone the truth is unknown
        truth = np.asarray(tensors["theta"]) if "theta" in tensors else None
        support = signal_model.default_bounds if bounds is None else np.asarray(bounds, dtype=np.float64)
        if support.shape != (2, signal_model.n_params) or not np.all(np.isfinite(support)) or np.any(
                support[1] < support[0]):
            raise ValueError(f"bounds must be finite with shape (2, {signal_model.n_params}) and lower <= upper, "
                             f"got {np.asarray(support).tolist()}")
        record = {"train_fingerprint_": arrays_fingerprint(tensors),
                  "train_spec_": {"source": "arrays", "model": signal_model.name, "n": int(signals.shape[0]),
                                  "protocol": [float(b) for b in train_protocol],
                                  "bounds": np.asarray(support, float).tolist()}}

    n = tensors["signals"].shape[0]
    keep = np.ones(n, dtype=bool)
    if "mle" in tensors:
        keep &= np.all(np.isfinite(tensors["mle"]), axis=1)
        mle_info["n_excluded"] = int((~keep).sum())
    if not keep.all():
        if keep.sum() < 2:
            raise ValueError("fewer than 2 training rows have finite MLE labels")
        tensors = {k: v[keep] for k, v in tensors.items()}
        truth = None if truth is None else truth[keep]
    return TrainingData(tensors, signal_model, train_protocol, support, noise, mle_info, int((~keep).sum()), record,
                        truth)


def train_one(params: Mapping, network, tensors: dict, weights: Mapping, signal_model, protocol, normalisation,
              noise: str, split_seed: int, shuffle_seed: int, callbacks=()):
    """Train one network with Lightning.

    Parameters
    ----------
    params : mapping
        The estimator's ``get_params()`` (optimiser, batches, early stopping, devices, ...).
    network : nn.Module
        Trained in place.
    tensors : dict of ndarray
        The training rows (:attr:`TrainingData.tensors`).
    weights : mapping
        The loss's term weights.
    signal_model, protocol, normalisation, noise
        What the loss needs: the forward model, its protocol, the parameters' scale, and the
        noise model of a signal-space likelihood.
    split_seed, shuffle_seed : int
        Seeds of the train/validation split and of the batch order.
    callbacks : sequence of lightning callbacks

    Returns
    -------
    ``(module, trainer, keeper, datamodule)``
    """
    uncertainty = params["uncertainty"]
    param_weights = parameter_weights(params["label"], params["weights"], signal_model.param_names)
    if uncertainty == "heteroscedastic":
        loss = HeteroscedasticLabelLoss(weights, signal_model.name, protocol, normalisation, noise=noise)
    elif uncertainty == "variance_head":
        # the mean by the plain label loss, the log-variance by the likelihood at the detached
        # mean; the logged (monitored) loss is the plain one, so the same epoch is kept
        loss = VarianceHeadLoss(weights, signal_model.name, protocol, normalisation, noise=noise,
                                param_weights=param_weights)
    else:
        loss = LabelLoss(weights, signal_model.name, protocol, normalisation, param_weights=param_weights)
    batch_size = int(params["batch_size"])
    module = LabelRegressor(network, loss, lr=params["lr"], weight_decay=params["weight_decay"],
                            optimiser=params["optimiser"], step_batch_size=batch_size,
                            record_step_losses=bool(params["record_step_losses"]))
    data = InMemoryDataModule(tensors, batch_size=batch_size, val_fraction=float(params["val_fraction"]),
                              split_seed=split_seed, shuffle_seed=shuffle_seed,
                              batches_per_block=int(params["batches_per_block"]))
    monitor = "val_loss" if data.has_validation else "train_loss"
    schedules = []
    if params["lr_schedule"] is not None:
        schedules.append(LRSchedule(params["lr_schedule"], int(params["max_epochs"]), monitor=monitor,
                                    plateau_patience=max(int(params["patience"]) // 2, 1)))
    with quiet_lightning(True), deterministic_scope(), torch_threads(params["num_threads"]), \
            training_rng(shuffle_seed):
        trainer, keeper = build_trainer(
            max_epochs=int(params["max_epochs"]), has_validation=data.has_validation,
            patience=int(params["patience"]), min_delta=float(params["min_delta"]),
            accelerator=params["accelerator"], devices=params["devices"], num_nodes=params["num_nodes"],
            strategy=params["strategy"], precision=params["precision"], deterministic=params["deterministic"],
            benchmark=params["benchmark"], progress=bool(params["progress"]), callbacks=[*schedules, *callbacks])
        trainer.fit(module, datamodule=data)
    return module, trainer, keeper, data


@contextlib.contextmanager
def quiet_lightning(quiet: bool):
    """Silence Lightning's info logs and advice (device summary, tips, worker counts); the
    progress bar is separate and stays."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric",
                                                     "lightning_fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def training_rng(seed: int):
    """Seed the global torch RNG for the fit (dropout masks draw from it) and restore the
    caller's state afterwards: the same seeds give the same network whatever ran before."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def deterministic_scope():
    """Restore the global deterministic-algorithms flag that Lightning sets for the fit."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
