"""Common interface of voxel-wise signal models.

A signal model maps tissue parameters ``(..., n_params)`` and an acquisition protocol
``(n_measurements,)`` (b-values in s/mm^2, echo times in ms, ...) to signals
``(..., n_measurements)``. Forward functions are pure torch code, batched over any leading
shape and differentiable, so that the same function serves simulation, MLE fitting and
self-supervised training.

Adding a model means writing one new module in :mod:`qmri_labels.physics` that defines a
:class:`SignalModel` subclass decorated with :func:`register_model`; modules of this package
are discovered on first use of :func:`get_model`.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import torch

_REGISTRY: dict[str, type["SignalModel"]] = {}
#: model instances made available by name for this process (models defined outside the package)
_INSTANCES: dict[str, "SignalModel"] = {}


def register_model(cls: type["SignalModel"]) -> type["SignalModel"]:
    """Class decorator that makes a model available by its ``name`` in :func:`get_model`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must define a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def use_model(model: "SignalModel") -> str:
    """Make the instance ``model`` available by its name to everything that looks a model up
    (simulation, fitting, training losses, evaluation) for the rest of this process, and
    return that name.

    This is how a model written outside the package (a notebook's ``SignalModel`` subclass)
    reaches a study without :func:`register_model`: :func:`get_model` returns this very
    instance, so settings given to its constructor are kept. A model without a ``name`` is
    named after its class, lower case. A name of a registered model class is refused unless
    ``model`` is an instance of that class; a name used before by another instance is taken
    over (a notebook cell run again defines its class anew).
    """
    if not isinstance(model, SignalModel):
        raise TypeError(f"expected a SignalModel instance, got {type(model).__name__}")
    name = model.name or type(model).__name__.lower()
    if name in available_models() and not isinstance(model, _REGISTRY[name]):
        raise ValueError(f"model name {name!r} is taken by the registered model {_REGISTRY[name].__name__}; "
                         f"give {type(model).__name__} another `name`")
    if not model.name:
        model.name = name
    if not model.parameters:
        raise ValueError(f"{type(model).__name__} has no `parameters`")
    _INSTANCES[name] = model
    return name


def _discover_models() -> None:
    import qmri_labels.physics as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name not in {"base", "noise"}:
            importlib.import_module(f"{package.__name__}.{info.name}")


def available_models() -> list[str]:
    """Names of all registered voxel-wise signal models."""
    _discover_models()
    return sorted(_REGISTRY)


def class_path(model: "SignalModel") -> str:
    """``module:QualifiedName`` of a model's class (what a configuration's ``model.class`` names)."""
    return f"{type(model).__module__}:{type(model).__qualname__}"


def get_model(model: "str | SignalModel") -> "SignalModel":
    """Return a model instance from its registered name (or pass an instance through)."""
    if isinstance(model, SignalModel):
        return model
    if model in _INSTANCES:
        return _INSTANCES[model]
    if model not in _REGISTRY:
        _discover_models()
    try:
        return _REGISTRY[model]()
    except KeyError:
        raise ValueError(
            f"unknown signal model {model!r}; available: {', '.join(available_models())}"
        ) from None


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)


def _halton(index: int, base: int) -> float:
    result, f = 0.0, 1.0
    while index > 0:
        f /= base
        result += f * (index % base)
        index //= base
    return result


@dataclass(frozen=True)
class Parameter:
    """One model parameter: its name, unit and default fitting bounds."""

    name: str
    unit: str
    lower: float
    upper: float
    description: str = ""


#: how a unit is printed for a reader where its symbol says little ("1": a dimensionless fraction)
DISPLAY_UNITS = {"1": "fraction"}


def display_unit(unit: str) -> str:
    """The unit as a reader sees it in tables and messages: ``"1"`` (f, PDFF) prints as
    ``"fraction"``; every other unit as it is. Files keep the unit itself."""
    return DISPLAY_UNITS.get(unit, unit)


def decay(exponent: torch.Tensor) -> torch.Tensor:
    """``exp(exponent)`` for the (non-positive) exponent of a signal decay, without subnormals.

    A decay far below the smallest normal number (``b * D*`` beyond ~87 in float32) would
    underflow to subnormal numbers, on which x86 CPUs compute ~50x slower; the result stops
    just above the smallest normal number instead (an error below 1.2e-38 in float32, 2.3e-308
    in float64). Used by the models' closed-form derivatives, in the MLE fitter's inner loop.
    """
    # 0.01 above log(tiny): exp of log(tiny) itself rounds to just below tiny, a subnormal
    return torch.exp(exponent.clamp_min(math.log(torch.finfo(exponent.dtype).tiny) + 0.01))


class SignalModel:
    """Base class of voxel-wise signal models.

    Subclasses set ``name``, ``parameters`` (a tuple of :class:`Parameter`, in the model's
    parameter order), ``protocol_name`` and ``protocol_unit`` and implement
    :meth:`forward`. Optionally they implement :meth:`initial_estimate`, a fast non-iterative
    estimate used to start the MLE fitter.
    """

    name: str = ""
    parameters: tuple[Parameter, ...] = ()
    protocol_name: str = "bvalues"
    protocol_unit: str = "s/mm^2"
    #: index of the parameter that scales the signal linearly (S0); None if there is none
    scale_index: int | None = None
    #: a protocol of the literature (in ``protocol_unit``), the one a study uses by default
    default_protocol: tuple[float, ...] = ()
    #: where :attr:`default_protocol` (and :attr:`default_snr`) come from
    protocol_reference: str = ""
    #: SNR (S0 / sigma) of the reference's simulations; None: the study's default
    default_snr: float | None = None
    #: sizes of the label study for this model where a study names none: entries of its
    #: configuration (``n_train``, ``max_epochs``, ``grid: {points_per_axis, repeats}``, ...),
    #: chosen so that the study with defaults fits a few minutes on a 2-core CPU; empty: the
    #: study's own defaults (IVIM's sizes)
    default_study_sizes: Mapping[str, Any] = MappingProxyType({})
    #: the MLE fitter runs every starting point to convergence and keeps the lowest NLL, instead
    #: of racing the starts and converging the leader: for likelihoods with separate optima,
    #: where a start that trails early may still end in the better one
    converge_every_start: bool = False

    @property
    def config(self) -> dict:
        """What defines the model instance: its registered name and any constructor settings
        (a model with settings, such as a field strength, extends it)."""
        return {"name": self.name}

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def n_params(self) -> int:
        return len(self.parameters)

    @property
    def units(self) -> dict[str, str]:
        return {p.name: p.unit for p in self.parameters}

    @property
    def default_bounds(self) -> np.ndarray:
        """Array ``(2, n_params)``: lower bounds in row 0, upper bounds in row 1."""
        return np.array([[p.lower for p in self.parameters], [p.upper for p in self.parameters]])

    def index(self, name: str) -> int:
        """Position of parameter ``name`` in the model's parameter order."""
        try:
            return self.param_names.index(name)
        except ValueError:
            raise KeyError(f"model {self.name!r} has no parameter {name!r}; it has {self.param_names}") from None

    def forward(self, params: torch.Tensor, protocol: torch.Tensor) -> torch.Tensor:
        """Noise-free signals ``(..., n_measurements)`` for ``params`` ``(..., n_params)``."""
        raise NotImplementedError

    def jacobian(self, params: torch.Tensor, protocol: torch.Tensor) -> torch.Tensor:
        """Derivative of the signals with respect to the parameters, ``(..., M, n_params)``.

        A model that gives its derivatives in closed form overrides
        :meth:`forward_and_gradients` (the MLE fitter's inner loop), and this is their transpose;
        otherwise autograd.
        """
        if type(self).forward_and_gradients is not SignalModel.forward_and_gradients:
            return self.forward_and_gradients(params, protocol)[1].transpose(-1, -2)
        # callers may be inside inference_mode (a network's predict asking for its SDs), where
        # autograd records nothing: step out of it, and copy the tensors made inside it
        with torch.inference_mode(False), torch.enable_grad():
            params = params.detach().clone().requires_grad_(True)
            protocol = protocol.clone()
            signal = self.forward(params, protocol)
            cols = []
            for m in range(signal.shape[-1]):
                (grad,) = torch.autograd.grad(signal[..., m].sum(), params, retain_graph=True)
                cols.append(grad)
        return torch.stack(cols, dim=-2)

    def forward_and_gradients(self, params: torch.Tensor, protocol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signals ``(..., M)`` and their derivatives, parameter-major: ``(..., n_params, M)``.

        The transpose of :meth:`jacobian`, computed with the signals because the two share
        their exponentials; the parameter-major layout makes the MLE fitter's ``J^T J`` a
        contiguous batched matrix product. Models override it with the closed form.
        """
        return self.forward(params, protocol), self.jacobian(params, protocol).transpose(-1, -2)

    def initial_estimate(self, signals: torch.Tensor, protocol: torch.Tensor) -> torch.Tensor:
        """A fast, non-iterative estimate ``(N, n_params)``; default: the middle of the bounds."""
        bounds = torch.as_tensor(self.default_bounds, dtype=signals.dtype, device=signals.device)
        return (0.5 * (bounds[0] + bounds[1])).expand(signals.shape[0], -1).clone()

    def scale_headroom(self, protocol) -> float:
        """Upper bound of the scale parameter (S0) relative to a voxel's mean signal at the
        lowest protocol value, used when no bound is given for it.

        2 suits protocols that start at (or near) zero, where that signal is about S0; models
        whose lowest protocol value can sit well into the decay (echo times) override it.
        """
        return 2.0

    def starting_points(self, init: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n_starts: int) -> torch.Tensor:
        """Starting points ``(N, n_starts, n_params)`` for the MLE fitter.

        The first is ``init``; the others keep the scale parameter of ``init`` and place the
        remaining parameters on a fixed low-discrepancy (Halton) sequence inside the bounds, so
        that the starts are the same on every run and spread over the whole box.
        """
        starts = [init]
        for j in range(1, n_starts):
            point = init.clone()
            for i in range(self.n_params):
                if i != self.scale_index:
                    u = _halton(j, _PRIMES[i % len(_PRIMES)])
                    point[:, i] = lower[:, i] + u * (upper[:, i] - lower[:, i])
            starts.append(point)
        return torch.stack(starts, dim=1)

    def validate_protocol(self, protocol) -> np.ndarray:
        """Check a protocol and return it as a 1-D float64 array."""
        protocol = np.asarray(protocol, dtype=np.float64)
        if protocol.ndim != 1 or protocol.size == 0:
            raise ValueError(f"{self.protocol_name} must be a non-empty 1-D array, got shape {protocol.shape}")
        if not np.all(np.isfinite(protocol)):
            raise ValueError(f"{self.protocol_name} contain NaN or Inf")
        if np.any(protocol < 0):
            raise ValueError(f"{self.protocol_name} must be >= 0 ({self.protocol_unit})")
        return protocol

    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={self.param_names})"
