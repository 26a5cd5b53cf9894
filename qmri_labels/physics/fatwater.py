"""Magnitude multi-echo gradient echo of a water-fat voxel (chemical-shift encoded PDFF and R2*).

``S(TE) = S0 * |(1 - PDFF) + PDFF * c(TE)| * exp(-R2* TE)``, with the fat spectrum's phasor
``c(TE) = sum_k a_k exp(i 2 pi f_k TE)``, ``f_k = delta_k * gamma_bar * B0`` (``delta_k`` the
peak's shift from water in ppm), one R2* for water and fat and no field offset (the magnitude
does not see it). Parameters ``S0`` (a.u.), ``PDFF`` (a fraction) and ``R2star`` (1/s); echo
times in ms. The default protocol and SNR are those of the simulations of Bray et al. (MRM
2023, "MAGORINO"): 3 T, 12 echoes at TE = 1.1, 2.2, ..., 13.2 ms, SNR 60, with their six-peak
spectrum. The magnitude likelihood has two optima, a water-dominant and a fat-dominant
solution (swapping PDFF for about 1 - PDFF); :meth:`FatWaterModel.starting_points` starts the
fitter in both.

The field strength is part of the model, not of the protocol (which stays the echo times): a
model instance holds it (``FatWaterModel(field_strength=1.5)``, recorded in :attr:`config`),
and each field strength of clinical practice has a registered name (``fatwater`` at 3 T,
``fatwater_1.5t``), so that datasets, caches and bundles, which name their model, carry it.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from qmri_labels.physics.base import Parameter, SignalModel, decay, register_model

#: gyromagnetic ratio of the proton over 2 pi, in Hz/T (the value of the MAGORINO code)
GAMMA_BAR_HZ_PER_T = 42.58e6

#: the six-peak fat spectrum of MAGORINO (Bray et al., MRM 2023, their code's "Hernando et al.
#: multisite" spectrum): shifts from water in ppm and relative amplitudes (summing to 1)
MAGORINO_FAT_SPECTRUM = {
    "shifts_ppm": (-3.9, -3.5, -2.7, -2.04, -0.49, 0.50),
    "amplitudes": (0.087, 0.694, 0.128, 0.004, 0.039, 0.048),
    "reference": "Bray et al., MRM 2023 (MAGORINO, doi:10.1002/mrm.29493), after Hernando et al., MRM 2017",
}

#: the protocol of MAGORINO's simulations at 3 T: 12 echoes, TE1 = 1.1 ms, spacing 1.1 ms
MAGORINO_ECHO_TIMES_3T = tuple(round(1.1 * k, 1) for k in range(1, 13))
#: and at 1.5 T (their in vivo protocol): 6 echoes, TE1 = 1.2 ms, spacing 2 ms
MAGORINO_ECHO_TIMES_1P5T = (1.2, 3.2, 5.2, 7.2, 9.2, 11.2)


def fat_phasor(echo_times: torch.Tensor, field_strength: float, spectrum: dict = MAGORINO_FAT_SPECTRUM
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts ``(M,)`` of the fat spectrum's phasor ``c(TE)`` at echo times in ms."""
    seconds = echo_times.double() / 1000.0
    re = torch.zeros_like(seconds)
    im = torch.zeros_like(seconds)
    for shift, amplitude in zip(spectrum["shifts_ppm"], spectrum["amplitudes"]):
        phase = 2 * math.pi * shift * 1e-6 * GAMMA_BAR_HZ_PER_T * field_strength * seconds
        re = re + amplitude * torch.cos(phase)
        im = im + amplitude * torch.sin(phase)
    return re.to(echo_times.dtype), im.to(echo_times.dtype)


@register_model
class FatWaterModel(SignalModel):
    """Magnitude multi-echo gradient echo of water and multi-peak fat (parameters ``S0`` in
    a.u., ``PDFF`` a fraction, ``R2star`` in 1/s; echo times in ms) at ``field_strength`` tesla.

    Parameters
    ----------
    field_strength : float or None
        B0 in tesla; ``None``: the class's (3 T for ``fatwater``).
    """

    name = "fatwater"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 2.0, "signal of water plus fat at TE = 0"),
        Parameter("PDFF", "1", 0.0, 1.0, "proton density fat fraction"),
        # MAGORINO's fitter bounds: 0 to 2 ms^-1
        Parameter("R2star", "1/s", 0.0, 2000.0, "effective transverse relaxation rate"),
    )
    scale_index = 0
    converge_every_start = True
    protocol_name = "echo_times"
    protocol_unit = "ms"
    field_strength = 3.0
    default_protocol = MAGORINO_ECHO_TIMES_3T
    default_snr = 60.0
    #: the label study's training set: 30,000 signals, as for the relaxation models (whose
    #: comment gives the cost of IVIM's 100,000); the default study then took 116 s of CPU
    default_study_sizes = MappingProxyType({"n_train": 30_000})
    protocol_reference = ("Bray et al., MRM 2023 (MAGORINO), simulations at 3 T: 12 echoes, TE1 = 1.1 ms, "
                          "spacing 1.1 ms, SNR 60")
    spectrum = MAGORINO_FAT_SPECTRUM
    #: PDFF of the water-dominant and the fat-dominant starting points
    water_start, fat_start = 0.1, 0.9
    #: R2* (1/s) of the starting points (MAGORINO's initial value, 0.1 ms^-1)
    r2star_start = 100.0

    def __init__(self, field_strength: float | None = None):
        if field_strength is not None:
            field_strength = float(field_strength)
            if not (math.isfinite(field_strength) and field_strength > 0):
                raise ValueError(f"field_strength must be a positive number of tesla, got {field_strength!r}")
            self.field_strength = field_strength

    @property
    def config(self) -> dict:
        """What defines this model beyond its parameters: name, field strength, fat spectrum."""
        return {"name": self.name, "field_strength": self.field_strength,
                "fat_spectrum": {k: list(v) if isinstance(v, tuple) else v for k, v in self.spectrum.items()}}

    def _phasor(self, protocol: torch.Tensor):
        return fat_phasor(protocol, self.field_strength, self.spectrum)

    def forward(self, params, protocol):
        re, im = self._phasor(protocol)
        s0, pdff, r2 = (params[..., i : i + 1] for i in range(3))
        a = 1 + pdff * (re - 1)
        b = pdff * im
        return s0 * torch.sqrt(a * a + b * b) * torch.exp(-r2 * protocol / 1000.0)

    def forward_and_gradients(self, params, protocol):
        re, im = self._phasor(protocol)
        s0, pdff, r2 = (params[..., i : i + 1] for i in range(3))
        a = 1 + pdff * (re - 1)
        b = pdff * im
        magnitude = torch.sqrt(a * a + b * b).clamp_min(torch.finfo(params.dtype).tiny)
        seconds = protocol / 1000.0
        e = decay(-r2 * seconds)
        shape = magnitude * e
        signal = s0 * shape
        d_pdff = s0 * e * (a * (re - 1) + b * im) / magnitude
        return signal, torch.stack([shape, d_pdff, -seconds * signal], dim=-2)

    def initial_estimate(self, signals, protocol):
        """The water-dominant start: PDFF 0.1, R2* 100 1/s, S0 from the first echo."""
        n = signals.shape[0]
        first = protocol.argmin()
        theta = torch.stack([torch.full((n,), self.water_start), torch.full((n,), self.r2star_start)], -1)
        theta = theta.to(signals.dtype).to(signals.device)
        shape = self.forward(torch.cat([torch.ones(n, 1, dtype=signals.dtype, device=signals.device), theta], -1),
                             protocol)[:, first]
        s0 = signals[:, first] / shape.clamp_min(1e-3)
        return torch.cat([s0[:, None], theta], -1)

    def scale_headroom(self, protocol) -> float:
        """S0 over the first echo's signal: the first echo may sit near opposed phase, where a
        mixed voxel keeps a few percent of S0 (20x), and into a fast decay (capped at exp(30))."""
        te_min = float(torch.as_tensor(protocol).min())
        return 20.0 * math.exp(min(te_min * self.parameters[2].upper / 1000.0, 30.0))

    def starting_points(self, init, lower, upper, n_starts):
        """Both sides of the likelihood's two optima: the water-dominant start (``init``), the
        fat-dominant one (PDFF 0.9, S0 rescaled to the first echo), then the two again with R2*
        spread over the bounds. A single start (``n_starts=1``) is the water-dominant one."""
        fat = init.clone()
        fat[:, 1] = self.fat_start
        starts = [init, fat]
        for j in range(2, n_starts):
            point = starts[j % 2].clone()
            point[:, 2] = lower[:, 2] + min(0.15 * (j // 2), 0.9) * (upper[:, 2] - lower[:, 2])
            starts.append(point)
        return torch.stack(starts[:n_starts], dim=1)


@register_model
class FatWater1p5TModel(FatWaterModel):
    """:class:`FatWaterModel` at 1.5 T, with MAGORINO's 1.5 T protocol (6 echoes, TE1 = 1.2 ms,
    spacing 2 ms) and the in vivo SNR it reports at 1.5 T (40)."""

    name = "fatwater_1.5t"
    field_strength = 1.5
    default_protocol = MAGORINO_ECHO_TIMES_1P5T
    default_snr = 40.0
    protocol_reference = ("Bray et al., MRM 2023 (MAGORINO), 1.5 T protocol: 6 echoes, TE1 = 1.2 ms, spacing 2 ms; "
                          "SNR 40 (typical in vivo at 1.5 T)")


__all__ = ["FatWaterModel", "FatWater1p5TModel", "fat_phasor", "MAGORINO_FAT_SPECTRUM", "MAGORINO_ECHO_TIMES_3T",
           "MAGORINO_ECHO_TIMES_1P5T", "GAMMA_BAR_HZ_PER_T"]
