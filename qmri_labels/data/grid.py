"""The evaluation grid: true parameters on a regular grid x noise repeats (:class:`GridSpec`).

A :class:`GridSpec` fixes the true parameters (a regular grid over the varied parameters, the
others held fixed), the protocol, the noise and the number of noise repeats per grid point;
:meth:`GridSpec.chunks` simulates its noisy signals in chunks of whole grid points, so that an
evaluation (:func:`qmri_labels.analysis.evaluate_grid`) keeps memory bounded by the chunk size
whatever the grid and repeats.

Noise is deterministic: grid point ``g`` draws its repeats from NumPy's PCG64 seeded with
``(seed, g)``, so a point's signals do not depend on the chunk size or on which other points
are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from qmri_labels.data.datasets import SimulationSpec
from qmri_labels.data.fingerprint import fingerprint
from qmri_labels.data.priors import UniformPrior
from qmri_labels.physics import get_model
from qmri_labels.physics.noise import add_noise


def _default_axes() -> dict:
    support = UniformPrior().support
    names = get_model("ivim").param_names
    return {n: tuple(np.linspace(support[0, i], support[1, i], 10).tolist()) for i, n in enumerate(names) if n != "S0"}


@dataclass(frozen=True)
class GridSpec(SimulationSpec):
    """True-parameter grid x noise repeats on which estimators are evaluated: the
    :class:`~qmri_labels.data.datasets.SimulationSpec` settings plus the grid, the repeats and
    the chunk size.

    Parameters
    ----------
    model : str
        Signal model name (``"ivim"``, ``"monoexp"``).
    protocol : tuple of float
        b-values in s/mm^2 (or the model's protocol).
    axes : dict
        ``name -> values``: the grid values of each varied parameter (model units). The grid is
        the Cartesian product of the axes, in the model's parameter order (last varied
        parameter fastest). Default (IVIM): 10 values each of f, D and D* spanning the support
        of Epstein et al.'s training prior.
    fixed : dict
        ``name -> value`` for the parameters that are not varied (default ``S0 = 1``).
        Every model parameter must be in exactly one of ``axes`` and ``fixed``.
    repeats : int
        Noise repeats per grid point. The relative standard error of a per-point SD is about
        ``1 / sqrt(2 (R - 1))`` (7 % at R = 100); summaries average over the grid and are far
        more stable.
    snr : float
        ``s0_reference / sigma``.
    noise : {"rician", "gaussian"}
    seed : int
    chunk_size : int
        Upper bound on the number of signals simulated and estimated at once (whole grid
        points per chunk; at least one point).
    s0_reference : float
        The S0 the SNR refers to.
    """

    axes: dict = field(default_factory=_default_axes)
    fixed: dict = field(default_factory=lambda: {"S0": 1.0})
    repeats: int = 100
    chunk_size: int = 65536

    FIELD_ORDER: ClassVar[tuple[str, ...]] = ("model", "protocol", "axes", "fixed", "repeats", "snr", "noise", "seed",
                                              "chunk_size", "s0_reference")

    def __post_init__(self):
        super().__post_init__()
        if self.snr_range:
            raise ValueError(f"an evaluation grid has one SNR, got the range {self.snr}")
        names = get_model(self.model).param_names
        object.__setattr__(self, "axes", {str(k): tuple(float(x) for x in np.atleast_1d(np.asarray(v, dtype=np.float64)))
                                          for k, v in dict(self.axes).items()})
        object.__setattr__(self, "fixed", {str(k): float(v) for k, v in dict(self.fixed).items()})
        unknown = (set(self.axes) | set(self.fixed)) - set(names)
        if unknown:
            raise ValueError(f"grid names parameters {sorted(unknown)} that model {self.model!r} lacks {names}")
        both = set(self.axes) & set(self.fixed)
        if both:
            raise ValueError(f"parameters {sorted(both)} are both varied (axes) and fixed")
        missing = set(names) - set(self.axes) - set(self.fixed)
        if missing:
            raise ValueError(f"parameters {sorted(missing)} are neither in axes nor in fixed")
        for name, values in self.axes.items():
            if len(values) == 0 or not np.all(np.isfinite(values)):
                raise ValueError(f"grid axis {name!r} must hold at least one finite value")
        for name, value in self.fixed.items():
            if not np.isfinite(value):
                raise ValueError(f"fixed value of {name!r} must be finite, got {value}")
        for attr in ("repeats", "chunk_size"):
            value = getattr(self, attr)
            if int(value) != value or value < 1:
                raise ValueError(f"{attr} must be a positive integer, got {value}")
            object.__setattr__(self, attr, int(value))
        if self.repeats < 2:
            raise ValueError("repeats must be >= 2 to estimate a standard deviation")

    @classmethod
    def for_prior(
        cls,
        support,
        protocol,
        model: str = "ivim",
        points_per_axis: int | dict = 10,
        vary: tuple | list | None = None,
        fixed: dict | None = None,
        margin: float = 0.0,
        **kwargs,
    ) -> "GridSpec":
        """Grid spanning the support of a prior.

        Parameters
        ----------
        support : array_like, shape (2, P)
            Lower (row 0) and upper (row 1) value of each parameter, in the model's order
            (e.g. ``UniformPrior().support`` or ``Dataset.prior_support``).
        protocol : array_like, shape (M,)
        model : str
        points_per_axis : int or dict
            Grid values per varied parameter (a dict sets them per name).
        vary : sequence of str, optional
            Parameters to vary; default all except the model's scale parameter (S0), which is
            fixed at ``s0_reference``.
        fixed : dict, optional
            Values of the parameters not varied; default the scale parameter at
            ``s0_reference`` and the others at the middle of their support.
        margin : float
            Fraction of each range left out at both ends (0 = the grid includes the support's
            edges).
        **kwargs
            Other :class:`GridSpec` fields (``repeats``, ``snr``, ``noise``, ``seed``, ...).
        """
        signal_model = get_model(model)
        names = signal_model.param_names
        support = np.asarray(support, dtype=np.float64)
        if support.shape != (2, len(names)):
            raise ValueError(f"support must have shape (2, {len(names)}) for model {model!r}, got {support.shape}")
        if np.any(~np.isfinite(support)) or np.any(support[0] > support[1]):
            raise ValueError("support must be finite with lower <= upper")
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        scale_name = names[signal_model.scale_index] if signal_model.scale_index is not None else None
        if vary is None:
            vary = [n for n in names if n != scale_name]
        unknown = set(vary) - set(names)
        if unknown:
            raise ValueError(f"vary names unknown parameters {sorted(unknown)}; model has {names}")
        axes = {}
        for i, name in enumerate(names):
            if name not in vary:
                continue
            n_points = points_per_axis.get(name, 10) if isinstance(points_per_axis, dict) else points_per_axis
            if int(n_points) != n_points or n_points < 1:
                raise ValueError(f"points_per_axis must be a positive integer, got {n_points} for {name}")
            lo, hi = support[:, i]
            width = hi - lo
            axes[name] = tuple(np.linspace(lo + margin * width, hi - margin * width, int(n_points)).tolist())
        s0_reference = float(kwargs.get("s0_reference", 1.0))
        fixed_values = {}
        for i, name in enumerate(names):
            if name in axes:
                continue
            if fixed and name in fixed:
                fixed_values[name] = float(fixed[name])
            elif name == scale_name:
                fixed_values[name] = s0_reference
            else:
                fixed_values[name] = float(support[:, i].mean())
        return cls(model=model, protocol=tuple(np.asarray(protocol, dtype=np.float64).tolist()), axes=axes,
                   fixed=fixed_values, **kwargs)

    # ------------------------------------------------------------------ derived quantities
    @property
    def param_names(self) -> tuple[str, ...]:
        return get_model(self.model).param_names

    @property
    def varied(self) -> tuple[str, ...]:
        """Names of the varied parameters, in the model's order."""
        return tuple(n for n in self.param_names if n in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Grid shape over the varied parameters."""
        return tuple(len(self.axes[n]) for n in self.varied)

    @property
    def n_points(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def truth(self) -> np.ndarray:
        """True parameters ``(G, P)`` float64, in the model's order (last varied axis fastest)."""
        names = self.param_names
        mesh = np.meshgrid(*[np.asarray(self.axes[n]) for n in self.varied], indexing="ij")
        theta = np.empty((self.n_points, len(names)))
        k = 0
        for i, name in enumerate(names):
            if name in self.axes:
                theta[:, i] = mesh[k].ravel()
                k += 1
            else:
                theta[:, i] = self.fixed[name]
        return theta

    def signals(self, points: np.ndarray | slice | None = None) -> np.ndarray:
        """Noisy signals ``(n_points, repeats, M)`` float64 for the given grid points.

        The same point always gets the same noise (its generator is seeded by ``(seed, g)``).
        """
        index = np.arange(self.n_points)[points if points is not None else slice(None)]
        index = np.atleast_1d(index)
        model = get_model(self.model)
        theta = self.truth[index]
        with torch.no_grad():
            clean = model.forward(torch.from_numpy(theta), torch.tensor(self.protocol, dtype=torch.float64)).numpy()
        out = np.empty((len(index), self.repeats, len(self.protocol)))
        sigma = self.sigma
        for k, g in enumerate(index):
            rng = np.random.Generator(np.random.PCG64([self.seed, int(g)]))
            out[k] = add_noise(np.broadcast_to(clean[k], (self.repeats, clean.shape[-1])), sigma, self.noise, rng)
        return out

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["axes"] = {k: list(v) for k, v in self.axes.items()}
        return d

    @property
    def fingerprint(self) -> str:
        """Identifies the grid (truth, protocol, noise, seeds) in manifests."""
        return fingerprint("GridSpec:" + self.canonical_json())

    def chunks(self, progress: bool = False, desc: str = "grid") -> Iterator[tuple[int, int, np.ndarray]]:
        """The grid's noisy signals in chunks of whole points, the one loop every evaluation runs.

        Parameters
        ----------
        progress : bool
            Show a progress bar over the chunks.
        desc : str
            What the progress bar says is evaluated.

        Yields
        ------
        lo, hi : int
            The chunk's grid points ``lo:hi``.
        signals : ndarray float32, ((hi - lo) * repeats, M)
            Their signals (:meth:`signals`), point-major: at most ``chunk_size`` rows (at least
            one point).
        """
        n_points = self.n_points
        points_per_chunk = max(1, self.chunk_size // self.repeats)
        starts = range(0, n_points, points_per_chunk)
        if progress:
            starts = tqdm(starts, desc=f"{desc} {n_points} points x {self.repeats} repeats", unit="chunk")
        for lo in starts:
            hi = min(n_points, lo + points_per_chunk)
            yield lo, hi, self.signals(slice(lo, hi)).astype(np.float32).reshape((hi - lo) * self.repeats, -1)
