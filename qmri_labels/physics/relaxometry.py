"""Transverse relaxation: ``S(TE) = S0 * exp(-TE / T2)`` (spin echoes) and
``S(TE) = S0 * exp(-TE / T2*)`` (gradient echoes).

Parameterised by the relaxation time itself, in milliseconds, with echo times in
milliseconds, so that bounds, priors and estimates read in the units a protocol is written
in. (The diffusion model :mod:`qmri_labels.physics.monoexp` has the same shape but a rate in
mm^2/s and b in s/mm^2; its bounds do not suit relaxation.)
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from qmri_labels.physics.base import Parameter, SignalModel, decay, register_model


def relaxation_signal(params: torch.Tensor, echo_times: torch.Tensor) -> torch.Tensor:
    """Signals ``(..., M)`` for ``params = (S0, T)`` ``(..., 2)``, T and echo times in ms."""
    return params[..., 0:1] * torch.exp(-echo_times / params[..., 1:2])


class _RelaxationModel(SignalModel):
    """Mono-exponential decay in echo time; subclasses name the relaxation time."""

    protocol_name = "echo_times"
    protocol_unit = "ms"
    scale_index = 0
    #: two parameters and up to 32 echoes (networks 32 wide): IVIM's 100,000 training signals
    #: took 292 s of CPU for the four networks of the default T2 study, 9.7 min on a shared
    #: 2-core machine; 30,000 keep the study within a few minutes there
    default_study_sizes = MappingProxyType({"n_train": 30_000})

    def forward(self, params, protocol):
        return relaxation_signal(params, protocol)

    def forward_and_gradients(self, params, protocol):
        t = params[..., 1:2]
        e = decay(-protocol / t)
        signal = params[..., 0:1] * e
        # dS/dT = S0 exp(-TE/T) * TE / T^2
        return signal, torch.stack([e, signal * protocol / (t * t)], dim=-2)

    def initial_estimate(self, signals, protocol):
        """Log-linear least squares: ``log S = log S0 - TE / T``; T clamped inside the bounds."""
        tiny = torch.finfo(signals.dtype).tiny
        log_s = torch.log(signals.clamp_min(1e-6 * signals.abs().amax(-1, keepdim=True) + tiny))
        tc = protocol - protocol.mean()
        slope = (log_s * tc).sum(-1) / (tc * tc).sum().clamp_min(tiny)
        intercept = log_s.mean(-1) - slope * protocol.mean()
        low, high = self.parameters[1].lower, self.parameters[1].upper
        # a flat or rising signal (slope >= 0) means a T2 beyond the echo range: take the upper bound
        t = torch.where(slope < 0, -1.0 / slope.clamp_max(-tiny), torch.full_like(slope, high))
        t = t.clamp(low * 1.01, high * 0.99)
        s0 = torch.exp(intercept)
        return torch.stack([s0, t], dim=-1)

    def scale_headroom(self, protocol) -> float:
        """The first echo may come late in a short decay: S0 can exceed the first echo's signal
        by ``exp(TE_min / T_lower)``, which the S0 bound must allow (capped at exp(30))."""
        te_min = float(torch.as_tensor(protocol).min())
        return 2.0 * math.exp(min(te_min / self.parameters[1].lower, 30.0))

    def starting_points(self, init, lower, upper, n_starts):
        """The log-linear estimate, then relaxation times spread log-uniformly over the bounds
        (T spans decades, so a linear spread would crowd the starts at long times)."""
        starts = [init]
        for j in range(1, n_starts):
            point = init.clone()
            u = j / n_starts
            lo, hi = lower[:, 1].clamp_min(1e-6), upper[:, 1]
            point[:, 1] = torch.exp(torch.log(lo) + u * (torch.log(hi) - torch.log(lo)))
            starts.append(point)
        return torch.stack(starts, dim=1)


@register_model
class T2Model(_RelaxationModel):
    """Spin-echo T2 decay (parameters ``S0`` in a.u., ``T2`` in ms; echo times in ms)."""

    name = "t2"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 2.0, "signal at TE = 0"),
        Parameter("T2", "ms", 1.0, 3000.0, "transverse relaxation time"),
    )
    default_protocol = tuple(10.0 * k for k in range(1, 33))
    protocol_reference = ("32-echo CPMG, first echo and spacing 10 ms (TE 10-320 ms): Whittall et al., MRM 1997;"
                          "37:34-43, the multi-echo T2 protocol of brain relaxometry")


@register_model
class T2StarModel(_RelaxationModel):
    """Gradient-echo T2* decay (parameters ``S0`` in a.u., ``T2star`` in ms; echo times in ms)."""

    name = "t2star"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 2.0, "signal at TE = 0"),
        Parameter("T2star", "ms", 0.5, 3000.0, "effective transverse relaxation time"),
    )
    default_protocol = tuple(round(2.6 + 2.02 * k, 2) for k in range(8))
    protocol_reference = ("8-echo gradient echo, TE 2.6-16.74 ms in steps of 2.02 ms: the breath-hold myocardial "
                          "T2* protocol of Westwood et al., JMRI 2003;18:33-39")


__all__ = ["T2Model", "T2StarModel", "relaxation_signal"]
