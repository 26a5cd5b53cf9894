"""A plain 3-D U-Net (``torch.nn.Module``) for dipole inversion and other volume-to-volume maps.

Each resolution level has two ``Conv3d -> [BatchNorm3d] -> activation`` blocks (same padding);
the encoder halves the grid with 2x2x2 max pooling, the decoder doubles it with a 2x2x2
transposed convolution, concatenates the skip connection and applies two blocks; a 1x1x1
convolution maps to the output channels. Channels double at each level: ``init_channels *
2**level``. A network with ``levels`` levels pools ``levels - 1`` times, so inputs must have
spatial sizes divisible by :attr:`UNet3D.size_multiple` (``2**(levels - 1)``).

Presets (:func:`unet3d_preset`):

``toy``     2 levels, 2 then 4 channels, 5^3 kernels, ReLU (the QSMnet teaching U-Net).
``qsmnet``  5 levels (4 poolings), 32 to 512 channels, 5^3 kernels, leaky ReLU 0.1, batch
            norm (Yoon et al. 2018).
``graf``    5 levels, 16 (or 32) initial channels, 3^3 kernels, batch norm; activation ReLU,
            leaky ReLU (slope 0.2) or ELU (Graf et al. 2023). 16 channels: 5.6 M parameters
            (about 22 MB in float32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["UNet3D", "UNet3DConfig", "unet3d_preset", "PRESETS", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "leaky_relu", "elu")


@dataclass(frozen=True)
class UNet3DConfig:
    """Hyperparameters of :class:`UNet3D` (plain values, stored in model manifests)."""

    in_channels: int = 1
    out_channels: int = 1
    levels: int = 5
    init_channels: int = 16
    kernel_size: int = 3
    activation: str = "leaky_relu"
    negative_slope: float = 0.2
    batch_norm: bool = True

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "init_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.levels) < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if int(self.kernel_size) < 1 or int(self.kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not (self.negative_slope >= 0):
            raise ValueError(f"negative_slope must be >= 0, got {self.negative_slope}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNet3DConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown UNet3DConfig fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "toy": dict(levels=2, init_channels=2, kernel_size=5, activation="relu", batch_norm=True),
    "qsmnet": dict(levels=5, init_channels=32, kernel_size=5, activation="leaky_relu", negative_slope=0.1, batch_norm=True),
    "graf": dict(levels=5, init_channels=16, kernel_size=3, activation="leaky_relu", negative_slope=0.2, batch_norm=True),
}


def unet3d_preset(name: str, **overrides) -> UNet3DConfig:
    """The configuration of a named preset (``toy``, ``qsmnet``, ``graf``) with overrides,
    e.g. ``unet3d_preset("graf", init_channels=32, activation="elu")``."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; available: {sorted(PRESETS)}")
    return UNet3DConfig(**{**PRESETS[name], **overrides})


def _activation(cfg: UNet3DConfig) -> nn.Module:
    if cfg.activation == "relu":
        return nn.ReLU(inplace=True)
    if cfg.activation == "leaky_relu":
        return nn.LeakyReLU(cfg.negative_slope, inplace=True)
    return nn.ELU(inplace=True)


def _block(cin: int, cout: int, cfg: UNet3DConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (cin, cout):
        layers.append(nn.Conv3d(c_in, cout, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm3d(cout))
        layers.append(_activation(cfg))
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """3-D U-Net mapping ``(B, in_channels, X, Y, Z)`` to ``(B, out_channels, X, Y, Z)``.

    Parameters
    ----------
    config : UNet3DConfig, optional
        Built from the keyword arguments when not given.
    **kwargs
        Fields of :class:`UNet3DConfig` (``levels``, ``init_channels``, ``kernel_size``,
        ``activation``, ``negative_slope``, ``batch_norm``, ``in_channels``, ``out_channels``).
    """

    def __init__(self, config: UNet3DConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = UNet3DConfig(**kwargs)
        elif kwargs:
            raise ValueError("pass either a config or keyword arguments, not both")
        self.config = config
        widths = [config.init_channels * 2**i for i in range(config.levels)]
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.encoders.append(_block(cin, w, config))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_low, w_high in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.upsamplers.append(nn.ConvTranspose3d(w_low, w_high, kernel_size=2, stride=2))
            self.decoders.append(_block(2 * w_high, w_high, config))
        self.head = nn.Conv3d(widths[0], config.out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2**(levels - 1)``)."""
        return 2 ** (self.config.levels - 1)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (B, {self.config.in_channels}, X, Y, Z), got shape {tuple(x.shape)}"
            )
        m = self.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {m} for a {self.config.levels}-level "
                "U-Net; pad the volume (the QSM estimator does this for you)"
            )
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.upsamplers, self.decoders):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
