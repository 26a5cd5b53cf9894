"""Voxel-wise multilayer perceptron that maps signals to parameters within bounds.

The default follows Epstein et al. (MELBA 2024) and Barbieri et al. (MRM 2020): three hidden
layers as wide as the number of measurements, ELU activations. The last layer's outputs are
mapped into the parameter bounds so that every prediction is physically admissible; the
mapping is part of the network's config.

The design space of a fair label comparison is spanned by keyword arguments whose
defaults reproduce that network exactly: one sub-network per parameter (``parallel``, as in
IVIM-NET, Kaandorp et al. 2021), batch normalisation, dropout, bounds widened by a margin,
and a fixed (not estimated) signal scale S0.
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

    def __init__(self, bounds, mapping: str = "sigmoid", margin: float = 0.0):
        super().__init__()
        if mapping not in OUTPUT_MAPPINGS:
            raise ValueError(f"output mapping must be one of {OUTPUT_MAPPINGS}, got {mapping!r}")
        bounds = np.asarray(bounds, dtype=np.float64)
        if bounds.ndim != 2 or bounds.shape[0] != 2:
            raise ValueError(f"bounds must have shape (2, n_params), got {bounds.shape}")
        if not np.all(np.isfinite(bounds)) or np.any(bounds[1] <= bounds[0]):
            raise ValueError(f"bounds must be finite with lower < upper for every parameter, got {bounds.tolist()}")
        bounds = widen_bounds(bounds, margin)
        self.mapping = mapping
        self.margin = float(margin)
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
        return f"mapping={self.mapping!r}, margin={self.margin:g}"


def widen_bounds(bounds, margin: float) -> np.ndarray:
    """Bounds ``(2, P)`` widened by ``margin`` times each range at both ends.

    IVIM-NET's soft sigmoid bounds are the constraints widened by 30 % (``margin=0.3``), so
    that values at the constraints are reachable without saturating the sigmoid.
    """
    margin = float(margin)
    if not (np.isfinite(margin) and 0.0 <= margin <= 1.0):
        raise ValueError(f"bounds_margin must lie in [0, 1], got {margin!r}")
    bounds = np.asarray(bounds, dtype=np.float64)
    span = bounds[1] - bounds[0]
    return np.stack([bounds[0] - margin * span, bounds[1] + margin * span])


def _hidden_stack(n_inputs: int, width: int, hidden_layers: int, activation: str, batch_norm: bool,
                  dropout: float, n_outputs: int) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout], ``hidden_layers`` times, then a linear
    output layer (IVIM-NET's order; no dropout after the last hidden layer, as there)."""
    layers: list[nn.Module] = []
    size = int(n_inputs)
    for i in range(int(hidden_layers)):
        layers.append(nn.Linear(size, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0 and i < int(hidden_layers) - 1:
            layers.append(nn.Dropout(dropout))
        size = width
    layers.append(nn.Linear(size, int(n_outputs)))
    return nn.Sequential(*layers)


class ParallelBody(nn.Module):
    """One sub-network per output (IVIM-NET's "parallel" design): outputs ``(B, n_outputs)``
    are the concatenated single outputs of independent stacks."""

    def __init__(self, subnets: Sequence[nn.Module]):
        super().__init__()
        self.subnets = nn.ModuleList(subnets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x) for net in self.subnets], dim=-1)


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
    parallel : bool
        One sub-network (``hidden_layers`` x ``width``) per output instead of one shared
        network with ``n_outputs`` outputs.
    batch_norm : bool
        Batch normalisation after every hidden linear layer.
    dropout : float in [0, 1)
        Dropout after every hidden layer but the last.
    bounds_margin : float in [0, 1]
        The output mapping's bounds are ``bounds`` widened by this fraction of each range at
        both ends (see :func:`widen_bounds`).
    fixed_outputs : dict or None
        ``{index: value}``: outputs that are not estimated but set to a constant (e.g. S0 = 1
        for signals normalised by their b = 0 value); the network still has ``n_outputs``
        outputs so that the parameter order is the model's.
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
        parallel: bool = False,
        batch_norm: bool = False,
        dropout: float = 0.0,
        bounds_margin: float = 0.0,
        fixed_outputs: dict | None = None,
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
        for name, flag in (("parallel", parallel), ("batch_norm", batch_norm)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        dropout = float(dropout)
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        fixed = {int(k): float(v) for k, v in dict(fixed_outputs or {}).items()}
        bad = [k for k in fixed if not 0 <= k < int(n_outputs)]
        if bad:
            raise ValueError(f"fixed_outputs names output indices {bad} outside 0..{int(n_outputs) - 1}")
        if len(fixed) == int(n_outputs):
            raise ValueError("fixed_outputs fixes every output: nothing left to estimate")
        if not all(np.isfinite(v) for v in fixed.values()):
            raise ValueError(f"fixed_outputs values must be finite, got {fixed}")
        self.config = {
            "n_inputs": int(n_inputs),
            "n_outputs": int(n_outputs),
            "hidden_layers": int(hidden_layers),
            "width": width,
            "activation": activation,
            "bounds": bounds.tolist(),
            "output": output,
        }
        # design options enter the config only when set, so that a default network's config
        # (and so every bundle written before they existed) stays as it was
        design = {"parallel": bool(parallel), "batch_norm": bool(batch_norm), "dropout": dropout,
                  "bounds_margin": float(bounds_margin),
                  "fixed_outputs": {str(k): v for k, v in sorted(fixed.items())} or None}
        defaults = {"parallel": False, "batch_norm": False, "dropout": 0.0, "bounds_margin": 0.0,
                    "fixed_outputs": None}
        self.config.update({k: v for k, v in design.items() if v != defaults[k]})
        shift = np.zeros(n_inputs) if input_shift is None else np.asarray(input_shift, dtype=np.float64)
        scale = np.ones(n_inputs) if input_scale is None else np.asarray(input_scale, dtype=np.float64)
        if shift.shape != (n_inputs,) or scale.shape != (n_inputs,):
            raise ValueError(f"input_shift and input_scale must have shape ({n_inputs},)")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(shift))):
            raise ValueError("input_scale must be finite and > 0, input_shift finite")
        self.register_buffer("input_shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("input_scale", torch.tensor(scale, dtype=torch.float32))

        stack = (int(n_inputs), width, int(hidden_layers), activation, bool(batch_norm), dropout)
        if parallel:
            self.body = ParallelBody([_hidden_stack(*stack, 1) for _ in range(int(n_outputs))])
        else:
            self.body = _hidden_stack(*stack, int(n_outputs))
        self.head = BoundedOutput(bounds, output, margin=bounds_margin)
        mask = np.zeros(int(n_outputs), dtype=bool)
        values = np.zeros(int(n_outputs))
        for k, v in fixed.items():
            mask[k], values[k] = True, v
        self.has_fixed = bool(mask.any())
        if self.has_fixed:
            self.register_buffer("fixed_mask", torch.tensor(mask))
            self.register_buffer("fixed_values", torch.tensor(values, dtype=torch.float32))

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        """Parameters ``(..., n_outputs)`` for signals ``(..., n_inputs)``."""
        x = (signals - self.input_shift) / self.input_scale
        lead = x.shape[:-1]
        # BatchNorm1d wants (B, C): flatten any leading shape
        out = self.head(self.body(x.reshape(-1, x.shape[-1]))).reshape(*lead, -1)
        if self.has_fixed:
            out = torch.where(self.fixed_mask, self.fixed_values.to(out.dtype), out)
        return out

    @property
    def bounds(self) -> np.ndarray:
        return np.asarray(self.config["bounds"])
