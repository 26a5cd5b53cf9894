"""Simulated datasets: a :class:`DatasetSpec` generates a :class:`Dataset`.

The same spec gives the same bytes on any machine: parameters and noise are drawn with
NumPy's PCG64 in float64, the forward model runs in float64 and the results are rounded once
to float32. Each dataset carries a fingerprint, the SHA-256 of its canonical spec and its
arrays, which training runs, caches and results record.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from qmri_labels.data.fingerprint import canonical_json, fingerprint
from qmri_labels.data.priors import UniformPrior, prior_from_dict
from qmri_labels.fileio import atomic_write_bytes, read_verified_npz
from qmri_labels.physics import get_model
from qmri_labels.physics.noise import NOISE_TYPES, add_noise, sigma_from_snr

#: Epstein et al.'s IVIM protocol (s/mm^2).
EPSTEIN_BVALUES = (0.0, 10.0, 20.0, 30.0, 50.0, 80.0, 100.0, 200.0, 400.0, 800.0)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SimulationSpec:
    """What every simulation of noisy signals states: a dataset's (:class:`DatasetSpec`) and an
    evaluation grid's (:class:`~qmri_labels.data.grid.GridSpec`).

    Parameters
    ----------
    model : str
        Signal model name (``"ivim"``, ``"monoexp"``, ``"t2"``, ...).
    protocol : tuple of float
        b-values in s/mm^2 (or echo times for the relaxation models).
    snr : float, (low, high) or dict
        ``s0_reference / sigma`` (see :func:`snr_setting`).
    noise : {"rician", "gaussian"}
    seed : int
    s0_reference : float
        The S0 that the SNR refers to (1 for normalised signals).
    """

    model: str = "ivim"
    protocol: tuple = EPSTEIN_BVALUES
    snr: float | dict = 30.0
    noise: str = "rician"
    seed: int = 0
    s0_reference: float = 1.0

    #: the order of the keys of :meth:`to_dict` (that of the files and manifests written from it)
    FIELD_ORDER: ClassVar[tuple[str, ...]] = ("model", "protocol", "snr", "noise", "seed", "s0_reference")

    def __post_init__(self):
        model = get_model(self.model)
        object.__setattr__(self, "protocol", tuple(float(b) for b in model.validate_protocol(self.protocol)))
        if self.noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {self.noise!r}")
        object.__setattr__(self, "snr", snr_setting(self.snr))
        object.__setattr__(self, "seed", int(self.seed))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["protocol"] = list(self.protocol)
        return {name: d[name] for name in self.FIELD_ORDER}

    @classmethod
    def from_dict(cls, d: dict):
        """The spec of a :meth:`to_dict` mapping; unknown keys are refused."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**d)

    def canonical_json(self) -> str:
        return canonical_json(self.to_dict())

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def snr_range(self) -> bool:
        """Whether the SNR is drawn per voxel (a range) rather than one number."""
        return isinstance(self.snr, dict)

    @property
    def sigma(self) -> float:
        """The noise level of a single-SNR spec (for an SNR range see ``Dataset.sigma``)."""
        if self.snr_range:
            raise ValueError(f"this spec draws the SNR per voxel ({self.snr}); its sigma is per voxel: use "
                             "Dataset.sigma of the generated dataset")
        return sigma_from_snr(self.snr, self.s0_reference)


@dataclass(frozen=True)
class DatasetSpec(SimulationSpec):
    """Everything that defines a simulated dataset: the :class:`SimulationSpec` settings plus
    the prior and the number of voxels.

    Parameters
    ----------
    model : str
        Signal model name (``"ivim"``, ``"monoexp"``).
    protocol : tuple of float
        b-values in s/mm^2 (or echo times for T2).
    prior : dict
        Parameter prior as a dict (see :mod:`qmri_labels.data.priors`); a prior object is
        converted with its ``to_dict``.
    snr : float, (low, high) or dict
        ``S0_reference / sigma``. A number: sigma is the same for every voxel, as in one scan.
        A range -- ``(low, high)`` (uniform) or ``{"low": ..., "high": ...,
        "distribution": "uniform" | "loguniform"}`` -- draws one SNR per voxel, as networks for
        in vivo data are trained (``Dataset.sigma`` then differs per voxel).
    noise : {"rician", "gaussian"}
    n : int
        Number of voxels.
    seed : int
    s0_reference : float
        The S0 that the SNR refers to (1 for normalised signals).
    """

    prior: dict = field(default_factory=lambda: UniformPrior().to_dict())
    n: int = 100_000

    FIELD_ORDER: ClassVar[tuple[str, ...]] = ("model", "protocol", "prior", "snr", "noise", "n", "seed",
                                              "s0_reference")

    def __post_init__(self):
        super().__post_init__()
        prior = self.prior if isinstance(self.prior, dict) else self.prior.to_dict()
        object.__setattr__(self, "prior", prior)
        if int(self.n) != self.n or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n}")
        if prior.get("model", self.model) != self.model:
            raise ValueError(f"prior is for model {prior.get('model')!r}, spec for {self.model!r}")
        object.__setattr__(self, "n", int(self.n))

    def sample_sigma(self, rng: np.random.Generator) -> np.ndarray:
        """Per-voxel sigma ``(n,)``; draws from ``rng`` only for an SNR range (so a scalar
        SNR's datasets are byte for byte those of earlier versions)."""
        if not self.snr_range:
            return np.full(self.n, self.sigma)
        low, high = self.snr["low"], self.snr["high"]
        if self.snr["distribution"] == "uniform":
            snr = rng.uniform(low, high, size=self.n)
        else:
            snr = np.exp(rng.uniform(np.log(low), np.log(high), size=self.n))
        return sigma_from_snr(snr, self.s0_reference)

    def generate(self) -> "Dataset":
        """Draw the parameters and the noisy signals."""
        rng = np.random.Generator(np.random.PCG64(self.seed))
        prior = prior_from_dict(self.prior)
        theta = prior.sample(self.n, rng)
        model = get_model(self.model)
        with torch.no_grad():
            clean = model.forward(torch.from_numpy(theta), torch.tensor(self.protocol, dtype=torch.float64)).numpy()
        sigma = self.sample_sigma(rng)
        noisy = add_noise(clean, sigma, self.noise, rng)
        return Dataset(self, theta.astype(np.float32), noisy.astype(np.float32), sigma.astype(np.float32))


SNR_DISTRIBUTIONS = ("uniform", "loguniform")


def snr_setting(snr) -> float | dict:
    """A checked SNR: a float, or ``{"low", "high", "distribution"}`` for a per-voxel range.

    Accepts a number, a pair ``(low, high)`` (uniform) or a dict with ``low``, ``high`` and
    optionally ``distribution`` (``"uniform"`` or ``"loguniform"``).
    """
    if isinstance(snr, (int, float, np.integer, np.floating)) and not isinstance(snr, bool):
        if not (np.isfinite(snr) and snr > 0):
            raise ValueError(f"snr must be finite and > 0, got {snr}")
        return float(snr)
    if isinstance(snr, (list, tuple)):
        if len(snr) != 2:
            raise ValueError(f"an SNR range must be (low, high), got {list(snr)}")
        snr = {"low": snr[0], "high": snr[1]}
    if not isinstance(snr, dict):
        raise ValueError(f"snr must be a number, (low, high) or a dict with low, high and distribution; got {snr!r}")
    unknown = set(snr) - {"low", "high", "distribution"}
    if unknown or not {"low", "high"} <= set(snr):
        raise ValueError(f"an SNR range needs keys low and high (and optionally distribution), got {sorted(snr)}")
    out = {"low": float(snr["low"]), "high": float(snr["high"]), "distribution": snr.get("distribution", "uniform")}
    if out["distribution"] not in SNR_DISTRIBUTIONS:
        raise ValueError(f"SNR distribution must be one of {SNR_DISTRIBUTIONS}, got {out['distribution']!r}")
    if not (np.isfinite(out["low"]) and np.isfinite(out["high"]) and 0 < out["low"] < out["high"]):
        raise ValueError(f"an SNR range needs 0 < low < high, got low={out['low']}, high={out['high']}")
    return out


@dataclass
class Dataset:
    """A generated dataset: true parameters, noisy signals and the noise level.

    Attributes
    ----------
    spec : DatasetSpec
    theta_true : ndarray (N, n_params), float32, in the model's parameter order
    signals : ndarray (N, M), float32
    sigma : ndarray (N,), float32
    """

    spec: DatasetSpec
    theta_true: np.ndarray
    signals: np.ndarray
    sigma: np.ndarray

    @property
    def protocol(self) -> np.ndarray:
        return np.asarray(self.spec.protocol)

    @property
    def model(self):
        return get_model(self.spec.model)

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.model.param_names

    @property
    def prior_support(self) -> np.ndarray:
        """``(2, n_params)`` support of the prior, the normalisation range of the losses."""
        return prior_from_dict(self.spec.prior).support

    def __len__(self) -> int:
        return self.signals.shape[0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical spec and the arrays' bytes."""
        return fingerprint(self.spec.canonical_json(), (self.theta_true, self.signals, self.sigma))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dataset to one ``.npz`` file (atomically: a crash leaves no partial file)."""
        path = Path(path)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format_version=np.int64(FORMAT_VERSION),
            spec_json=np.array(self.spec.canonical_json()),
            fingerprint=np.array(self.fingerprint),
            theta_true=self.theta_true,
            signals=self.signals,
            sigma=self.sigma,
        )
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dataset":
        """Read a dataset written by :meth:`save` and verify its fingerprint."""
        def build(z):
            spec = DatasetSpec.from_dict(json.loads(str(z["spec_json"])))
            return cls(spec, z["theta_true"], z["signals"], z["sigma"])

        return read_verified_npz(path, build, "qmri_labels dataset", FORMAT_VERSION)

