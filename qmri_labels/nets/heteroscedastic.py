"""Heteroscedastic output: a network that predicts its own error variance next to its estimate.

:class:`HeteroscedasticNet` wraps any network that maps signals ``(..., M)`` to parameters
``(..., P)`` (the *mean* network, e.g. :class:`~qmri_labels.nets.MLP`) and adds a *variance*
branch, a small MLP on the same signals, that outputs log-variances. The mean network is used
unchanged, so its output mapping (bounds) and its weights can come from a plain trained network.

Two kinds of variance, chosen by ``n_variances``:

* ``n_variances = P``: the log-variance of each parameter's error on the normalised scale
  ``(theta - target) / scale`` (``scale``: the prior's range, as in the training losses), so that
  ``sd = scale * exp(log_var / 2)`` in the parameter's units. Trained with the Gaussian NLL of a
  parameter label (GT, MLE or hybrid; :func:`qmri_labels.training.likelihood_losses.gaussian_nll`).
* ``n_variances = 1``: the log-variance of the *signal* noise per voxel (signal units), for the
  self-supervised label, which has no parameter target (see
  :mod:`qmri_labels.training.likelihood_losses`).

``kind`` says how the two branches were trained, and travels with the bundle's network config:
``"heteroscedastic"`` (the mean by the NLL too, so its point estimates differ from a plain
network's) or ``"variance_head"`` (the mean by the plain label loss alone, the variance branch
by the NLL at the detached mean; see
:class:`qmri_labels.training.likelihood_losses.VarianceHeadLoss`). The forward pass is the same.

The log-variance is softly kept in ``[log_var_min, log_var_max]`` (smooth, never exactly flat)
so that the NLL cannot diverge on a perfectly fitted batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qmri_labels.nets.mlp import MLP

#: Training kinds of a mean-plus-log-variance network (``config["kind"]``).
VARIANCE_KINDS = ("heteroscedastic", "variance_head")


class HeteroscedasticNet(nn.Module):
    """Mean network plus log-variance branch: ``forward(signals) -> (mean, log_var)``.

    Parameters
    ----------
    mean_network : nn.Module
        Maps signals ``(..., n_inputs)`` to parameters ``(..., n_outputs)``.
    n_inputs : int
        Measurements per voxel.
    n_variances : int
        Log-variances per voxel: the number of parameters, or 1 for a signal-noise variance.
    scale : array-like (n_variances,) or None
        Unit of each variance: ``sd = scale * exp(log_var / 2)``; ``None``: 1.
    hidden_layers, width, activation
        Of the variance branch (an :class:`~qmri_labels.nets.MLP` with identity output); the
        branch standardises its inputs like the mean network when that has ``input_shift`` and
        ``input_scale`` buffers.
    log_var_min, log_var_max : float
        Soft bounds of the log-variance.
    variance_network : nn.Module or None
        A ready variance branch instead of the default MLP (its output: ``n_variances`` raw
        values per voxel).
    kind : {"heteroscedastic", "variance_head"}
        How the net is trained (recorded in :attr:`config`; see the module docstring).
    """

    def __init__(self, mean_network: nn.Module, n_inputs: int, n_variances: int, scale=None, hidden_layers: int = 2,
                 width: int | None = None, activation: str = "elu", log_var_min: float = -18.0,
                 log_var_max: float = 6.0, variance_network: nn.Module | None = None,
                 kind: str = "heteroscedastic"):
        super().__init__()
        if kind not in VARIANCE_KINDS:
            raise ValueError(f"kind must be one of {VARIANCE_KINDS}, got {kind!r}")
        if int(n_variances) < 1:
            raise ValueError(f"n_variances must be >= 1, got {n_variances}")
        if not log_var_min < log_var_max:
            raise ValueError(f"log_var_min must be below log_var_max, got {log_var_min}, {log_var_max}")
        scale = np.ones(int(n_variances)) if scale is None else np.asarray(scale, dtype=np.float64)
        if scale.shape != (int(n_variances),) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"scale must hold {n_variances} finite values > 0, got {scale.tolist()}")
        self.mean_network = mean_network
        if variance_network is None:
            shift = getattr(mean_network, "input_shift", None)
            in_scale = getattr(mean_network, "input_scale", None)
            variance_network = MLP(int(n_inputs), int(n_variances), hidden_layers=hidden_layers, width=width,
                                   activation=activation, output="identity",
                                   input_shift=None if shift is None else shift.detach().cpu().numpy(),
                                   input_scale=None if in_scale is None else in_scale.detach().cpu().numpy())
        self.variance_network = variance_network
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.log_var_min, self.log_var_max = float(log_var_min), float(log_var_max)
        self.config = {
            "kind": kind,
            "mean": dict(getattr(mean_network, "config", {}) or {}),
            "variance": dict(getattr(variance_network, "config", {}) or {}),
            "n_inputs": int(n_inputs),
            "n_variances": int(n_variances),
            "scale": scale.tolist(),
            "log_var_min": self.log_var_min,
            "log_var_max": self.log_var_max,
        }

    def bounded_log_var(self, raw: torch.Tensor) -> torch.Tensor:
        """Soft clamp of raw outputs into ``[log_var_min, log_var_max]`` (identity in between)."""
        low = self.log_var_min + F.softplus(raw - self.log_var_min)
        return self.log_var_max - F.softplus(self.log_var_max - low)

    def forward(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (..., P), log_var (..., n_variances))``."""
        return self.mean_network(signals), self.bounded_log_var(self.variance_network(signals))

    def sd(self, log_var: torch.Tensor) -> torch.Tensor:
        """Standard deviation in the variance's units: ``scale * exp(log_var / 2)``."""
        return self.scale * torch.exp(0.5 * log_var)

    def predict_mean_sd(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, sd)`` in the units of ``scale``."""
        mean, log_var = self(signals)
        return mean, self.sd(log_var)

    @classmethod
    def from_config(cls, config: dict) -> "HeteroscedasticNet":
        """Rebuild an untrained net from :attr:`config` (both branches :class:`MLP`); load the
        weights with ``load_state_dict`` afterwards."""
        if config.get("kind") not in VARIANCE_KINDS:
            raise ValueError(f"not a mean-plus-variance network config (kind one of {VARIANCE_KINDS}): "
                             f"kind={config.get('kind')!r}")
        mean = MLP(**config["mean"])
        variance = MLP(**config["variance"])
        return cls(mean, config["n_inputs"], config["n_variances"], scale=config["scale"],
                   log_var_min=config["log_var_min"], log_var_max=config["log_var_max"], variance_network=variance,
                   kind=config["kind"])
