"""Mono-exponential diffusion decay ``S = S0 * exp(-b * D)`` (ADC).

b in s/mm^2 and D in mm^2/s; the bounds (D up to 0.005 mm^2/s) are those of diffusion. For
relaxometry (echo times in ms, T2 or T2* in ms) use the ``"t2"`` and ``"t2star"`` models of
:mod:`qmri_labels.physics.relaxometry`.
"""

from __future__ import annotations

import torch

from qmri_labels.physics.base import Parameter, SignalModel, decay, register_model


def monoexp_signal(params: torch.Tensor, protocol: torch.Tensor) -> torch.Tensor:
    """Signals ``(..., M)`` for ``params = (S0, D)`` ``(..., 2)``."""
    return params[..., 0:1] * torch.exp(-protocol * params[..., 1:2])


@register_model
class MonoExpModel(SignalModel):
    """Mono-exponential diffusion decay (parameters S0, D in mm^2/s; b-values in s/mm^2)."""

    name = "monoexp"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 2.0, "signal at b = 0"),
        Parameter("D", "mm^2/s", 0.0, 0.005, "apparent diffusion coefficient"),
    )
    scale_index = 0
    default_protocol = (0.0, 10.0, 20.0, 30.0, 50.0, 80.0, 100.0, 200.0, 400.0, 800.0)
    default_snr = 30.0
    protocol_reference = "the b-values of Epstein et al., MELBA 2024 (their IVIM protocol), SNR 30"

    def forward(self, params, protocol):
        return monoexp_signal(params, protocol)

    def forward_and_gradients(self, params, protocol):
        e = decay(-protocol * params[..., 1:2])
        signal = params[..., 0:1] * e
        return signal, torch.stack([e, -protocol * signal], dim=-2)

    def initial_estimate(self, signals, protocol):
        tiny = torch.finfo(signals.dtype).tiny
        log_s = torch.log(signals.clamp_min(1e-6 * signals.abs().amax(-1, keepdim=True) + tiny))
        bc = protocol - protocol.mean()
        slope = (log_s * bc).sum(-1) / (bc * bc).sum().clamp_min(tiny)
        intercept = log_s.mean(-1) - slope * protocol.mean()
        return torch.stack([torch.exp(intercept), (-slope).clamp(1e-6, 0.0049)], dim=-1)
