"""Which estimator maps a scan, and how the scan's voxels reach it.

:func:`resolve_estimator` turns what the user named (``"mle"``, a shipped network's name, a
bundle folder, or any estimator object) into an :class:`EstimatorPlan`. The plan reads only
the estimator contract, never the estimator's type:

* ``protocol``: the b-values the estimator expects. An estimator trained for one (a network)
  gets the scan's volumes put into that order (:func:`match_protocol`) and needs every one of
  them; one without a protocol of its own (``None``: the MLE) fits the scan's, and a voxel
  with unusable samples is fitted on the rest. Such an estimator gets the b-values and the
  noise level through ``set_params(protocol=..., sigma=...)`` on a :func:`clone`, so the
  caller's object is never changed.
* ``manifest_`` / ``preprocessing_``: an estimator trained on signals of some scale declares
  how data are brought to it (:mod:`qmri_labels.data.preprocessing`) and applies that itself:
  its ``predict`` takes the scan's signals with ``signal_scale=`` (the divisor computed over
  the whole mask, so chunks agree) and returns S0 in the scan's units. One that declares none
  sees the signals in the scan's own units.
* ``describe()``: what the maps' sidecars and manifest record about the estimator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qmri_labels.data.io import sha256_file
from qmri_labels.data.preprocessing import SignalPreprocessing, from_manifest
from qmri_labels.estimators import ESTIMATOR_KIND, MLEEstimator, NetworkEstimator, clone, read_manifest
from qmri_labels.estimators.shipped import find_bundle

#: what an object needs to map a scan (``predict(signals, device=..., return_sd=...)`` among them)
CONTRACT = ("predict", "model_name", "param_names", "protocol", "reports_sd")


@dataclass
class EstimatorPlan:
    """How the voxels of one scan reach one estimator.

    Attributes
    ----------
    estimator : object
        The estimator (its contract: :data:`CONTRACT`).
    record : dict
        What the maps record about it (``Maps.estimator``).
    order : ndarray (M,) of int or None
        Columns of the scan in the estimator's protocol order; ``None`` for an estimator that
        fits the scan's own protocol.
    preprocessing : SignalPreprocessing or None
        How signals are scaled for the estimator (and its S0 scaled back); ``None``: not at all.
    magnitude : bool
        The estimator reads magnitude signals, so a negative sample is unusable.
    """

    estimator: Any
    record: dict
    order: np.ndarray | None = None
    preprocessing: SignalPreprocessing | None = None
    magnitude: bool = True

    @property
    def fits_scan_protocol(self) -> bool:
        """The estimator fits the scan's own b-values (and takes its noise level)."""
        return self.order is None

    @property
    def label(self) -> str:
        """The estimator in a message: ``"network ivim_epstein_snr30_mle"``, ``"mle"``."""
        kind, name = self.record.get("kind"), self.record.get("name")
        return str(name) if kind == name or kind is None else f"{kind} {name}"

    def for_measurements(self, bvalues, sigma):
        """The estimator for voxels measured at ``bvalues`` with noise level ``sigma`` (a number
        or one per voxel): a configured copy where it fits the scan's protocol, else itself."""
        if not self.fits_scan_protocol:
            return self.estimator
        return clone(self.estimator).set_params(protocol=bvalues, sigma=sigma)


def load_network(bundle: Path):
    """A voxel-wise network from a bundle; a bundle of another kind or a damaged one is refused."""
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


def resolve_estimator(estimator, bvalues, model: str | None = None, noise: str = "rician") -> EstimatorPlan:
    """The plan by which :func:`~qmri_labels.maps.fit_volume` maps a scan with ``estimator``.

    Parameters
    ----------
    estimator : "mle", str or path-like, or an estimator object
        ``"mle"`` (an :class:`~qmri_labels.estimators.MLEEstimator` of ``model`` and
        ``noise``), a shipped network's name or a bundle folder, or any object with
        :data:`CONTRACT`.
    bvalues : array_like (M,)
        The scan's b-values (s/mm^2).
    model : str, optional
        The model the maps must be of; checked against the estimator's.
    noise : {"rician", "gaussian"}
        The likelihood of ``"mle"``.

    Returns
    -------
    EstimatorPlan
    """
    bundle = None
    if isinstance(estimator, str) and estimator == "mle":
        estimator = MLEEstimator(model=model or "ivim", noise=noise)
    elif isinstance(estimator, (str, os.PathLike)):
        if str(estimator) in ("tkd", "tikhonov"):
            raise ValueError(f"estimator {estimator} is a QSM inversion; diffusion data take 'mle' or a network")
        bundle = find_bundle(estimator)
        estimator = load_network(bundle)
    missing = [name for name in CONTRACT if not hasattr(estimator, name)]
    if missing:
        raise TypeError(f"estimator must be 'mle', a network's name or bundle folder, or an estimator with "
                        f"{', '.join(CONTRACT)}; got {type(estimator).__name__} (no {', '.join(missing)})")
    describe = getattr(estimator, "describe", None)
    record = dict(describe()) if callable(describe) else {"kind": "estimator", "name": type(estimator).__name__}
    if bundle is not None:
        record["name"] = bundle.name
    plan = EstimatorPlan(estimator, record, magnitude=getattr(estimator, "noise", "rician") != "gaussian")
    if model is not None and estimator.model_name != model:
        raise ValueError(f"the {plan.label} fits the {estimator.model_name} model, but model={model!r}")
    if estimator.protocol is not None:
        plan.order = match_protocol(estimator.protocol, bvalues, name=plan.label)
    plan.preprocessing, source = declared_preprocessing(estimator)
    if plan.preprocessing is not None:
        record["preprocessing"] = {**plan.preprocessing.to_dict(), "source": source}
    if bundle is not None:
        record["bundle"] = str(bundle)
        record["bundle_sha256"] = sha256_file(bundle / "manifest.json")
    return plan


def declared_preprocessing(estimator) -> tuple[SignalPreprocessing | None, str | None]:
    """How signals are brought to the scale ``estimator`` was trained on, and where that is
    recorded: its bundle manifest (``manifest_``, with the legacy rule for bundles that predate
    the entry) or its own ``preprocessing_``; ``(None, None)`` for an estimator that declares
    neither (it reads signals in the scan's units)."""
    manifest = getattr(estimator, "manifest_", None)
    entry = getattr(estimator, "preprocessing_", None)
    if manifest is None and entry is None:
        return None, None
    if manifest is None:
        return SignalPreprocessing.from_dict(entry), "estimator"
    return from_manifest(manifest)
