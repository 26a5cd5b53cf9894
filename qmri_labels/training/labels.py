"""Training labels and their losses.

The label strategies share one loss, a weighted sum of terms:

* ``gt``   -- MSE between predicted and true parameters;
* ``mle``  -- MSE between predicted parameters and MLE labels (fits of the noisy training
  signals);
* ``mle_approx`` -- the ``mle`` loss on MLE labels fitted with the Gaussian likelihood
  whatever the data's noise (Epstein et al.'s code: the approximation most MLE labels in the
  literature make on Rician magnitude data);
* ``self`` -- MSE between the noisy input signals and the forward model of the prediction
  (self-supervised, needs no labels);
* ``hybrid`` -- ``alpha * L_mle + (1 - alpha) * L_gt``;
* ``weighted`` -- any non-negative weights of ``gt``, ``mle`` and ``self``;
* ``bias_reduced`` -- Mao, Flassbeck and Asslaender (arXiv 2312.11468): each ground-truth
  signal comes with several noise draws in every batch; the loss is the squared distance of
  the mean estimate over the draws to the truth (term ``bias``) plus ``lambda`` times the
  variance of the estimates over the draws (term ``variance``). ``lambda = 1`` gives back the
  ``gt`` loss on the draws (squared bias plus variance is the mean squared error); smaller
  values favour an unbiased network.

Parameter terms compare parameters on a normalised scale, ``(theta - lower) / (upper - lower)``
with the prior's support, so that S0, f, D and D* count equally whatever their units; the
normalisation is recorded with every trained network. A label's parameter terms may weigh the
parameters unequally (:func:`parameter_weights`, e.g. ``label="mle", weights={"Dstar": 4}``:
an MLE-label network weighted toward D*, as in Epstein et al.'s code). Terms with weight zero
are not evaluated at all, so ``alpha = 0`` is exactly the ``gt`` loss and ``alpha = 1`` exactly
the ``mle`` loss, and a ``gt`` network never needs MLE labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from qmri_labels.physics import get_model

LABELS = ("gt", "mle", "self", "hybrid", "weighted", "mle_approx", "bias_reduced")
#: the terms of the ``weighted`` label (and of every label but ``bias_reduced``)
CLASSIC_TERMS = ("gt", "mle", "self")
TERMS = CLASSIC_TERMS + ("bias", "variance")
#: ``bias_reduced``'s settings when its ``weights`` leave them out: lambda of the variance term
#: and noise draws per ground-truth signal
BIAS_REDUCED_DEFAULTS = {"variance": 0.1, "draws": 8}
#: the likelihood of the MLE labels of ``mle_approx``
MLE_APPROX_NOISE = "gaussian"
#: labels a study trains by name alone (``hybrid`` comes from its alphas, ``weighted`` needs
#: term weights)
STUDY_LABELS = ("gt", "mle", "self", "mle_approx", "bias_reduced")


def uses_shared_mle_labels(label: str, alpha: float | None = None, weights: Mapping[str, float] | None = None
                           ) -> bool:
    """Whether the label trains on MLE labels of the data's own likelihood, those a study fits
    once and hands to every such network (``mle_approx`` fits its own, Gaussian ones)."""
    return label != "mle_approx" and resolve_weights(label, alpha, weights)["mle"] > 0


def bias_reduced_settings(weights: Mapping[str, float] | None) -> dict:
    """``{"variance": lambda, "draws": K}`` of a ``bias_reduced`` label from its ``weights``
    (other keys, parameter names, are its parameter weights); defaults
    :data:`BIAS_REDUCED_DEFAULTS`."""
    weights = dict(weights or {})
    lam = float(weights.get("variance", BIAS_REDUCED_DEFAULTS["variance"]))
    draws = weights.get("draws", BIAS_REDUCED_DEFAULTS["draws"])
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"bias_reduced: the variance weight (lambda) must be finite and >= 0, got {lam}")
    if int(draws) != draws or int(draws) < 2:
        raise ValueError(f"bias_reduced: draws (noise draws per signal) must be an integer >= 2, got {draws!r}")
    return {"variance": lam, "draws": int(draws)}


def noise_draw_count(label: str, weights: Mapping[str, float] | None = None) -> int | None:
    """Noise draws per ground-truth signal the label trains on (``bias_reduced``), else None."""
    return bias_reduced_settings(weights)["draws"] if label == "bias_reduced" else None


def label_mle_options(label: str, mle_options: Mapping | None) -> dict | None:
    """The MLE-label settings of ``label``: ``mle_approx`` fits with the Gaussian likelihood
    (a different ``noise`` in ``mle_options`` is refused); other labels keep ``mle_options``."""
    if label != "mle_approx":
        return None if mle_options is None else dict(mle_options)
    options = dict(mle_options or {})
    if options.get("noise", MLE_APPROX_NOISE) != MLE_APPROX_NOISE:
        raise ValueError(f"label 'mle_approx' fits its MLE labels with the {MLE_APPROX_NOISE} likelihood; "
                         f"mle_options asks for noise={options['noise']!r} (use label='mle' for that)")
    options["noise"] = MLE_APPROX_NOISE
    return options


def parameter_weights(label: str, weights: Mapping[str, float] | None, param_names) -> tuple | None:
    """Weights of the parameters in a label's parameter terms, in ``param_names`` order, scaled
    to mean 1 (so the loss keeps its size); None when all are equal (the plain loss).

    For ``gt``, ``mle``, ``mle_approx`` and ``hybrid`` the keys of ``weights`` are parameter
    names (missing ones weigh 1); for ``bias_reduced`` the keys besides ``variance`` and
    ``draws``. ``weighted`` (term weights) and ``self`` (no parameter term) take none.
    """
    if not weights or label == "weighted":
        return None
    given = {k: v for k, v in weights.items() if not (label == "bias_reduced" and k in BIAS_REDUCED_DEFAULTS)}
    if not given:
        return None
    if label == "self":
        raise ValueError("label 'self' has no parameter term to weight; drop weights")
    unknown = set(given) - set(param_names)
    if unknown:
        raise ValueError(f"weights of label {label!r} name parameters; unknown: {sorted(unknown)}; "
                         f"the model's parameters: {tuple(param_names)}")
    values = np.array([float(given.get(name, 1.0)) for name in param_names])
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() == 0:
        raise ValueError(f"parameter weights must be finite, >= 0 and not all zero, got {dict(given)}")
    if np.all(values == values[0]):
        return None
    return tuple(float(v) for v in values / values.mean())


def resolve_weights(label: str, alpha: float | None = None, weights: Mapping[str, float] | None = None) -> dict:
    """Weights of the loss terms ``{"gt": w, "mle": w, "self": w}`` for a label strategy.

    Parameters
    ----------
    label : {"gt", "mle", "self", "hybrid", "weighted", "mle_approx", "bias_reduced"}
    alpha : float in [0, 1]
        Weight of the MLE term for ``hybrid`` (the GT term gets ``1 - alpha``).
    weights : mapping
        For ``weighted``: any non-negative weights of ``gt``, ``mle`` and ``self``. For
        ``bias_reduced``: ``variance`` (lambda) and ``draws`` (see :func:`bias_reduced_settings`).
        For the other labels: parameter weights (:func:`parameter_weights`), not loss terms.

    Returns
    -------
    dict
        ``{"gt", "mle", "self"}`` weights; ``bias_reduced`` adds ``bias`` (1) and ``variance``.
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
        unknown = set(weights) - set(CLASSIC_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {CLASSIC_TERMS}")
        out = {t: float(weights.get(t, 0.0)) for t in CLASSIC_TERMS}
        if any(not math.isfinite(w) or w < 0 for w in out.values()):
            raise ValueError(f"loss weights must be finite and >= 0, got {out}")
        if sum(out.values()) == 0:
            raise ValueError("at least one loss weight must be > 0")
    elif label == "bias_reduced":
        out = {"gt": 0.0, "mle": 0.0, "self": 0.0, "bias": 1.0,
               "variance": bias_reduced_settings(weights)["variance"]}
    elif label == "mle_approx":
        out = {"gt": 0.0, "mle": 1.0, "self": 0.0}
    else:
        out = {t: float(t == label) for t in CLASSIC_TERMS}
    return out


def method_name(label: str, alpha: float | None = None, weights: Mapping[str, float] | None = None) -> str:
    """The name of a network in results tables: ``net-gt``, ``net-hybrid-0.5``, ...; parameter
    weights and non-default ``bias_reduced`` settings are appended (``net-mle-Dstar4``,
    ``net-bias_reduced-variance0.5``), so that differently weighted networks keep apart."""
    name = f"net-hybrid-{float(alpha):g}" if label == "hybrid" else f"net-{label}"
    if weights and label not in ("weighted", "self"):
        extra = [f"{k}{float(v):g}" for k, v in sorted(weights.items())
                 if not (label == "bias_reduced" and BIAS_REDUCED_DEFAULTS.get(k) == v)]
        name = "-".join([name, *extra])
    return name


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


def parameter_mse(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of parameters divided by ``scale`` (mean over voxels and parameters),
    each parameter's error times its weight when ``weights`` (P,) are given.

    The shift of the normalisation cancels in the difference, so only the scale enters.
    """
    squared = ((pred - target) / scale) ** 2
    return (squared if weights is None else squared * weights).mean()


def bias_and_variance(pred_draws: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                      weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of ``bias_reduced`` for estimates ``(B, K, P)`` of K noise draws of each
    of B signals with truths ``(B, P)``: the mean over signals and parameters of the squared
    distance of the mean estimate to the truth, and of the variance over the draws (both on
    the normalised scale, each parameter times its weight).

    Parameters
    ----------
    pred_draws : Tensor (B, K, P)
    target : Tensor (B, P)
    scale : Tensor (P,)
    weights : Tensor (P,) or None

    Returns
    -------
    bias, variance : Tensor (0-d)
    """
    normalised = pred_draws / scale
    mean = normalised.mean(1)
    bias = (mean - target / scale) ** 2
    variance = ((normalised - mean[:, None]) ** 2).mean(1)
    if weights is not None:
        bias, variance = bias * weights, variance * weights
    return bias.mean(), variance.mean()


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

    param_weights : sequence (P,) or None
        Weights of the parameters in the parameter terms (:func:`parameter_weights`).

    ``forward(pred, batch)`` takes predicted parameters ``(B, P)`` and a batch dict with
    ``signals`` and, where their weight is > 0, ``theta`` (true parameters) and ``mle``
    (MLE labels); it returns the total loss and a dict of the evaluated terms. With the
    ``bias`` and ``variance`` terms (``bias_reduced``) ``pred`` holds the estimates of the
    batch's noise draws ``(B, K, P)`` (``batch["draws"]``, see
    :func:`qmri_labels.training.module.LabelRegressor`).
    """

    def __init__(self, weights: Mapping[str, float], model: str, protocol, normalisation: ParameterNormalisation,
                 param_weights=None):
        super().__init__()
        self.weights, self.active = term_weights(weights)
        draws_terms = {"bias", "variance"} & set(self.active)
        if draws_terms and ("bias" not in draws_terms or set(self.active) - {"bias", "variance"}):
            raise ValueError(f"the variance term goes with the bias term, and the two with no other (label "
                             f"'bias_reduced'); got weights {self.weights}")
        self.model_name = model
        self._forward = get_model(model).forward
        self.register_buffer("protocol", torch.as_tensor(np.asarray(protocol, dtype=np.float32)))
        self.register_buffer("lower", torch.tensor(normalisation.lower, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(normalisation.scale, dtype=torch.float32))
        self.param_weights = None if param_weights is None else tuple(float(w) for w in param_weights)
        if self.param_weights is not None:
            if len(self.param_weights) != len(normalisation.scale):
                raise ValueError(f"param_weights must have one weight per parameter ({len(normalisation.scale)}), "
                                 f"got {len(self.param_weights)}")
            self.register_buffer("parameter_weights", torch.tensor(self.param_weights, dtype=torch.float32))
        else:
            self.parameter_weights = None
        self.normalisation = normalisation

    @property
    def needs(self) -> tuple[str, ...]:
        """Batch keys the active terms read (besides ``signals``)."""
        keys = {"gt": ("theta",), "mle": ("mle",), "self": (), "bias": ("theta", "draws"), "variance": ("draws",)}
        return tuple(dict.fromkeys(k for t in self.active for k in keys[t]))

    def forward(self, pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        terms = {}
        if "bias" in self.active:
            terms["bias"], variance = bias_and_variance(pred, batch["theta"], self.scale, self.parameter_weights)
            if "variance" in self.active:
                terms["variance"] = variance
        for term in self.active:
            if term == "gt":
                terms[term] = parameter_mse(pred, batch["theta"], self.scale, self.parameter_weights)
            elif term == "mle":
                terms[term] = parameter_mse(pred, batch["mle"], self.scale, self.parameter_weights)
            elif term == "self":
                terms[term] = self_supervised_mse(pred, batch["signals"], self._forward, self.protocol)
        total = None
        for term, value in terms.items():
            weighted = value if self.weights[term] == 1.0 else self.weights[term] * value
            total = weighted if total is None else total + weighted
        return total, terms
