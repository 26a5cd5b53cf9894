"""Which estimator maps a scan: ``"mle"``, an estimator object, or a network bundle by name or
folder; a network's protocol matched to the scan's."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class _Resolved:
    kind: str  # "mle" or "network"
    model_name: str
    description: str
    noise: str = "rician"
    bounds: Any = None
    network: Any = None
    order: np.ndarray | None = None
    preprocessing: Any = None
    info: dict = field(default_factory=dict)


def find_bundle(name: str | os.PathLike) -> Path:
    """A bundle folder from a path, or from the name of a shipped network (``models_dir()``)."""
    from qmri_labels.paths import models_dir

    candidate = Path(name)
    if candidate.exists():
        if not candidate.is_dir():
            raise ValueError(f"estimator {name}: a network bundle is a folder (weights + manifest.json)")
        return candidate
    text = str(name)
    if "/" not in text and os.sep not in text:
        shipped = models_dir() / text
        if shipped.is_dir():
            return shipped
        available = sorted(p.name for p in models_dir().glob("*") if (p / "manifest.json").exists()) \
            if models_dir().is_dir() else []
        raise ValueError(f"estimator {text}: not 'mle', not a folder, and not a network in {models_dir()} "
                         f"(available: {', '.join(available) or 'none'})")
    raise ValueError(f"estimator {text}: folder not found")


def load_network(bundle: Path):
    """A voxel-wise network from a bundle; a bundle of another kind or a damaged one is refused."""
    from qmri_labels.estimators.bundle import read_manifest
    from qmri_labels.estimators import ESTIMATOR_KIND, NetworkEstimator

    try:
        kind = read_manifest(bundle).get("kind")
    except ValueError:
        kind = None  # the loader reports the damage
    if kind is not None and kind != ESTIMATOR_KIND:
        raise ValueError(f"estimator {bundle}: is a model bundle of kind {kind!r}, not a voxel-wise (diffusion) "
                         "network")
    try:
        return NetworkEstimator.load(bundle)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        raise ValueError(f"estimator {bundle}: corrupt or tampered model bundle ({exc})") from None


def match_protocol(network_protocol, bvalues, name: str = "network") -> np.ndarray:
    """Column order that puts the data's volumes into the network's protocol order."""
    protocol = np.asarray(network_protocol, dtype=np.float64).ravel()
    bvals = np.asarray(bvalues, dtype=np.float64).ravel()

    def fmt(b):
        return "[" + ", ".join(f"{v:g}" for v in b) + "]"

    mismatch = ValueError(
        f"{name} was trained for the protocol b = {fmt(protocol)} s/mm^2 ({protocol.size} values); the data have "
        f"b = {fmt(bvals)} ({bvals.size} values). Use the MLE, or train a network for this protocol "
        "(see docs/guide.md)")
    if protocol.size != bvals.size:
        raise mismatch
    tol = 1e-3 * max(1.0, float(np.abs(protocol).max()))
    if np.all(np.abs(protocol - bvals) <= tol):
        return np.arange(bvals.size)
    order_data = np.argsort(bvals, kind="stable")
    order_net = np.argsort(protocol, kind="stable")
    if np.all(np.abs(np.sort(protocol) - bvals[order_data]) <= tol):
        order = np.empty_like(order_net)
        order[order_net] = order_data
        return order
    raise mismatch


def resolve_estimator(estimator, bvalues, model: str | None = None, noise: str = "rician") -> _Resolved:
    """What :func:`fit_volume` needs to know about ``estimator`` (see there)."""
    from qmri_labels.data.preprocessing import SignalPreprocessing, from_manifest
    from qmri_labels.estimators import MLEEstimator, NetworkEstimator

    if isinstance(estimator, str) and estimator == "mle":
        return _Resolved("mle", model or "ivim", f"MLE ({noise} likelihood)", noise=noise,
                         info={"kind": "mle", "name": "mle", "noise": noise})
    if isinstance(estimator, MLEEstimator):
        if model is not None and model != estimator.model_name:
            raise ValueError(f"the MLEEstimator fits {estimator.model_name}, but model={model!r}")
        return _Resolved("mle", estimator.model_name, f"MLE ({estimator.noise} likelihood)", noise=estimator.noise,
                         bounds=estimator.bounds, info={"kind": "mle", "name": "mle", "noise": estimator.noise,
                                                        "bounds": estimator.bounds})
    bundle = None
    if isinstance(estimator, (str, os.PathLike)):
        if str(estimator) in ("tkd", "tikhonov"):
            raise ValueError(f"estimator {estimator} is a QSM inversion; diffusion data take 'mle' or a network")
        bundle = find_bundle(estimator)
        estimator = load_network(bundle)
    if not isinstance(estimator, NetworkEstimator):
        raise TypeError(f"estimator must be 'mle', an MLEEstimator, a NetworkEstimator or a bundle name/folder, "
                        f"got {type(estimator).__name__}")
    net_model = estimator.model_name
    if model is not None and net_model != model:
        raise ValueError(f"the network fits the {net_model} model, but model={model!r}")
    name = bundle.name if bundle is not None else "network"
    order = match_protocol(estimator.protocol, bvalues, name=f"network {name}")
    manifest = getattr(estimator, "manifest_", None)
    entry = getattr(estimator, "preprocessing_", None)
    if manifest is None and entry is not None:
        preprocessing, source = SignalPreprocessing.from_dict(entry), "estimator"
    else:
        preprocessing, source = from_manifest(manifest)
    info = {"kind": "network", "name": name, "method": getattr(estimator, "method_name", None),
            "protocol": [float(b) for b in estimator.protocol],
            "preprocessing": {**preprocessing.to_dict(), "source": source}}
    if bundle is not None:
        from qmri_labels.data.io import sha256_file

        info["bundle"] = str(bundle)
        info["bundle_sha256"] = sha256_file(bundle / "manifest.json")
    return _Resolved("network", net_model, f"network {name}", network=estimator, order=order,
                     preprocessing=preprocessing, info=info)
