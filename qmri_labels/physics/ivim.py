"""Intravoxel incoherent motion (IVIM) bi-exponential model.

``S(b) = S0 * (f * exp(-b * Dstar) + (1 - f) * exp(-b * D))``

with b in s/mm^2 and D, D* in mm^2/s (Le Bihan 1988; dipy's ``reconst/ivim.py`` uses the same
form). Parameter order ``("S0", "f", "D", "Dstar")``.
"""

from __future__ import annotations

import torch

from qmri_labels.physics.base import Parameter, SignalModel, decay, register_model


def ivim_signal(params: torch.Tensor, bvalues: torch.Tensor) -> torch.Tensor:
    """IVIM signals ``(..., M)`` for ``params = (S0, f, D, Dstar)`` ``(..., 4)``."""
    s0, f, d, dstar = (params[..., i : i + 1] for i in range(4))
    return s0 * (f * torch.exp(-bvalues * dstar) + (1 - f) * torch.exp(-bvalues * d))


@register_model
class IVIMModel(SignalModel):
    """IVIM bi-exponential diffusion model (parameters S0, f, D, Dstar)."""

    name = "ivim"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 2.0, "signal at b = 0"),
        Parameter("f", "1", 0.0, 1.0, "perfusion fraction"),
        Parameter("D", "mm^2/s", 0.0, 0.005, "tissue diffusion coefficient"),
        Parameter("Dstar", "mm^2/s", 0.003, 0.3, "pseudo-diffusion coefficient"),
    )
    scale_index = 0
    default_protocol = (0.0, 10.0, 20.0, 30.0, 50.0, 80.0, 100.0, 200.0, 400.0, 800.0)
    default_snr = 30.0
    protocol_reference = "Epstein et al., MELBA 2024: b = 0-800 s/mm^2 (10 values), SNR 15 and 30"

    def forward(self, params, protocol):
        return ivim_signal(params, protocol)

    def forward_and_gradients(self, params, protocol):
        s0, f, d, dstar = (params[..., i : i + 1] for i in range(4))
        e_fast = decay(-protocol * dstar)
        e_slow = decay(-protocol * d)
        shape = f * e_fast + (1 - f) * e_slow
        fast = s0 * f * e_fast
        slow = s0 * (1 - f) * e_slow
        grads = torch.stack([shape, s0 * (e_fast - e_slow), -protocol * slow, -protocol * fast], dim=-2)
        return s0 * shape, grads

    def initial_estimate(self, signals, protocol, b_threshold: float = 200.0):
        """Segmented estimate (Meeus et al. 2018 style), vectorised over voxels.

        1. log-linear fit of the signal at ``b >= b_threshold`` gives D and the intercept S_int;
        2. S0 is the mean of the b = 0 samples (or the lowest b), f = 1 - S_int / S0;
        3. D* from the log-linear fit of the perfusion residual at the low b-values.
        """
        tiny = torch.finfo(signals.dtype).tiny
        b = protocol
        high = b >= b_threshold
        if int(high.sum()) < 2:
            # short protocols: use the upper half of the b-values
            high = b >= torch.quantile(b, 0.5)
        log_s = torch.log(signals.clamp_min(1e-6 * signals.abs().amax(-1, keepdim=True) + tiny))
        slope, intercept = _loglinear(log_s[:, high], b[high])
        d = (-slope).clamp(1e-5, 0.0049)
        s_int = torch.exp(intercept)
        low_b = b == b.min()
        s0 = signals[:, low_b].mean(-1).clamp_min(tiny)
        f = (1 - s_int / s0).clamp(0.01, 0.9)
        low = (b > b.min()) & (b < b_threshold)
        if int(low.sum()) >= 2:
            resid = signals[:, low] - s_int[:, None] * torch.exp(-b[low] * d[:, None])
            ratio = resid / (f * s0)[:, None]
            log_r = torch.log(ratio.clamp(1e-4, 1.0))
            slope_p, _ = _loglinear(log_r, b[low])
            dstar = (-slope_p).clamp(0.005, 0.2)
        else:
            dstar = torch.full_like(d, 0.03)
        return torch.stack([s0, f, d, dstar], dim=-1)

    def starting_points(self, init, lower, upper, n_starts):
        """The segmented estimate, then the same with D* moved over the plausible range.

        D* is the hard parameter (shallow likelihood, local minima where D* collapses onto D or
        runs to its bound), so the extra starts vary it, and f with it, on a fixed schedule.
        """
        schedule = [(None, 0.01), (None, 0.1), (0.3, 0.03), (0.1, 0.2), (0.5, 0.05), (0.2, 0.015)]
        starts = [init]
        for f_value, dstar in schedule[: max(n_starts - 1, 0)]:
            point = init.clone()
            point[:, 3] = dstar
            if f_value is not None:
                point[:, 1] = f_value
            starts.append(point)
        if n_starts > len(starts):
            extra = super().starting_points(init, lower, upper, n_starts - len(starts) + 1)[:, 1:]
            return torch.cat([torch.stack(starts, dim=1), extra], dim=1)
        return torch.stack(starts, dim=1)


def _loglinear(log_s: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares line through ``(b, log_s)`` for every row: returns (slope, intercept)."""
    b_mean = b.mean()
    bc = b - b_mean
    slope = (log_s * bc).sum(-1) / (bc * bc).sum()
    intercept = log_s.mean(-1) - slope * b_mean
    return slope, intercept
