"""What the bundle of a :class:`~qmri_labels.estimators.NetworkEstimator` records besides its
parameters and architecture, and the fitted estimator that a loaded bundle becomes again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from qmri_labels.data.preprocessing import from_manifest
from qmri_labels.estimators.network_design import network_from_config
from qmri_labels.fileio import to_jsonable
from qmri_labels.physics import get_model
from qmri_labels.provenance import package_versions

#: what a bundle records of the training data and of the training (fitted attributes ``<key>_``)
DATA_RECORD = ("train_fingerprint", "train_spec", "n_train", "n_val", "n_excluded", "mle_labels")
TRAINING_RECORD = ("best_epoch", "best_val_loss", "n_epochs", "fit_seconds", "seeds", "history")


def json_params(params: Mapping) -> dict:
    """A :class:`NetworkEstimator`'s ``get_params()`` as plain JSON types."""
    params = dict(params)
    if params["output_bounds"] is not None and not isinstance(params["output_bounds"], str):
        params["output_bounds"] = np.asarray(params["output_bounds"], float).tolist()
    if params["weights"] is not None:
        params["weights"] = dict(params["weights"])
    if params["mle_options"] is not None:
        params["mle_options"] = dict(params["mle_options"])
    for key in ("devices", "strategy", "precision"):
        if not isinstance(params[key], (str, int, float, bool, list, type(None))):
            params[key] = str(params[key])
    return params


def network_record(estimator, metrics: Mapping | None = None) -> dict:
    """What the bundle of a fitted ``estimator`` records besides its parameters and architecture.

    ``metrics`` replace the estimator's own ``metrics_`` when given.
    """
    record = {
        "method": estimator.method_name,
        "model": estimator.model_name_,
        "protocol": estimator.protocol_,
        "param_names": estimator.param_names_,
        "normalisation": estimator.normalisation_,
        "preprocessing": getattr(estimator, "preprocessing_", None) or from_manifest(None)[0].to_dict(),
        "loss_weights": estimator.loss_weights_,
        "data": {key: getattr(estimator, key + "_") for key in DATA_RECORD},
        "training": {key: getattr(estimator, key + "_") for key in TRAINING_RECORD},
        "device": estimator.device_,
        "determinism": {"deterministic": bool(estimator.deterministic), "precision": str(estimator.precision)},
        "versions": package_versions(),
        "metrics": dict(metrics or getattr(estimator, "metrics_", {}) or {}),
    }
    uncertainty = getattr(estimator, "uncertainty_", None)
    if uncertainty and (uncertainty["kind"] is not None or uncertainty["n_members"] > 1):
        record["uncertainty"] = dict(uncertainty)
    if getattr(estimator, "members_training_", None):
        record["training"]["members"] = estimator.members_training_
    if getattr(estimator, "tuning_", None) is not None:
        record["tuning"] = to_jsonable(estimator.tuning_)
    return record


def restore_fitted(estimator, state: Mapping, manifest: Mapping, path: str | Path) -> None:
    """Give an unfitted ``estimator`` the network and fitted attributes of a loaded bundle.

    Parameters
    ----------
    estimator : NetworkEstimator
        Built from the bundle's ``params``.
    state : mapping of str to Tensor
        The bundle's weights.
    manifest : mapping
        The bundle's manifest in the one layout.
    path : path-like
        The bundle folder (for messages).
    """
    try:
        network = network_from_config(manifest["network"])
        network.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: bundle manifest/weights do not describe a network ({exc})") from exc
    estimator.network_ = network.eval()
    estimator.model_name_ = manifest["model"]
    estimator.protocol_ = list(manifest["protocol"])
    estimator.param_names_ = list(manifest["param_names"])
    estimator.normalisation_ = manifest["normalisation"]
    estimator.loss_weights_ = manifest["loss_weights"]
    data, training = manifest.get("data", {}), manifest.get("training", {})
    for key in DATA_RECORD:
        setattr(estimator, key + "_", data.get(key))
    for key in TRAINING_RECORD:
        setattr(estimator, key + "_", training.get(key, [] if key == "history" else None))
    if "uncertainty" in manifest:
        estimator.uncertainty_ = dict(manifest["uncertainty"])
    if "members" in training:
        estimator.members_training_ = list(training["members"])
    estimator.device_ = manifest.get("device")
    estimator.metrics_ = manifest.get("metrics", {})
    estimator.manifest_ = dict(manifest)
    estimator.preprocessing_ = from_manifest(manifest)[0].to_dict()
    if "tuning" in manifest:
        estimator.tuning_ = manifest["tuning"]
    if get_model(estimator.model_name_).param_names != tuple(estimator.param_names_):
        raise ValueError(f"{path}: parameter names {estimator.param_names_} do not match model "
                         f"{estimator.model_name_!r}")
