"""Likelihood losses of heteroscedastic networks (mean and log-variance outputs).

* **Parameter labels** (``gt``, ``mle``, ``hybrid``): the Gaussian negative log-likelihood of the
  label under ``N(mean, (scale * exp(log_var / 2))^2)``, on the normalised scale of
  :class:`~qmri_labels.training.ParameterNormalisation`. The learned variance is then the
  expected squared error *to that label*: with GT labels it estimates the error to the truth
  (bias towards the training mean included, as far as the network can predict it from the
  signal); with MLE labels the error to the MLE, which is not the error to the truth (it adds
  the MLE's own variance and misses the shared bias). A hybrid loss
  ``alpha NLL(mle) + (1 - alpha) NLL(gt)`` with one variance learns the weighted mean of the two
  squared errors. These are claims to *measure* with :mod:`qmri_labels.analysis.calibration`,
  not to assume.
* **Self-supervised label**: no parameter target exists. The network predicts parameters and
  one log-variance of the *signal noise* per voxel; the loss is the Gaussian or Rician NLL of
  the measured signals given the forward model of the prediction and that noise level
  (:func:`signal_space_nll`). Its uncertainty means: the Cramer-Rao (Fisher) SD of an efficient
  estimator at the predicted parameters, given the noise level the network infers for that
  voxel (:func:`signal_space_sd`), i.e. the spread an MLE would have there, not the network's
  own error; the network's own error is seen by an ensemble's spread.

:class:`HeteroscedasticLabelLoss` trains the mean by these likelihoods too, which reweights the
voxels (an error counts less where the predicted variance is large) and so changes the point
estimates. :class:`VarianceHeadLoss` trains the mean by the plain label loss alone and the
variance branch by the same likelihood at the *detached* mean (a post-hoc variance head trained
jointly): the point estimates are those of the plain network, bit for bit with the same seeds.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from qmri_labels.fitting.fisher import fisher_information, information_to_variance
from qmri_labels.fitting.likelihood import NOISE_MODELS, rician_nll_terms
from qmri_labels.physics import get_model
from qmri_labels.training.labels import LabelLoss, ParameterNormalisation, term_weights


def gaussian_nll(pred: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean over voxels and parameters of ``0.5 (log_var + ((pred - target) / scale)^2 exp(-log_var))``.

    The constant ``0.5 log(2 pi)`` is left out. Minimised over ``log_var`` at the squared
    normalised error, so a calibrated network's ``exp(log_var)`` is its mean squared error.
    """
    z2 = ((pred - target) / scale) ** 2
    return 0.5 * (log_var + z2 * torch.exp(-log_var)).mean()


def signal_space_nll(pred_params: torch.Tensor, log_noise_var: torch.Tensor, signals: torch.Tensor, forward,
                     protocol: torch.Tensor, noise: str = "gaussian") -> torch.Tensor:
    """Mean over voxels and measurements of the NLL of the signals given the predicted
    parameters and a per-voxel noise level ``sigma = exp(log_noise_var / 2)`` (``(B, 1)``).

    Gaussian: ``0.5 log sigma^2 + (m - A)^2 / (2 sigma^2)``; Rician: the magnitude NLL of
    :func:`~qmri_labels.fitting.likelihood.rician_nll_terms` plus ``log sigma^2`` (the
    parameter-free ``-log m`` left out). Constants are left out.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
    if log_noise_var.shape[-1] != 1:
        raise ValueError(f"log_noise_var must have one value per voxel (shape (B, 1)), got {tuple(log_noise_var.shape)}")
    model_signals = forward(pred_params, protocol)
    if noise == "gaussian":
        terms = 0.5 * log_noise_var + 0.5 * (signals - model_signals) ** 2 * torch.exp(-log_noise_var)
    else:
        sigma = torch.exp(0.5 * log_noise_var)
        terms = rician_nll_terms(signals, model_signals, sigma) + log_noise_var
    return terms.mean()


def signal_space_sd(model, params: np.ndarray, protocol, log_noise_var: np.ndarray, noise: str = "gaussian") -> np.ndarray:
    """Parameter SDs ``(N, P)`` of a self-supervised heteroscedastic network: the Fisher
    (Cramer-Rao) SD at the predicted parameters with the predicted noise level; ``inf`` for
    a parameter that is not identifiable there (D* when f = 0)."""
    params = np.asarray(params, dtype=np.float64)
    sigma = np.exp(0.5 * np.asarray(log_noise_var, dtype=np.float64).reshape(params.shape[:-1]))
    variance, _ = information_to_variance(fisher_information(model, params, protocol, sigma, noise))
    return np.sqrt(variance)


class HeteroscedasticLabelLoss(nn.Module):
    """Likelihood counterpart of :class:`~qmri_labels.training.LabelLoss` for a network whose
    output is ``(mean, log_var)`` (:class:`~qmri_labels.nets.heteroscedastic.HeteroscedasticNet`).

    Parameters
    ----------
    weights : mapping
        Output of :func:`~qmri_labels.training.resolve_weights`. Parameter terms (``gt``,
        ``mle``) and the signal term (``self``) need different variance heads (``P`` and 1
        log-variances), so they cannot be mixed.
    model : str
    protocol : array-like (M,)
    normalisation : ParameterNormalisation
    noise : {"gaussian", "rician"}
        Noise model of the ``self`` term.
    variance_head : bool
        Used for a variance head at the detached mean (:class:`VarianceHeadLoss`): then the
        ``bias_reduced`` terms are allowed, and the head learns the squared error of each
        draw's estimate to the truth (as for ``gt``); the likelihood cannot train the mean of a
        bias-reduced network itself.

    ``forward((mean, log_var), batch)`` returns the total loss and a dict of the terms.
    """

    def __init__(self, weights: Mapping[str, float], model: str, protocol, normalisation: ParameterNormalisation,
                 noise: str = "gaussian", variance_head: bool = False):
        super().__init__()
        self.weights, self.active = term_weights(weights)
        if {"bias", "variance"} & set(self.active) and not variance_head:
            raise ValueError("the bias-reduced loss (label 'bias_reduced') has no likelihood counterpart that "
                             "trains the mean: use uncertainty='variance_head' or None, or n_members")
        if "self" in self.active and len(self.active) > 1:
            raise ValueError("a heteroscedastic loss cannot mix the self-supervised (signal-noise variance) term with "
                             f"parameter terms; got weights {self.weights}")
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        self.noise = noise
        self.n_variances = 1 if "self" in self.active else get_model(model).n_params
        self._forward = get_model(model).forward
        self.register_buffer("protocol", torch.as_tensor(np.asarray(protocol, dtype=np.float32)))
        self.register_buffer("scale", torch.tensor(normalisation.scale, dtype=torch.float32))

    def forward(self, output, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if not (isinstance(output, tuple) and len(output) == 2):
            raise ValueError("a heteroscedastic loss needs the network output (mean, log_var)")
        pred, log_var = output
        if log_var.shape[-1] != self.n_variances:
            raise ValueError(f"the loss needs {self.n_variances} log-variance(s) per voxel, the network gives "
                             f"{log_var.shape[-1]}")
        terms = {}
        for term in self.active:
            if term == "self":
                terms[term] = signal_space_nll(pred, log_var, batch["signals"], self._forward, self.protocol, self.noise)
            elif term == "bias":  # estimates of every noise draw (B, K, P) against the truth
                terms[term] = gaussian_nll(pred, log_var, batch["theta"][:, None], self.scale)
            elif term != "variance":  # the bias term's likelihood covers the draws' spread too
                terms[term] = gaussian_nll(pred, log_var, batch["theta" if term == "gt" else "mle"], self.scale)
        total = sum(self.weights[t] * v for t, v in terms.items())
        return total, terms


class VarianceHeadLoss(nn.Module):
    """The plain label loss for the mean and the likelihood for the variance branch only.

    For ``output = (mean, log_var)`` the mean is trained by exactly
    :class:`~qmri_labels.training.LabelLoss` and the log-variance by
    :class:`HeteroscedasticLabelLoss` evaluated at ``mean.detach()`` (parameter labels: the
    Gaussian NLL of the label; ``self``: the signal-space NLL of the measured signals given the
    detached prediction, so the branch learns the noise level around the plain network's fit).
    No gradient of the likelihood reaches the mean network, none of the label loss the
    variance branch.

    Parameters are those of :class:`HeteroscedasticLabelLoss`, and ``param_weights`` those of
    :class:`~qmri_labels.training.LabelLoss` (the mean's loss).

    ``forward((mean, log_var), batch)`` returns ``(total, terms)``: ``total``'s *value* is the
    plain label loss, so that logging, early stopping, the best epoch and learning-rate
    schedules see exactly the plain network's numbers, and its *gradient* is that of the plain
    loss plus that of the likelihood (added as ``nll - nll.detach()``, which is 0 in value);
    ``terms`` holds the plain terms and ``variance_nll``.
    """

    def __init__(self, weights: Mapping[str, float], model: str, protocol, normalisation: ParameterNormalisation,
                 noise: str = "gaussian", param_weights=None):
        super().__init__()
        self.likelihood = HeteroscedasticLabelLoss(weights, model, protocol, normalisation, noise=noise,
                                                   variance_head=True)
        self.label_loss = LabelLoss(weights, model, protocol, normalisation, param_weights=param_weights)
        self.weights = self.likelihood.weights
        self.n_variances = self.likelihood.n_variances
        # the logged terms: the plain ones (as a plain network logs them) and the head's NLL
        self.active = tuple(self.label_loss.active) + ("variance_nll",)

    def forward(self, output, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if not (isinstance(output, tuple) and len(output) == 2):
            raise ValueError("a variance-head loss needs the network output (mean, log_var)")
        pred, log_var = output
        plain, terms = self.label_loss(pred, batch)
        nll, _ = self.likelihood((pred.detach(), log_var), batch)
        terms = dict(terms)
        terms["variance_nll"] = nll.detach()
        # value: exactly the plain loss (x - x == 0); gradient: plain + likelihood
        return plain + (nll - nll.detach()), terms
