"""How signals are prepared for a voxel-wise network: one definition for training and inference.

A network learns the signal scale of its training data. Real data come in arbitrary intensity
units, so before a network sees them they must be brought to the scale it was trained on, and
its S0 estimate taken back to the data's units. How that is done is part of the network: it is
recorded in the bundle manifest under ``"preprocessing"`` (:meth:`SignalPreprocessing.to_dict`)
and read back by :func:`from_manifest`; the mapping code applies exactly that.

Kinds
-----
``global_scale`` (what the shipped IVIM networks were trained with)
    The network saw *unnormalised* signals: S0 drawn from the prior (e.g. U(0.8, 1.2)), a noisy
    b = 0 sample, noise of the training SNR. At inference the whole volume is divided by ONE
    number, ``median over the mask of the lowest-b signal / reference``, where ``reference`` is
    the same median over the training signals; per-voxel S0 variation and b = 0 noise are left
    as they were in training. Predicted S0 is multiplied back by that number.
``per_voxel_lowest_b``
    For networks trained on signals divided voxel by voxel by their mean lowest-b sample (the
    division applied the same way in training and inference); S0 is multiplied back per voxel.

Bundles written before this entry existed carry no ``preprocessing``; they were all trained on
unnormalised signals of scale ``train_spec.s0_reference`` (default 1), so they get
``global_scale`` with that reference (:data:`LEGACY_NOTE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

KINDS = ("global_scale", "per_voxel_lowest_b")
LEGACY_NOTE = ("bundle without a 'preprocessing' entry: trained on unnormalised signals of scale "
               "train_spec.s0_reference, so global_scale with that reference")


@dataclass(frozen=True)
class SignalPreprocessing:
    """The transformation between measured signals and what a network sees.

    Parameters
    ----------
    kind : {"global_scale", "per_voxel_lowest_b"}
    reference : float
        ``global_scale``: the median lowest-b signal of the training data.
    """

    kind: str = "global_scale"
    reference: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"preprocessing kind must be one of {KINDS}, got {self.kind!r}")
        if not (np.isfinite(self.reference) and self.reference > 0):
            raise ValueError(f"preprocessing reference must be finite and > 0, got {self.reference!r}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "reference": float(self.reference)}

    @classmethod
    def from_dict(cls, entry: Mapping) -> "SignalPreprocessing":
        unknown = set(entry) - {"kind", "reference"}
        if unknown:
            raise ValueError(f"preprocessing entry has unknown keys {sorted(unknown)}")
        return cls(kind=str(entry.get("kind", "global_scale")), reference=float(entry.get("reference", 1.0)))

    def scale(self, lowest_b_signal) -> np.ndarray | float:
        """The divisor for signals whose mean lowest-b samples are ``lowest_b_signal``.

        ``global_scale``: one number for the whole set (pass every voxel to be mapped);
        ``per_voxel_lowest_b``: one per voxel (NaN where the lowest-b signal is not positive).
        """
        values = np.asarray(lowest_b_signal, dtype=np.float64)
        if self.kind == "global_scale":
            usable = values[np.isfinite(values) & (values > 0)]
            if usable.size == 0:
                raise ValueError("no voxel has a positive signal at the lowest b-value; cannot scale the data")
            return float(np.median(usable)) / self.reference
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(values) & (values > 0), values, np.nan)

    def apply(self, signals, scale) -> np.ndarray:
        """``signals (n, M) / scale`` as float32."""
        scale = np.asarray(scale, dtype=np.float64)
        divisor = scale[..., None] if scale.ndim else scale
        return (np.asarray(signals, dtype=np.float64) / divisor).astype(np.float32)

    def restore(self, params, param_names, scale) -> np.ndarray:
        """Predicted parameters in the data's units: S0 multiplied by ``scale``."""
        params = np.array(params, dtype=np.float32, copy=True)
        if "S0" in param_names:
            params[..., list(param_names).index("S0")] *= np.asarray(scale, dtype=np.float32)
        return params


def lowest_b_mean(signals, protocol) -> np.ndarray:
    """Mean of each voxel's samples at the lowest b-value, shape ``signals.shape[:-1]``."""
    protocol = np.asarray(protocol, dtype=np.float64).ravel()
    columns = np.flatnonzero(protocol == protocol.min())
    return np.asarray(signals, dtype=np.float64)[..., columns].mean(axis=-1)


def for_training_signals(signals, protocol) -> SignalPreprocessing:
    """The ``global_scale`` preprocessing of a training set: its own median lowest-b signal is
    the reference, so applying it to the training data divides by exactly 1."""
    values = lowest_b_mean(signals, protocol)
    usable = values[np.isfinite(values) & (values > 0)]
    reference = float(np.median(usable)) if usable.size else 1.0
    return SignalPreprocessing("global_scale", reference)


def from_manifest(manifest: Mapping | None) -> tuple[SignalPreprocessing, str]:
    """The preprocessing a bundle declares, and where it came from (``"manifest"`` or the
    legacy rule :data:`LEGACY_NOTE`)."""
    manifest = manifest or {}
    entry = manifest.get("preprocessing")
    if entry is not None:
        return SignalPreprocessing.from_dict(entry), "manifest"
    spec = (manifest.get("data") or {}).get("train_spec") or {}
    return SignalPreprocessing("global_scale", float(spec.get("s0_reference", 1.0) or 1.0)), LEGACY_NOTE
