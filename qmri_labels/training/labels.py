"""Training labels and their losses.

Four label strategies share one loss, a weighted sum of three terms:

* ``gt``   -- MSE between predicted and true parameters;
* ``mle``  -- MSE between predicted parameters and MLE labels (fits of the noisy training
  signals);
* ``self`` -- MSE between the noisy input signals and the forward model of the prediction
  (self-supervised, needs no labels);
* ``hybrid`` -- ``alpha * L_mle + (1 - alpha) * L_gt``.

Parameter terms compare parameters on a normalised scale, ``(theta - lower) / (upper - lower)``
with the prior's support, so that S0, f, D and D* count equally whatever their units; the
normalisation is recorded with every trained network. Terms with weight zero are not
evaluated at all, so ``alpha = 0`` is exactly the ``gt`` loss and ``alpha = 1`` exactly the
``mle`` loss, and a ``gt`` network never needs MLE labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from qmri_labels.physics import get_model

LABELS = ("gt", "mle", "self", "hybrid", "weighted")
TERMS = ("gt", "mle", "self")


def resolve_weights(label: str, alpha: float | None = None, weights: Mapping[str, float] | None = None) -> dict:
    """Weights of the loss terms ``{"gt": w, "mle": w, "self": w}`` for a label strategy.

    Parameters
    ----------
    label : {"gt", "mle", "self", "hybrid", "weighted"}
    alpha : float in [0, 1]
        Weight of the MLE term for ``hybrid`` (the GT term gets ``1 - alpha``).
    weights : mapping
        For ``weighted``: any non-negative weights of ``gt``, ``mle`` and ``self``.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if label == "hybrid":
        if alpha is None:
            raise ValueError("label='hybrid' needs alpha in [0, 1]")
        alpha = float(alpha)
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        out = {"gt": 1.0 - alpha, "mle": alpha, "self": 0.0}
    elif label == "weighted":
        if not weights:
            raise ValueError("label='weighted' needs weights, e.g. {'gt': 0.5, 'mle': 0.3, 'self': 0.2}")
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {TERMS}")
        out = {t: float(weights.get(t, 0.0)) for t in TERMS}
        if any(not math.isfinite(w) or w < 0 for w in out.values()):
            raise ValueError(f"loss weights must be finite and >= 0, got {out}")
        if sum(out.values()) == 0:
            raise ValueError("at least one loss weight must be > 0")
    else:
        out = {t: float(t == label) for t in TERMS}
    return out


def method_name(label: str, alpha: float | None = None) -> str:
    """The name of a network in results tables: ``net-gt``, ``net-hybrid-0.5``, ..."""
    if label == "hybrid":
        return f"net-hybrid-{float(alpha):g}"
    return f"net-{label}"


@dataclass(frozen=True)
class ParameterNormalisation:
    """Affine map of parameters onto the unit scale: ``(theta - lower) / scale``.

    Built from a prior's support ``(2, P)`` so that each parameter's loss counts equally.
    """

    lower: tuple
    scale: tuple
    param_names: tuple
    source: str = "prior_support"

    @classmethod
    def from_support(cls, support, param_names, source: str = "prior_support") -> "ParameterNormalisation":
        support = np.asarray(support, dtype=np.float64)
        if support.shape != (2, len(param_names)):
            raise ValueError(f"support must have shape (2, {len(param_names)}), got {support.shape}")
        if not np.all(np.isfinite(support)):
            raise ValueError(f"support must be finite, got {support.tolist()}")
        scale = support[1] - support[0]
        if np.any(scale < 0):
            raise ValueError(f"support must have lower <= upper, got {support.tolist()}")
        # a fixed parameter (zero range) would divide by zero: use its magnitude instead
        fixed = scale == 0
        scale[fixed] = np.maximum(np.abs(support[1, fixed]), 1.0)
        return cls(tuple(float(v) for v in support[0]), tuple(float(v) for v in scale), tuple(param_names), source)

    def to_dict(self) -> dict:
        return {"lower": list(self.lower), "scale": list(self.scale), "param_names": list(self.param_names),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ParameterNormalisation":
        return cls(tuple(d["lower"]), tuple(d["scale"]), tuple(d["param_names"]), d.get("source", "prior_support"))


def parameter_mse(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared error of parameters divided by ``scale`` (mean over voxels and parameters).

    The shift of the normalisation cancels in the difference, so only the scale enters.
    """
    return (((pred - target) / scale) ** 2).mean()


def self_supervised_mse(pred_params: torch.Tensor, signals: torch.Tensor, forward, protocol: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the signals and ``forward(pred_params, protocol)``."""
    return ((forward(pred_params, protocol) - signals) ** 2).mean()


def term_weights(weights: Mapping[str, float]) -> tuple[dict, tuple]:
    """``({term: weight} for every term, the terms with a non-zero weight)``; refuses unknown
    terms and all-zero weights."""
    unknown = set(weights) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}")
    full = {t: float(weights.get(t, 0.0)) for t in TERMS}
    active = tuple(t for t in TERMS if full[t] != 0.0)
    if not active:
        raise ValueError("every loss weight is zero")
    return full, active


class LabelLoss(nn.Module):
    """Weighted sum of the ``gt``, ``mle`` and ``self`` terms.

    Parameters
    ----------
    weights : mapping
        Output of :func:`resolve_weights`.
    model : str
        Signal model of the self-supervised term.
    protocol : array-like (M,)
    normalisation : ParameterNormalisation

    ``forward(pred, batch)`` takes predicted parameters ``(B, P)`` and a batch dict with
    ``signals`` and, where their weight is > 0, ``theta`` (true parameters) and ``mle``
    (MLE labels); it returns the total loss and a dict of the evaluated terms.
    """

    def __init__(self, weights: Mapping[str, float], model: str, protocol, normalisation: ParameterNormalisation):
        super().__init__()
        self.weights, self.active = term_weights(weights)
        self.model_name = model
        self._forward = get_model(model).forward
        self.register_buffer("protocol", torch.as_tensor(np.asarray(protocol, dtype=np.float32)))
        self.register_buffer("lower", torch.tensor(normalisation.lower, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(normalisation.scale, dtype=torch.float32))
        self.normalisation = normalisation

    @property
    def needs(self) -> tuple[str, ...]:
        """Batch keys the active terms read (besides ``signals``)."""
        return tuple({"gt": "theta", "mle": "mle"}[t] for t in self.active if t != "self")

    def forward(self, pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        terms = {}
        for term in self.active:
            if term == "gt":
                terms[term] = parameter_mse(pred, batch["theta"], self.scale)
            elif term == "mle":
                terms[term] = parameter_mse(pred, batch["mle"], self.scale)
            else:
                terms[term] = self_supervised_mse(pred, batch["signals"], self._forward, self.protocol)
        total = None
        for term, value in terms.items():
            weighted = value if self.weights[term] == 1.0 else self.weights[term] * value
            total = weighted if total is None else total + weighted
        return total, terms
