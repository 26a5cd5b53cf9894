"""QSM loss terms and the normalisation stored with a network.

Label choices (the voxel-wise problems' question carried over to QSM):

``gt``      true chi of the synthetic phantoms.
``mle``     COSMOS from the noisy multi-orientation fields (the QSM analogue of the MLE label).
``self``    no chi label: field consistency ``||M (D * chi_hat - f)||^2`` inside the mask.
``hybrid``  ``alpha * L_mle + (1 - alpha) * L_gt``.
``graf``    Graf et al.'s ``L_chi + lambda * L_field`` (``field_weight``, lambda = 1 by default).

Losses are mean squared errors inside the mask, chi terms divided by ``chi_scale^2`` and the
field term by ``field_scale^2``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from qmri_labels.physics.qsm import _dipole_kernel_torch
from qmri_labels.training.labels import resolve_weights

__all__ = ["QSM_LABELS", "qsm_loss_weights", "QSMNormalisation", "QSMLoss"]

QSM_LABELS = ("gt", "mle", "self", "hybrid", "graf")

def qsm_loss_weights(label: str, alpha: float | None = None, field_weight: float = 1.0) -> dict[str, float]:
    """Weights ``{"gt", "mle", "self"}`` of the loss terms for a QSM label choice.

    ``graf`` is ``gt`` plus ``field_weight`` times the field-consistency term; the others are
    those of :func:`qmri_labels.training.labels.resolve_weights`.
    """
    if label not in QSM_LABELS:
        raise ValueError(f"label must be one of {QSM_LABELS}, got {label!r}")
    if label == "graf":
        if not (math.isfinite(field_weight) and field_weight >= 0):
            raise ValueError(f"field_weight must be finite and >= 0, got {field_weight}")
        return {"gt": 1.0, "mle": 0.0, "self": float(field_weight)}
    return resolve_weights(label, alpha)


@dataclass(frozen=True)
class QSMNormalisation:
    """Scales of the network's inputs and outputs (ppm): stored with the network.

    The field channel is divided by ``field_scale``, the TKD channel and the chi output by
    ``chi_scale`` (network output times ``chi_scale`` is chi in ppm).
    """

    field_scale: float
    chi_scale: float

    def __post_init__(self):
        for name in ("field_scale", "chi_scale"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "QSMNormalisation":
        return cls(float(d["field_scale"]), float(d["chi_scale"]))


class QSMLoss(nn.Module):
    """Weighted sum of the chi terms (``gt``, ``mle``) and the field-consistency term (``self``).

    ``forward(chi_pred, batch)`` takes the predicted chi in ppm ``(B, X, Y, Z)`` and a batch
    with ``mask`` and, as the active terms need, ``chi`` (true), ``mle`` (COSMOS) and
    ``field``; it returns the total and a dict of the evaluated terms.
    """

    def __init__(self, weights: Mapping[str, float], normalisation: QSMNormalisation,
                 voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir: Sequence[float] = (0.0, 0.0, 1.0)):
        super().__init__()
        self.weights = {t: float(weights.get(t, 0.0)) for t in ("gt", "mle", "self")}
        self.active = tuple(t for t, w in self.weights.items() if w != 0.0)
        if not self.active:
            raise ValueError("every loss weight is zero")
        self.normalisation = normalisation
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.b0_dir = tuple(float(v) for v in b0_dir)
        self._kernels: dict = {}

    def _kernel(self, shape, device):
        key = (tuple(shape), str(device))
        if key not in self._kernels:
            self._kernels[key] = _dipole_kernel_torch(shape, self.voxel_size, self.b0_dir, 0.0, device, torch.float32)
        return self._kernels[key]

    def forward(self, chi_pred: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"].to(chi_pred.dtype)
        n_mask = mask.sum().clamp_min(1.0)
        cs, fs = self.normalisation.chi_scale, self.normalisation.field_scale
        terms = {}
        for term in self.active:
            if term in ("gt", "mle"):
                target = batch["chi" if term == "gt" else "mle"]
                terms[term] = (((chi_pred - target) / cs) ** 2 * mask).sum() / n_mask
            else:
                kernel = self._kernel(chi_pred.shape[-3:], chi_pred.device)
                field_pred = torch.fft.ifftn(torch.fft.fftn(chi_pred, dim=(-3, -2, -1)) * kernel, dim=(-3, -2, -1)).real
                resid = field_pred - batch["field"]
                # the field's mean is not observable either: compare demeaned fields in the mask
                resid = resid - (resid * mask).sum(dim=(-3, -2, -1), keepdim=True) / mask.sum(
                    dim=(-3, -2, -1), keepdim=True).clamp_min(1.0)
                terms[term] = ((resid / fs) ** 2 * mask).sum() / n_mask
        total = sum(self.weights[t] * v for t, v in terms.items())
        return total, terms
