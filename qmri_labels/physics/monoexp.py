"""Mono-exponential decay ``S = S0 * exp(-b * D)``.

Serves diffusion (ADC, b in s/mm^2, D in mm^2/s) and, with echo times as the protocol and
the rate 1/T2 as ``D``, T2 relaxation.
"""

from __future__ import annotations

import torch

from qmri_labels.physics.base import Parameter, SignalModel, register_model


def monoexp_signal(params: torch.Tensor, protocol: torch.Tensor) -> torch.Tensor:
    """Signals ``(..., M)`` for ``params = (S0, D)`` ``(..., 2)``."""
    return params[..., 0:1] * torch.exp(-protocol * params[..., 1:2])


@register_model
class MonoExpModel(SignalModel):
    """Mono-exponential decay (parameters S0, D)."""

    name = "monoexp"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 2.0, "signal at b = 0"),
        Parameter("D", "mm^2/s", 0.0, 0.005, "apparent diffusion coefficient (or decay rate)"),
    )
    scale_index = 0

    def forward(self, params, protocol):
        return monoexp_signal(params, protocol)

    def jacobian(self, params, protocol):
        return self.forward_and_gradients(params, protocol)[1].transpose(-1, -2)

    def forward_and_gradients(self, params, protocol):
        e = torch.exp(-protocol * params[..., 1:2])
        signal = params[..., 0:1] * e
        return signal, torch.stack([e, -protocol * signal], dim=-2)

    def initial_estimate(self, signals, protocol):
        tiny = torch.finfo(signals.dtype).tiny
        log_s = torch.log(signals.clamp_min(1e-6 * signals.abs().amax(-1, keepdim=True) + tiny))
        bc = protocol - protocol.mean()
        slope = (log_s * bc).sum(-1) / (bc * bc).sum().clamp_min(tiny)
        intercept = log_s.mean(-1) - slope * protocol.mean()
        return torch.stack([torch.exp(intercept), (-slope).clamp(1e-6, 0.0049)], dim=-1)
