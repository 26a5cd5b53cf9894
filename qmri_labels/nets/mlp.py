"""Voxel-wise multilayer perceptron that maps signals to parameters within bounds.

The default follows Epstein et al. (MELBA 2024) and Barbieri et al. (MRM 2020): three hidden
layers as wide as the number of measurements, ELU activations. The last layer's outputs are
mapped into the parameter bounds so that every prediction is physically admissible; the
mapping is part of the network's config.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}

#: ``sigmoid``: lower + (upper - lower) * sigmoid(z), smooth and never outside the bounds;
#: ``clamp``: z clipped to the bounds (zero gradient outside); ``identity``: unbounded.
OUTPUT_MAPPINGS = ("sigmoid", "clamp", "identity")


class BoundedOutput(nn.Module):
    """Map raw network outputs ``(..., P)`` into per-parameter bounds.

    Parameters
    ----------
    bounds : array-like, shape (2, P)
        Lower bounds in row 0, upper bounds in row 1.
    mapping : {"sigmoid", "clamp", "identity"}
    """

    def __init__(self, bounds, mapping: str = "sigmoid"):
        super().__init__()
        if mapping not in OUTPUT_MAPPINGS:
            raise ValueError(f"output mapping must be one of {OUTPUT_MAPPINGS}, got {mapping!r}")
        bounds = np.asarray(bounds, dtype=np.float64)
        if bounds.ndim != 2 or bounds.shape[0] != 2:
            raise ValueError(f"bounds must have shape (2, n_params), got {bounds.shape}")
        if not np.all(np.isfinite(bounds)) or np.any(bounds[1] <= bounds[0]):
            raise ValueError(f"bounds must be finite with lower < upper for every parameter, got {bounds.tolist()}")
        self.mapping = mapping
        self.register_buffer("lower", torch.tensor(bounds[0], dtype=torch.float32))
        self.register_buffer("span", torch.tensor(bounds[1] - bounds[0], dtype=torch.float32))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mapping == "sigmoid":
            return self.lower + self.span * torch.sigmoid(z)
        # the raw output lives on the unit scale of each parameter's range, as for sigmoid
        if self.mapping == "clamp":
            return self.lower + self.span * z.clamp(0.0, 1.0)
        return self.lower + self.span * z

    def extra_repr(self) -> str:
        return f"mapping={self.mapping!r}"


class MLP(nn.Module):
    """Fully connected network from ``n_inputs`` measurements to ``n_outputs`` parameters.

    Parameters
    ----------
    n_inputs : int
        Number of measurements per voxel.
    n_outputs : int
        Number of parameters.
    hidden_layers : int
        Number of hidden layers (default 3).
    width : int or None
        Width of every hidden layer; ``None`` means ``n_inputs``.
    activation : str
        One of :data:`ACTIVATIONS`.
    bounds : array-like (2, n_outputs) or None
        Parameter bounds of the output mapping; required unless ``output="identity"``
        (then ``None`` means lower 0 and span 1, i.e. raw outputs).
    output : {"sigmoid", "clamp", "identity"}
        How the last layer's outputs are mapped into ``bounds``.
    input_shift, input_scale : array-like (n_inputs,) or None
        Inputs are standardised as ``(x - shift) / scale`` inside the network, so a saved
        network needs no separate preprocessing. ``None``: 0 and 1.
    """

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        hidden_layers: int = 3,
        width: int | None = None,
        activation: str = "elu",
        bounds=None,
        output: str = "sigmoid",
        input_shift: Sequence[float] | None = None,
        input_scale: Sequence[float] | None = None,
    ):
        super().__init__()
        if int(n_inputs) < 1 or int(n_outputs) < 1:
            raise ValueError(f"n_inputs and n_outputs must be >= 1, got {n_inputs}, {n_outputs}")
        if int(hidden_layers) < 0:
            raise ValueError(f"hidden_layers must be >= 0, got {hidden_layers}")
        width = int(n_inputs) if width is None else int(width)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if bounds is None:
            if output != "identity":
                raise ValueError(f"output mapping {output!r} needs bounds of shape (2, {n_outputs})")
            bounds = np.stack([np.zeros(n_outputs), np.ones(n_outputs)])
        bounds = np.asarray(bounds, dtype=np.float64)
        if bounds.shape != (2, int(n_outputs)):
            raise ValueError(f"bounds must have shape (2, {n_outputs}), got {bounds.shape}")
        self.config = {
            "n_inputs": int(n_inputs),
            "n_outputs": int(n_outputs),
            "hidden_layers": int(hidden_layers),
            "width": width,
            "activation": activation,
            "bounds": bounds.tolist(),
            "output": output,
        }
        shift = np.zeros(n_inputs) if input_shift is None else np.asarray(input_shift, dtype=np.float64)
        scale = np.ones(n_inputs) if input_scale is None else np.asarray(input_scale, dtype=np.float64)
        if shift.shape != (n_inputs,) or scale.shape != (n_inputs,):
            raise ValueError(f"input_shift and input_scale must have shape ({n_inputs},)")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(shift))):
            raise ValueError("input_scale must be finite and > 0, input_shift finite")
        self.register_buffer("input_shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("input_scale", torch.tensor(scale, dtype=torch.float32))

        layers: list[nn.Module] = []
        size = int(n_inputs)
        for _ in range(int(hidden_layers)):
            layers += [nn.Linear(size, width), ACTIVATIONS[activation]()]
            size = width
        layers.append(nn.Linear(size, int(n_outputs)))
        self.body = nn.Sequential(*layers)
        self.head = BoundedOutput(bounds, output)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        """Parameters ``(..., n_outputs)`` for signals ``(..., n_inputs)``."""
        return self.head(self.body((signals - self.input_shift) / self.input_scale))

    @property
    def bounds(self) -> np.ndarray:
        return np.asarray(self.config["bounds"])
