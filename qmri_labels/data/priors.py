"""Parameter priors: distributions of true tissue parameters for simulated datasets.

Every prior samples with a NumPy ``Generator`` in float64 (bit-reproducible across machines),
knows its support (``ranges``, used to normalise parameters for the losses) and serialises to
a plain dict so that it can be part of a dataset fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qmri_labels.physics import get_model

#: Epstein et al. (MELBA 2024) training ranges; D* is drawn as D + U(10e-3, 150e-3).
EPSTEIN_RANGES = {
    "S0": (0.8, 1.2),
    "f": (0.1, 0.5),
    "D": (0.4e-3, 3.0e-3),
    "Dstar": (10e-3, 150e-3),
}
EPSTEIN_OFFSETS = {"Dstar": "D"}

#: MAGORINO's simulation grid (Bray et al., MRM 2023): PDFF 0-1, R2* 0-1 ms^-1
MAGORINO_RANGES = {"S0": (0.8, 1.2), "PDFF": (0.0, 1.0), "R2star": (0.0, 1000.0)}

#: default uniform priors per model: ``(ranges, offsets)``. IVIM and the mono-exponential ADC
#: keep Epstein et al.'s ranges; T2 spans myelin water (~20 ms) to grey matter and beyond in
#: the 32-echo CPMG's range; T2* spans iron-loaded (~5 ms) to normal myocardium (~40 ms) for
#: the 8-echo GRE of Westwood et al.; fat-water uses MAGORINO's grid.
DEFAULT_PRIORS = {
    "ivim": (EPSTEIN_RANGES, EPSTEIN_OFFSETS),
    "monoexp": ({k: EPSTEIN_RANGES[k] for k in ("S0", "D")}, {}),
    "t2": ({"S0": (0.8, 1.2), "T2": (20.0, 200.0)}, {}),
    "t2star": ({"S0": (0.8, 1.2), "T2star": (5.0, 60.0)}, {}),
    "fatwater": (MAGORINO_RANGES, {}),
    "fatwater_1.5t": (MAGORINO_RANGES, {}),
}


def default_prior_ranges(model: str) -> tuple[dict, dict]:
    """``(ranges, offsets)`` of the default uniform prior of ``model`` (copies).

    A model without an entry in :data:`DEFAULT_PRIORS` (one registered outside the package)
    gets Epstein et al.'s ranges for the parameters it shares with IVIM, which
    :class:`UniformPrior` then finds incomplete unless the caller gives ``ranges``.
    """
    ranges, offsets = DEFAULT_PRIORS.get(model, (EPSTEIN_RANGES, EPSTEIN_OFFSETS))
    return dict(ranges), dict(offsets)


@dataclass
class UniformPrior:
    """Independent uniform distributions within a box.

    Parameters
    ----------
    model : str
        Signal model name; fixes the parameter order.
    ranges : dict or None
        ``name -> (low, high)`` for every model parameter; ``None``: the model's default
        (:data:`DEFAULT_PRIORS`).
    offsets : dict or None
        ``name -> other``: the parameter is drawn as ``other + U(low, high)`` (Epstein's
        ``D* = D + U(10e-3, 150e-3)`` keeps D* above D); ``None``: the model's default.
    """

    model: str = "ivim"
    ranges: dict | None = None
    offsets: dict | None = None
    kind: str = "uniform"

    def __post_init__(self):
        default_ranges, default_offsets = default_prior_ranges(self.model)
        if self.ranges is None:
            self.ranges = default_ranges
        if self.offsets is None:
            self.offsets = default_offsets
        names = get_model(self.model).param_names
        missing = set(names) - set(self.ranges)
        if missing:
            raise ValueError(f"prior ranges miss parameters {sorted(missing)} of model {self.model!r}")
        for name, (low, high) in self.ranges.items():
            if not (np.isfinite(low) and np.isfinite(high) and low <= high):
                raise ValueError(f"prior range for {name} must be finite with low <= high, got {(low, high)}")
        # the Epstein defaults name IVIM parameters; other models keep only their own
        self.ranges = {k: (float(v[0]), float(v[1])) for k, v in self.ranges.items() if k in names}
        self.offsets = {k: v for k, v in self.offsets.items() if k in names and v in names}

    @property
    def param_names(self) -> tuple[str, ...]:
        return get_model(self.model).param_names

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` parameter vectors ``(n, n_params)`` in float64."""
        names = self.param_names
        theta = np.empty((n, len(names)))
        for i, name in enumerate(names):
            low, high = self.ranges[name]
            theta[:, i] = rng.uniform(low, high, size=n)
        for name, base in self.offsets.items():
            theta[:, names.index(name)] += theta[:, names.index(base)]
        return theta

    @property
    def support(self) -> np.ndarray:
        """``(2, n_params)``: smallest and largest value the prior can produce."""
        names = self.param_names
        lo = np.array([self.ranges[n][0] for n in names])
        hi = np.array([self.ranges[n][1] for n in names])
        for name, base in self.offsets.items():
            lo[names.index(name)] += self.ranges[base][0]
            hi[names.index(name)] += self.ranges[base][1]
        return np.stack([lo, hi])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": self.model, "ranges": {k: list(v) for k, v in self.ranges.items()},
                "offsets": dict(self.offsets)}


#: Abdominal tissues (mean f, D [mm^2/s], D* [mm^2/s]); values in the range reported in the
#: IVIM literature and used by OSIPI's test regions. Used by :class:`TissueMixturePrior`.
ABDOMEN_TISSUES = {
    "liver": (0.11, 1.0e-3, 0.10),
    "spleen": (0.20, 0.80e-3, 0.03),
    "kidney_cortex": (0.10, 2.1e-3, 0.05),
    "kidney_medulla": (0.09, 1.9e-3, 0.05),
    "pancreas": (0.15, 1.2e-3, 0.05),
    "muscle": (0.10, 1.5e-3, 0.03),
    "bone_marrow": (0.05, 0.45e-3, 0.03),
}


@dataclass
class TissueMixturePrior:
    """An in-vivo-like IVIM prior: a mixture of tissue classes with spread around each.

    Each sample picks a tissue uniformly; f, D and D* are drawn log-normally around the
    tissue's values with relative spread ``rel_sd`` and truncated (by redrawing) to
    ``bounds``; S0 is log-normal around 1 with spread ``s0_sd``. Correlations between
    tissues' parameters (low f with low D* in spleen, ...) are thus kept, which a uniform
    box does not have.
    """

    model: str = "ivim"
    tissues: dict = field(default_factory=lambda: {k: list(v) for k, v in ABDOMEN_TISSUES.items()})
    rel_sd: float = 0.25
    s0_sd: float = 0.1
    bounds: dict = field(default_factory=lambda: {"S0": [0.5, 1.5], "f": [0.01, 0.6], "D": [0.2e-3, 3.5e-3],
                                                  "Dstar": [5e-3, 0.2]})
    kind: str = "tissue_mixture"

    def __post_init__(self):
        if self.model != "ivim":
            raise ValueError("TissueMixturePrior is defined for the IVIM model only")
        if self.rel_sd <= 0 or self.s0_sd <= 0:
            raise ValueError("rel_sd and s0_sd must be > 0")

    @property
    def param_names(self) -> tuple[str, ...]:
        return get_model(self.model).param_names

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        names = self.param_names
        centres = np.array([[1.0, *v] for v in self.tissues.values()])
        spread = np.array([self.s0_sd, self.rel_sd, self.rel_sd, self.rel_sd])
        lo = np.array([self.bounds[k][0] for k in names])
        hi = np.array([self.bounds[k][1] for k in names])
        theta = np.empty((n, len(names)))
        todo = np.arange(n)
        # redraw rejected samples; the loop ends quickly because most mass is inside bounds
        while todo.size:
            tissue = rng.integers(0, len(centres), size=todo.size)
            draw = centres[tissue] * np.exp(spread * rng.standard_normal((todo.size, len(names))))
            theta[todo] = draw
            inside = np.all((draw >= lo) & (draw <= hi), axis=1)
            todo = todo[~inside]
        return theta

    @property
    def support(self) -> np.ndarray:
        names = self.param_names
        return np.array([[self.bounds[k][0] for k in names], [self.bounds[k][1] for k in names]])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": self.model, "tissues": {k: list(v) for k, v in self.tissues.items()},
                "rel_sd": self.rel_sd, "s0_sd": self.s0_sd, "bounds": {k: list(v) for k, v in self.bounds.items()}}


_PRIORS = {"uniform": UniformPrior, "tissue_mixture": TissueMixturePrior}


def prior_from_dict(d: dict):
    """Rebuild a prior from :meth:`to_dict` output."""
    d = dict(d)
    kind = d.pop("kind", "uniform")
    if kind not in _PRIORS:
        raise ValueError(f"unknown prior kind {kind!r}; known: {sorted(_PRIORS)}")
    if kind == "uniform":
        d["ranges"] = {k: tuple(v) for k, v in d["ranges"].items()}
    return _PRIORS[kind](**d)
