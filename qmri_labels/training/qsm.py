"""Training 3-D U-Nets for QSM dipole inversion with a choice of training label.

The label question of the voxel-wise problems carries over:

``gt``      true chi of the synthetic phantoms.
``mle``     COSMOS from the noisy multi-orientation fields (the QSM analogue of the MLE label;
            needs a phantom set with ``n_orientations >= 3``).
``self``    no chi label: field consistency ``||M (D * chi_hat - f)||^2`` through the dipole
            forward model (:func:`qmri_labels.physics.qsm.forward_field`) inside the mask.
``hybrid``  ``alpha * L_mle + (1 - alpha) * L_gt``.
``graf``    Graf et al.'s physics-informed loss ``L_chi + lambda * L_field`` (``field_weight``,
            lambda = 1 by default), ``L_chi`` against the true chi.

Losses are mean squared errors inside the mask, chi terms divided by ``chi_scale^2`` and the
field term by ``field_scale^2`` (the normalisation, stored with the network).

Training uses random patches (``patch_size``, e.g. 32 or 64) of larger volumes, or whole
volumes (``patch_size=None``). For patches the field of a patch also contains the field of
sources outside it; the ``gt``/``mle`` terms do not care, but the field-consistency term is then
an approximation (QSMnet+ makes the same one) and is evaluated only inside the patch and the
mask. With whole volumes (as in the label-choice study) it is exact.

The network input is the normalised field and, by default, a TKD estimate computed from the
same field (``inputs=("field", "tkd")``): the closed-form division does the non-local part of
the inversion, so the network learns to remove streaks and noise, which it does within the
few hundred steps a CPU affords. ``inputs=("field",)`` is Graf et al.'s and QSMnet's setting.

:class:`QSMEstimator` follows scikit-learn's contract (hyperparameters in ``__init__``,
``fit`` returns self, learned attributes end in ``_``) and saves to / loads from the model
bundle format of :mod:`qmri_labels.bundle`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from qmri_labels.analysis.image_metrics import nrmse as _nrmse
from qmri_labels.bundle import (
    device_info,
    load_bundle,
    package_versions,
    read_manifest,
    save_bundle,
)
from qmri_labels.data.phantoms import QSMPhantomSet
from qmri_labels.fitting.qsm_inversion import TV_DEFAULT_LAMBDA, cosmos, tkd, tv
from qmri_labels.nets.unet3d import UNet3D, UNet3DConfig, unet3d_preset
from qmri_labels.physics.qsm import _dipole_kernel_torch
from qmri_labels.training.labels import resolve_weights

__all__ = [
    "QSM_LABELS",
    "INPUT_CHANNELS",
    "qsm_loss_weights",
    "QSMNormalisation",
    "QSMLoss",
    "QSMPatchDataset",
    "EpochSampler",
    "QSMLitModule",
    "QSMEstimator",
    "pad_to_multiple",
]

QSM_LABELS = ("gt", "mle", "self", "hybrid", "graf")
INPUT_CHANNELS = ("field", "tkd", "tv")
#: input channels that a residual network adds its output to (the first one present wins)
RESIDUAL_CHANNELS = ("tv", "tkd")


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


def pad_to_multiple(volume: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Zero-pad the last three axes (centred) up to multiples of ``multiple``.

    Returns the padded array and the slices that crop it back.
    """
    shape = volume.shape[-3:]
    pads, crop = [], []
    for n in shape:
        total = (-n) % multiple
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + n))
    full = [(0, 0)] * (volume.ndim - 3) + pads
    return np.pad(volume, full), tuple(crop)


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


class QSMPatchDataset(TorchDataset):
    """Random patches (or whole volumes) of phantom arrays, reproducible from (seed, item).

    Item ``j`` of a patch dataset is the patch drawn by ``PCG64([seed, j])`` (a volume and a
    corner, uniformly); :class:`EpochSampler` hands out items ``e * S ... (e + 1) * S - 1`` in
    epoch ``e`` (``S = samples_per_epoch``), so every epoch sees new patches and a run is
    reproducible whatever the data loader prefetches. For whole volumes item ``j`` is volume
    ``j``.

    Parameters
    ----------
    arrays : dict of name -> ndarray (N, ..., X, Y, Z)
        ``inputs`` (N, C, X, Y, Z) and per-voxel targets (N, X, Y, Z): ``mask``, ``chi``,
        ``mle``, ``field``.
    patch_size : int or None
        Cube side; None gives whole volumes.
    samples_per_epoch : int
        Number of patches per epoch (ignored for whole volumes: one per volume).
    seed : int
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], patch_size: int | None, samples_per_epoch: int, seed: int = 0):
        self.arrays = {k: torch.as_tensor(v) for k, v in arrays.items()}
        self.n_volumes = self.arrays["inputs"].shape[0]
        self.shape = tuple(self.arrays["inputs"].shape[-3:])
        if patch_size is not None:
            if any(int(patch_size) > s for s in self.shape):
                raise ValueError(f"patch_size {patch_size} exceeds the volume shape {self.shape}")
        self.patch_size = None if patch_size is None else int(patch_size)
        self.samples_per_epoch = int(samples_per_epoch) if patch_size is not None else self.n_volumes
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, j: int) -> tuple[int, tuple[int, int, int]]:
        """(volume, corner) of item ``j``."""
        if self.patch_size is None:
            return int(j), (0, 0, 0)
        rng = np.random.Generator(np.random.PCG64([self.seed, int(j)]))
        vol = int(rng.integers(0, self.n_volumes))
        corner = tuple(int(rng.integers(0, s - self.patch_size + 1)) for s in self.shape)
        return vol, corner

    def __getitem__(self, j):
        vol, (x, y, z) = self.locate(j)
        p = self.patch_size
        out = {}
        for k, a in self.arrays.items():
            v = a[vol]
            if p is not None:
                v = v[..., x : x + p, y : y + p, z : z + p]
            out[k] = v
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Items of epoch ``e`` of a :class:`QSMPatchDataset` (Lightning calls :meth:`set_epoch`).

    Patches: ``e * S ... (e + 1) * S - 1``; whole volumes: a permutation seeded by (seed, e).
    """

    def __init__(self, dataset: QSMPatchDataset):
        self.dataset = dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        ds = self.dataset
        if ds.patch_size is None:
            rng = np.random.Generator(np.random.PCG64([ds.seed, self.epoch, 1]))
            return iter(rng.permutation(ds.n_volumes).tolist())
        start = self.epoch * ds.samples_per_epoch
        return iter(range(start, start + ds.samples_per_epoch))


def _network_chi(network: nn.Module, inputs: torch.Tensor, residual_channel: int | None) -> torch.Tensor:
    """Normalised chi ``(B, X, Y, Z)``: the network output, plus the TKD input channel when residual."""
    out = network(inputs)[:, 0]
    if residual_channel is not None:
        out = out + inputs[:, residual_channel]
    return out


class QSMLitModule(L.LightningModule):
    """Thin LightningModule: ``network`` (normalised inputs -> chi / chi_scale) with a :class:`QSMLoss`."""

    def __init__(self, network: nn.Module, loss: QSMLoss, lr: float = 1e-3, weight_decay: float = 0.01,
                 residual_channel: int | None = None):
        super().__init__()
        self.network = network
        self.residual_channel = residual_channel
        self.loss = loss
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.history: list[dict] = []
        #: callables ``f(module, row)`` run after each epoch's row is complete
        self.epoch_listeners: list = []
        self._sums: dict[str, list] = {}
        self._pending = None
        self._t0 = time.perf_counter()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return _network_chi(self.network, inputs, self.residual_channel) * self.loss.normalisation.chi_scale

    def _step(self, batch, stage):
        chi_pred = self(batch["inputs"])
        total, terms = self.loss(chi_pred, batch)
        acc = self._sums.setdefault(stage, [0.0, 0])
        acc[0] += float(total.detach()) * len(chi_pred)
        acc[1] += len(chi_pred)
        if stage == "val" and "chi" in batch:
            for c, t, m in zip(chi_pred.detach().cpu().numpy(), batch["chi"].cpu().numpy(), batch["mask"].cpu().numpy()):
                if m.any() and np.any(t[m.astype(bool)] != 0):
                    n = self._sums.setdefault("val_nrmse", [0.0, 0])
                    n[0] += _nrmse(c, t, m)
                    n[1] += 1
        return total

    def on_fit_start(self):
        self._t0 = time.perf_counter()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self._sums.clear()
            return
        row = {"epoch": int(self.current_epoch)}
        for k, (s, n) in self._sums.items():
            if n:
                row[f"{k}_loss" if k in ("train", "val") else k] = s / n
        self._sums = {k: v for k, v in self._sums.items() if k == "train"}
        self._pending = row

    def on_train_epoch_end(self):
        row = getattr(self, "_pending", None) or {"epoch": int(self.current_epoch)}
        s, n = self._sums.pop("train", [0.0, 0])
        if n:
            row["train_loss"] = s / n
        row["time_s"] = time.perf_counter() - self._t0
        self.history.append(row)
        self._pending = None
        for listener in self.epoch_listeners:
            listener(self, row)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class _BestKeeper:
    """Keeps the weights of the epoch with the lowest validation loss (and optionally saves them)."""

    def __init__(self, on_improve=None):
        self.best = math.inf
        self.best_state = None
        self.best_epoch = None
        self.on_improve = on_improve

    def __call__(self, module, row):
        score = row.get("val_loss", row.get("train_loss"))
        if score is not None and score < self.best:
            self.best = score
            self.best_epoch = row["epoch"]
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in module.network.state_dict().items()})
            if self.on_improve is not None:
                self.on_improve(self.best_state, row)


class QSMEstimator:
    """3-D U-Net estimator of chi from a local field, trained on synthetic phantoms.

    Parameters
    ----------
    label : {"gt", "mle", "self", "hybrid", "graf"}
    alpha : float
        MLE weight of ``hybrid``.
    field_weight : float
        lambda of ``graf`` (default 1).
    preset : {"toy", "qsmnet", "graf"}
        U-Net preset; ``unet`` overrides its fields (e.g. ``{"init_channels": 32,
        "activation": "elu"}``).
    inputs : tuple of {"field", "tkd", "tv"}
        Network input channels (``tv``: the TV inversion of the field, which needs the mask).
    residual : bool
        With a ``tv`` (else ``tkd``) input, the network predicts a correction that is added to
        that estimate (residual learning; the last layer starts at zero, so training starts
        from it); ignored without such a channel.
    tkd_threshold : float
        Threshold of the TKD input channel.
    tv_lambda : float
        TV weight of the ``tv`` input channel (:func:`qmri_labels.fitting.qsm_inversion.tv`);
        tune it on training phantoms.
    patch_size : int or None
        Training patch side (None: whole volumes).
    samples_per_epoch, batch_size, max_epochs, max_time_s, lr, weight_decay : training.
    seed : int
        Seeds the weight initialisation and the patch sampling.
    device : str or None
        ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
    progress : bool
        Lightning's progress bar.
    checkpoint_path : path or None
        If set, the best model so far is written there (bundle format) after each improvement.
    warm_start : bool
        If the estimator is already fitted (or loaded), continue from its weights and keep its
        normalisation instead of starting afresh (scikit-learn's meaning).

    Attributes (after fit)
    ----------------------
    network_ : UNet3D
    normalisation_ : QSMNormalisation
    history_ : list of dict (epoch, train_loss, val_loss, val_nrmse, time_s)
    best_epoch_ : int
    voxel_size_ : tuple
    train_fingerprint_ : str
    """

    def __init__(self, label: str = "gt", alpha: float | None = None, field_weight: float = 1.0,
                 preset: str = "graf", unet: Mapping[str, Any] | None = None, inputs: Sequence[str] = ("field", "tkd"),
                 residual: bool = True,
                 tkd_threshold: float = 0.19, tv_lambda: float = TV_DEFAULT_LAMBDA, patch_size: int | None = 32, samples_per_epoch: int = 64,
                 batch_size: int = 2, max_epochs: int = 10, max_time_s: float | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.01, seed: int = 0, device: str | None = None, progress: bool = False,
                 checkpoint_path: str | Path | None = None, warm_start: bool = False):
        self.label = label
        self.alpha = alpha
        self.field_weight = field_weight
        self.preset = preset
        self.unet = dict(unet or {})
        self.inputs = tuple(inputs)
        self.residual = bool(residual)
        self.tkd_threshold = tkd_threshold
        self.tv_lambda = tv_lambda
        self.patch_size = patch_size
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.max_time_s = max_time_s
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.device = device
        self.progress = progress
        self.checkpoint_path = checkpoint_path
        self.warm_start = bool(warm_start)

    # -- helpers ---------------------------------------------------------------------------
    def get_params(self) -> dict:
        keys = ("label", "alpha", "field_weight", "preset", "unet", "inputs", "residual", "tkd_threshold", "tv_lambda", "patch_size",
                "samples_per_epoch", "batch_size", "max_epochs", "max_time_s", "lr", "weight_decay", "seed",
                "device", "progress", "checkpoint_path", "warm_start")
        return {k: getattr(self, k) for k in keys}

    def _validate(self):
        qsm_loss_weights(self.label, self.alpha, self.field_weight)
        if not self.inputs or any(c not in INPUT_CHANNELS for c in self.inputs) or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs must be a non-empty tuple of distinct names from {INPUT_CHANNELS}, got {self.inputs!r}")
        if self.patch_size is not None and int(self.patch_size) < 1:
            raise ValueError(f"patch_size must be None or >= 1, got {self.patch_size}")
        for name in ("samples_per_epoch", "batch_size", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError("lr must be > 0 and weight_decay >= 0")

    def _unet_config(self) -> UNet3DConfig:
        return unet3d_preset(self.preset, in_channels=len(self.inputs), out_channels=1, **self.unet)

    @property
    def residual_channel_(self) -> int | None:
        if not self.residual:
            return None
        for name in RESIDUAL_CHANNELS:
            if name in self.inputs:
                return self.inputs.index(name)
        return None

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _input_stack(self, field: np.ndarray, mask, norm: QSMNormalisation, voxel_size, b0_dir) -> np.ndarray:
        chans = []
        for c in self.inputs:
            if c == "field":
                chans.append(field / norm.field_scale)
            elif c == "tkd":
                chans.append(tkd(field, voxel_size, b0_dir, self.tkd_threshold) / norm.chi_scale)
            else:
                if mask is None:
                    raise ValueError("the 'tv' input channel needs the brain mask: pass mask=")
                chans.append(tv(field, mask, voxel_size, b0_dir, lam=float(self.tv_lambda)) / norm.chi_scale)
        return np.stack(chans, axis=-4).astype(np.float32)

    def _arrays(self, data: QSMPhantomSet, norm: QSMNormalisation, weights) -> dict:
        field = data.field.astype(np.float32)
        out = {
            "inputs": self._input_stack(field, data.mask, norm, data.voxel_size, data.orientations[0]),
            "mask": data.mask.astype(np.float32),
            "chi": data.chi.astype(np.float32),
            "field": field,
        }
        if weights["mle"] > 0:
            if data.fields.shape[1] < 3:
                raise ValueError(
                    f"label {self.label!r} needs COSMOS labels, i.e. phantoms with n_orientations >= 3 "
                    f"(got {data.fields.shape[1]})")
            out["mle"] = cosmos(data.fields, data.orientations, data.voxel_size, mask=data.mask).astype(np.float32)
        return out

    # -- sklearn contract ------------------------------------------------------------------
    def fit(self, data: QSMPhantomSet, validation: QSMPhantomSet | None = None) -> "QSMEstimator":
        """Train on a :class:`~qmri_labels.data.phantoms.QSMPhantomSet` (optionally validating on another).

        The best epoch by validation loss (training loss without validation data) is kept.
        """
        self._validate()
        if not isinstance(data, QSMPhantomSet):
            raise ValueError(f"fit expects a QSMPhantomSet, got {type(data).__name__}")
        weights = qsm_loss_weights(self.label, self.alpha, self.field_weight)
        b0 = data.orientations[0]
        field = data.field
        tkd_train = tkd(field, data.voxel_size, b0, self.tkd_threshold)
        m = data.mask
        field_scale = float(np.sqrt(np.mean(field[m] ** 2)))
        chi_scale = float(np.sqrt(np.mean(tkd_train[m] ** 2)))
        norm = QSMNormalisation(field_scale, chi_scale)
        previous = getattr(self, "network_", None) if self.warm_start else None
        if previous is not None:
            norm = self.normalisation_

        torch.manual_seed(int(self.seed))
        network = UNet3D(self._unet_config())
        if previous is not None:
            if previous.config != network.config:
                raise ValueError("warm_start: the fitted network's architecture differs from the current settings")
            network.load_state_dict(previous.state_dict())
        elif self.residual_channel_ is not None:
            # start exactly at the TKD estimate: every step can only learn a correction
            nn.init.zeros_(network.head.weight)
            nn.init.zeros_(network.head.bias)
        loss = QSMLoss(weights, norm, data.voxel_size, b0)
        module = QSMLitModule(network, loss, lr=self.lr, weight_decay=self.weight_decay,
                              residual_channel=self.residual_channel_)

        arrays = self._arrays(data, norm, weights)
        patch = self.patch_size
        if patch is None:
            mult = network.size_multiple
            if any(s % mult for s in data.chi.shape[1:]):
                raise ValueError(f"whole-volume training needs shapes divisible by {mult}, got {data.chi.shape[1:]}")
        elif int(patch) % network.size_multiple:
            raise ValueError(f"patch_size must be a multiple of {network.size_multiple} for this U-Net, got {patch}")
        train_ds = QSMPatchDataset(arrays, patch, self.samples_per_epoch, seed=self.seed)
        train_dl = DataLoader(train_ds, batch_size=int(self.batch_size), sampler=EpochSampler(train_ds))
        val_dl = None
        if validation is not None:
            val_arrays = self._arrays(validation, norm, weights)
            val_padded = {}
            crop = None
            for k, v in val_arrays.items():
                val_padded[k], crop = pad_to_multiple(v, network.size_multiple)
            val_ds = QSMPatchDataset(val_padded, None, 1, seed=0)
            val_dl = DataLoader(val_ds, batch_size=1, shuffle=False)

        self.normalisation_ = norm
        self.voxel_size_ = tuple(float(v) for v in data.voxel_size)
        self.b0_dir_ = tuple(float(v) for v in b0)
        self.train_fingerprint_ = data.fingerprint
        self.train_spec_ = data.spec.to_dict()
        self.validation_fingerprint_ = None if validation is None else validation.fingerprint

        on_improve = None
        if self.checkpoint_path is not None:
            def on_improve(state, row):
                self.network_ = UNet3D(self._unet_config())
                self.network_.load_state_dict(state)
                self.history_ = list(module.history)
                self.best_epoch_ = row["epoch"]
                self.save(self.checkpoint_path)

        keeper = _BestKeeper(on_improve)
        if previous is not None:
            # continuing: only a better validation score than the previous best replaces it
            keeper.best = float(getattr(self, "previous_best_score_", math.inf))
        module.epoch_listeners.append(keeper)
        device = self._device()
        max_time = None if self.max_time_s is None else {"seconds": float(self.max_time_s)}
        t0 = time.perf_counter()
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=int(self.max_epochs),
            max_time=max_time, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=bool(self.progress), num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            # without a validation set the module's validation_step is simply unused
            warnings.filterwarnings("ignore", message=".*validation_step.*val_dataloader")
            trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
        network = module.network.to("cpu").eval()
        if keeper.best_state is not None:
            network.load_state_dict(keeper.best_state)
        elif previous is not None and math.isfinite(keeper.best):
            network.load_state_dict(previous.state_dict())  # no epoch beat the previous best
        self.network_ = network
        self.history_ = list(module.history)
        self.best_epoch_ = keeper.best_epoch
        self.fit_time_s_ = time.perf_counter() - t0
        if self.checkpoint_path is not None:
            self.save(self.checkpoint_path)
        return self

    def _check_fitted(self):
        if not hasattr(self, "network_"):
            raise RuntimeError("this QSMEstimator is not fitted; call fit() or QSMEstimator.load() first")

    @torch.no_grad()
    def predict(self, field, mask=None, *, voxel_size: Sequence[float] | None = None,
                b0_dir: Sequence[float] | None = None, patch_size: int | None = None, overlap: int = 16,
                device: str | None = None) -> np.ndarray:
        """chi (ppm) from a local field (ppm), ``(X, Y, Z)`` or ``(N, X, Y, Z)``.

        The whole volume is padded to a multiple of ``2**(levels - 1)`` and passed at once,
        unless ``patch_size`` is given: then overlapping cubes (step ``patch_size - overlap``)
        are predicted and averaged with a weight that tapers towards the cube edges.
        ``voxel_size`` and ``b0_dir`` default to the training ones (the TKD input channel
        needs them). The result is zero outside ``mask``.
        """
        self._check_fitted()
        field = np.asarray(field, dtype=np.float32)
        single = field.ndim == 3
        if field.ndim not in (3, 4):
            raise ValueError(f"field must be (X, Y, Z) or (N, X, Y, Z), got shape {field.shape}")
        if not np.all(np.isfinite(field)):
            raise ValueError("field contains NaN or inf")
        batch = field[None] if single else field
        if mask is not None:
            mask = np.asarray(mask) != 0
            if mask.shape != field.shape[-3:] and mask.shape != field.shape:
                raise ValueError(f"mask shape {mask.shape} does not match field shape {field.shape}")
        voxel_size = self.voxel_size_ if voxel_size is None else tuple(voxel_size)
        b0_dir = self.b0_dir_ if b0_dir is None else tuple(b0_dir)
        inputs = self._input_stack(batch, mask, self.normalisation_, voxel_size, b0_dir)
        dev = torch.device(device) if device is not None else self._device()
        net = self.network_.to(dev).eval()
        outs = []
        for x in inputs:
            if patch_size is None:
                xp, crop = pad_to_multiple(x, net.size_multiple)
                y = _network_chi(net, torch.as_tensor(xp[None], device=dev), self.residual_channel_)[0].cpu().numpy()[crop]
            else:
                y = self._predict_patches(net, x, int(patch_size), int(overlap), dev, self.residual_channel_)
            outs.append(y * self.normalisation_.chi_scale)
        chi = np.stack(outs).astype(np.float32)
        if mask is not None:
            chi = chi * mask
        return chi[0] if single else chi

    @staticmethod
    def _predict_patches(net, x: np.ndarray, patch: int, overlap: int, dev, residual_channel=None) -> np.ndarray:
        if patch % net.size_multiple:
            raise ValueError(f"patch_size must be a multiple of {net.size_multiple}, got {patch}")
        if not (0 <= overlap < patch):
            raise ValueError(f"overlap must be in [0, patch_size), got {overlap}")
        shape = x.shape[-3:]
        padded_shape = [max(s, patch) for s in shape]
        xp = np.zeros(x.shape[:-3] + tuple(padded_shape), dtype=np.float32)
        xp[..., : shape[0], : shape[1], : shape[2]] = x
        step = patch - overlap
        starts = [sorted(set(list(range(0, s - patch + 1, step)) + [s - patch])) for s in padded_shape]
        ramp = np.minimum(np.arange(patch) + 1, np.arange(patch)[::-1] + 1).astype(np.float32)
        ramp = np.minimum(ramp, overlap // 2 + 1) if overlap else np.ones(patch, np.float32)
        w = ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]
        acc = np.zeros(padded_shape, np.float32)
        wsum = np.zeros(padded_shape, np.float32)
        for i in starts[0]:
            for j in starts[1]:
                for k in starts[2]:
                    cube = xp[..., i : i + patch, j : j + patch, k : k + patch]
                    y = _network_chi(net, torch.as_tensor(cube[None], device=dev), residual_channel)[0].cpu().numpy()
                    acc[i : i + patch, j : j + patch, k : k + patch] += w * y
                    wsum[i : i + patch, j : j + patch, k : k + patch] += w
        return (acc / wsum)[: shape[0], : shape[1], : shape[2]]

    # -- persistence -----------------------------------------------------------------------
    def manifest(self, extra: Mapping[str, Any] | None = None) -> dict:
        self._check_fitted()
        params = self.get_params()
        params["checkpoint_path"] = None if params["checkpoint_path"] is None else str(params["checkpoint_path"])
        out = {
            "kind": "qsm_unet",
            "estimator": "QSMEstimator",
            "params": params,
            "unet": self.network_.config.to_dict(),
            "normalisation": self.normalisation_.to_dict(),
            "voxel_size": list(self.voxel_size_),
            "b0_dir": list(self.b0_dir_),
            "train_fingerprint": self.train_fingerprint_,
            "train_spec": self.train_spec_,
            "validation_fingerprint": getattr(self, "validation_fingerprint_", None),
            "history": getattr(self, "history_", []),
            "best_epoch": getattr(self, "best_epoch_", None),
            "n_parameters": self.network_.n_parameters(),
            "versions": package_versions(),
            "device": device_info(self._device()),
        }
        if extra:
            out.update(extra)
        return out

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the network and its manifest as a model bundle folder (atomically)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.network_.state_dict().items()}
        return save_bundle(path, state, self.manifest(extra))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "QSMEstimator":
        """Load a bundle written by :meth:`save` (checksum verified, no code executed)."""
        manifest = read_manifest(path)
        if manifest.get("kind") != "qsm_unet":
            raise ValueError(f"{path} is not a QSM U-Net bundle (kind={manifest.get('kind')!r})")
        state, manifest = load_bundle(path)
        params = dict(manifest["params"])
        params["inputs"] = tuple(params["inputs"])
        if device is not None:
            params["device"] = device
        est = cls(**params)
        net = UNet3D(UNet3DConfig.from_dict(manifest["unet"]))
        net.load_state_dict(state)
        est.network_ = net.eval()
        est.normalisation_ = QSMNormalisation.from_dict(manifest["normalisation"])
        est.voxel_size_ = tuple(manifest["voxel_size"])
        est.b0_dir_ = tuple(manifest["b0_dir"])
        est.train_fingerprint_ = manifest["train_fingerprint"]
        est.train_spec_ = manifest.get("train_spec")
        est.validation_fingerprint_ = manifest.get("validation_fingerprint")
        est.history_ = manifest.get("history", [])
        est.best_epoch_ = manifest.get("best_epoch")
        est.manifest_ = manifest
        return est
