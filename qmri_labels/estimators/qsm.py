"""The QSM U-Net estimator (scikit-learn's contract, model-bundle persistence).

The network input is the normalised field and, by default, a TKD estimate computed from the
same field (``inputs=("field", "tkd")``); ``"tv"`` adds the TV inversion (the strongest
conventional baseline) as a channel. With ``residual`` the network learns a correction of
the TV (else TKD) channel. ``inputs=("field",)`` is Graf et al.'s and QSMnet's setting.

Training uses random patches (``patch_size``) of larger volumes, or whole volumes
(``patch_size=None``); for patches the field-consistency term is an approximation (QSMnet+
makes the same one), with whole volumes it is exact.

``n_members=M`` trains a deep ensemble: M U-Nets, member ``k`` seeded with ``seed + k`` and
otherwise trained exactly as a single network with that seed (same data, same normalisation),
saved in one bundle; ``predict(..., return_sd=True, sd_kind="label")`` adds the SD of the members' chi.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qmri_labels.data.qsm import QSMPhantomSet
from qmri_labels.estimators.base import SD_KINDS, BaseEstimator, SDNotCalibrated
from qmri_labels.estimators.bundle import build_manifest, load_estimator, save_estimator
from qmri_labels.estimators.shipped import bundle_path
from qmri_labels.estimators.qsm_training import train_member
from qmri_labels.fitting.qsm_inversion import TV_DEFAULT_LAMBDA, cosmos, tkd, tv
from qmri_labels.nets.ensemble import DeepEnsemble, check_n_members, combine_members, members_of
from qmri_labels.nets.unet3d import UNet3D, UNet3DConfig, unet3d_preset
from qmri_labels.provenance import device_info, package_versions
from qmri_labels.training.qsm.data import pad_to_multiple
from qmri_labels.training.qsm.inputs import input_kind_of
from qmri_labels.training.qsm.loss import QSMNormalisation, qsm_loss_weights
from qmri_labels.training.qsm.module import network_chi

__all__ = ["QSMEstimator", "INPUT_CHANNELS", "RESIDUAL_CHANNELS"]

INPUT_CHANNELS = ("field", "tkd", "tv")
#: input channels that a residual network adds its output to (the first one present wins)
RESIDUAL_CHANNELS = ("tv", "tkd")


class QSMEstimator(BaseEstimator):
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
    accelerator, devices, num_nodes, strategy
        Lightning's ``Trainer`` arguments, as for
        :class:`~qmri_labels.estimators.NetworkEstimator` (``accelerator=None``: from
        ``device``). ``devices=2, strategy="ddp"`` trains on two processes: rank ``r`` of ``W``
        takes patches ``r::W`` of each epoch's seeded draw (``batch_size`` and
        ``samples_per_epoch`` are global and must divide by ``W``), every step averages the
        gradients over all ranks weighted by their masked voxels, the best epoch is chosen on
        losses reduced over ranks, and only rank 0 writes (``save``, ``checkpoint_path``).
        On GPUs batch norm is synchronised over ranks (``SyncBatchNorm``); on CPU processes,
        where PyTorch has no synchronised batch norm, each rank normalises with its own
        ``batch_size / W`` patches and the running statistics kept are rank 0's.
    n_members : int
        Members of a deep ensemble: M U-Nets, member ``k`` initialised and fed patches with
        ``seed + k`` and otherwise trained exactly as a single network of that seed (the same
        normalisation, inputs and epochs; the best epoch is kept per member), one after
        another, each with its own ``Trainer`` (also under DDP). ``predict`` returns the mean
        chi of the members and, with ``return_sd=True``, their SD (``ddof=0``, the spread of
        the mixture; :func:`~qmri_labels.nets.ensemble.combine_members`): an epistemic
        uncertainty, the members' disagreement, not the noise in the field. All members are
        saved in one bundle. 1 (default): a single network, as before this option existed.
        ``checkpoint_path`` needs a single network.

    Attributes (after fit)
    ----------------------
    network_ : UNet3D, or DeepEnsemble of UNet3D members (``n_members > 1``)
    normalisation_ : QSMNormalisation
    history_ : list of dict (epoch, train_loss, val_loss, val_nrmse, time_s)
        Of the (first) member.
    best_epoch_ : int
        Of the (first) member.
    members_training_ : list of dict (``n_members > 1`` only)
        Per member: ``seed``, ``best_epoch``, ``history``.
    voxel_size_ : tuple
    train_fingerprint_ : str
    global_rank_, world_size_ : int
        This process's rank and the number of processes of the fit (0 and 1 without DDP).
    """

    def __init__(self, label: str = "gt", alpha: float | None = None, field_weight: float = 1.0,
                 preset: str = "graf", unet: Mapping[str, Any] | None = None, inputs: Sequence[str] = ("field", "tkd"),
                 residual: bool = True, tkd_threshold: float = 0.19, tv_lambda: float = TV_DEFAULT_LAMBDA,
                 patch_size: int | None = 32, samples_per_epoch: int = 64,
                 batch_size: int = 2, max_epochs: int = 10, max_time_s: float | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.01, seed: int = 0, device: str | None = None, progress: bool = False,
                 checkpoint_path: str | Path | None = None, warm_start: bool = False, accelerator: str | None = None,
                 devices: Any = 1, num_nodes: int = 1, strategy: Any = "auto", n_members: int = 1):
        self.label = label
        self.alpha = alpha
        self.field_weight = field_weight
        self.preset = preset
        self.unet = unet
        self.inputs = inputs
        self.residual = residual
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
        self.warm_start = warm_start
        self.accelerator = accelerator
        self.devices = devices
        self.num_nodes = num_nodes
        self.strategy = strategy
        self.n_members = n_members

    @property
    def _inputs(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def _validate(self):
        qsm_loss_weights(self.label, self.alpha, self.field_weight)
        if isinstance(self.inputs, str) or not self._inputs or any(c not in INPUT_CHANNELS for c in self._inputs) \
                or len(set(self._inputs)) != len(self._inputs):
            raise ValueError(f"inputs must be a non-empty tuple of distinct names from {INPUT_CHANNELS}, "
                             f"got {self.inputs!r}")
        if self.patch_size is not None and int(self.patch_size) < 1:
            raise ValueError(f"patch_size must be None or >= 1, got {self.patch_size}")
        for name in ("samples_per_epoch", "batch_size", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.accelerator is not None and not isinstance(self.accelerator, str):
            raise TypeError(f"accelerator must be a string or None, got {self.accelerator!r}")
        if int(self.num_nodes) < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if check_n_members(self.n_members) > 1 and self.checkpoint_path is not None:
            raise ValueError("checkpoint_path writes one network's best epoch during training; with n_members > 1 "
                             "leave it None and write the whole ensemble with save() after fit")

    def _unet_config(self) -> UNet3DConfig:
        return unet3d_preset(self.preset, in_channels=len(self._inputs), out_channels=1, **dict(self.unet or {}))

    @property
    def residual_channel_(self) -> int | None:
        if not self.residual:
            return None
        for name in RESIDUAL_CHANNELS:
            if name in self._inputs:
                return self._inputs.index(name)
        return None

    def _accelerator(self) -> str:
        if self.accelerator is not None:
            return self.accelerator
        return "gpu" if self._device().type == "cuda" else "cpu"

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _input_stack(self, field: np.ndarray, mask, norm: QSMNormalisation, voxel_size, b0_dir,
                     tv_input=None) -> np.ndarray:
        chans = []
        for c in self._inputs:
            if c == "field":
                chans.append(field / norm.field_scale)
            elif c == "tkd":
                chans.append(tkd(field, voxel_size, b0_dir, self.tkd_threshold) / norm.chi_scale)
            else:
                if tv_input is not None:
                    chans.append(tv_input / norm.chi_scale)
                    continue
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
    def fit(self, X: QSMPhantomSet, y=None, *, validation: QSMPhantomSet | None = None) -> "QSMEstimator":
        """Train on phantoms, optionally validating on others.

        The best epoch by validation loss (training loss without validation data) is kept,
        per member of an ensemble (``n_members``).

        Parameters
        ----------
        X : QSMPhantomSet
            Training phantoms: the fields the network reads and the chi (and, for COSMOS
            labels, the orientations) it learns, together.
        y : None
            The labels travel in ``X``; accepted for scikit-learn's ``fit(X, y)`` order.
        validation : QSMPhantomSet or None
            Phantoms that choose the best epoch.

        Returns
        -------
        self
        """
        self._validate()
        if not isinstance(X, QSMPhantomSet):
            raise ValueError(f"fit expects a QSMPhantomSet, got {type(X).__name__}")
        if y is not None:
            hint = " (give validation phantoms as validation=...)" if isinstance(y, QSMPhantomSet) else ""
            raise ValueError(f"QSMEstimator.fit takes its labels from the phantom set, not from y{hint}")
        data = X
        n_members = int(self.n_members)
        weights = qsm_loss_weights(self.label, self.alpha, self.field_weight)
        b0 = data.orientations[0]
        field = data.field
        tkd_train = tkd(field, data.voxel_size, b0, self.tkd_threshold)
        m = data.mask
        field_scale = float(np.sqrt(np.mean(field[m] ** 2)))
        chi_scale = float(np.sqrt(np.mean(tkd_train[m] ** 2)))
        norm = QSMNormalisation(field_scale, chi_scale)
        previous = self._members() if self.warm_start and hasattr(self, "network_") else None
        if previous is not None:
            if len(previous) != n_members:
                raise ValueError(f"warm_start: the fitted estimator has {len(previous)} member(s), this one asks "
                                 f"for n_members={n_members}")
            norm = self.normalisation_

        # the inputs (TKD/TV channels, COSMOS labels) do not depend on the seed: computed once
        # for all members
        arrays = self._arrays(data, norm, weights)
        val_arrays = None if validation is None else self._arrays(validation, norm, weights)
        self.normalisation_ = norm
        self.voxel_size_ = tuple(float(v) for v in data.voxel_size)
        self.b0_dir_ = tuple(float(v) for v in b0)
        self.train_fingerprint_ = data.fingerprint
        # with ``bfr`` when the fields are the local fields a BFR method left: the input kind
        self.train_spec_ = data.spec_record()
        self.input_kind_ = input_kind_of(self.train_spec_)
        self.validation_fingerprint_ = None if validation is None else validation.fingerprint

        # a resumed single network keeps its previous best unless an epoch beats it
        previous_best = float(getattr(self, "previous_best_score_", math.inf)) if n_members == 1 else math.inf
        runs = [train_member(self, int(self.seed) + k, arrays, val_arrays, norm, weights, data, b0,
                             None if previous is None else previous[k], previous_best)
                for k in range(n_members)]
        members = [run["network"] for run in runs]
        self.global_rank_, self.world_size_ = runs[0]["rank"], runs[0]["world_size"]
        self.network_ = members[0] if n_members == 1 else DeepEnsemble(members).eval()
        self.history_ = runs[0]["history"]
        self.best_epoch_ = runs[0]["best_epoch"]
        if n_members > 1:
            self.members_training_ = [{"seed": run["seed"], "best_epoch": run["best_epoch"], "history": run["history"]}
                                      for run in runs]
        else:
            self.__dict__.pop("members_training_", None)  # a refit as a single network
        self.fit_time_s_ = float(sum(run["time_s"] for run in runs))
        if self.checkpoint_path is not None:
            self.save(self.checkpoint_path)
        return self

    def _members(self) -> list[UNet3D]:
        """The fitted U-Nets (one for a single network)."""
        self._check_fitted()
        return members_of(self.network_)

    @property
    def n_fitted_members(self) -> int:
        """U-Nets of the fitted (or loaded) estimator: 1, or the members of an ensemble."""
        return len(self._members())

    @property
    def reports_sd(self) -> bool:
        """Whether ``predict(..., return_sd=True)`` works: a fitted ensemble of >= 2 members."""
        return self.n_fitted_members > 1

    def _check_fitted(self):
        if not hasattr(self, "network_"):
            raise ValueError("this QSMEstimator is not fitted yet: call fit(phantoms) or load(path)")

    @torch.no_grad()
    def predict(self, field, mask=None, *, voxel_size: Sequence[float] | None = None,
                b0_dir: Sequence[float] | None = None, patch_size: int | None = None, overlap: int = 16,
                device: str | None = None, return_sd: bool = False, sd_kind: str = "truth", tv_input=None):
        """chi (ppm) from a local field (ppm), ``(X, Y, Z)`` or ``(N, X, Y, Z)``.

        The whole volume is padded to a multiple of ``2**(levels - 1)`` and passed at once,
        unless ``patch_size`` is given: then overlapping cubes (step ``patch_size - overlap``)
        are predicted and averaged with a weight that tapers towards the cube edges.
        ``voxel_size`` and ``b0_dir`` default to the training ones (the TKD input channel
        needs them). The result is zero outside ``mask``.

        Parameters
        ----------
        return_sd : bool
            Also return the SD of chi over the members of an ensemble (``n_members >= 2``;
            ``ddof=0``, see :func:`~qmri_labels.nets.ensemble.combine_members`), in ppm, the
            shape of chi, zero outside ``mask``. A single network reports none (ValueError).
        sd_kind : {"truth", "label"}
            The members' disagreement is not calibrated against the true chi (it leaves out
            the noise in the field and what every member gets wrong alike), so
            ``return_sd=True`` needs ``sd_kind="label"``, asking for it by that name;
            ``"truth"`` raises :class:`~qmri_labels.estimators.base.SDNotCalibrated`.
        tv_input : array or None
            The TV inversion of ``field`` (its shape) at this network's ``tv_lambda``, for a
            caller that has computed it already (e.g. as a TV baseline with the same weight): the
            ``tv`` input channel is then taken from it instead of being computed again. Refused
            for a network without that channel.

        Returns
        -------
        chi : ndarray float32
            The mean over the members for an ensemble.
        sd : ndarray float32
            Only with ``return_sd=True``.
        """
        self._check_fitted()
        if not isinstance(return_sd, (bool, np.bool_)):
            raise TypeError(f"return_sd must be True or False, got {return_sd!r}")
        members = self._members()
        if sd_kind not in SD_KINDS:
            raise ValueError(f"sd_kind must be one of {SD_KINDS}, got {sd_kind!r}")
        if return_sd and len(members) < 2:
            raise ValueError("this QSM network is a single U-Net and reports no standard deviation: train a deep "
                             "ensemble, QSMEstimator(..., n_members=M) with M >= 2, for return_sd=True")
        if return_sd and sd_kind == "truth":
            raise SDNotCalibrated("a QSM ensemble's SD is the members' disagreement, never calibrated against the "
                                  "true chi: it is not an error bar. Ask for it by that name with sd_kind='label' "
                                  "(qmri-fit --sd-kind label)")
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
        # the input channels (TKD, TV) are computed once and shared by all members
        if tv_input is not None:
            if "tv" not in self._inputs:
                raise ValueError(f"tv_input is for a network with a 'tv' input channel; this one reads {self._inputs}")
            tv_input = np.asarray(tv_input, dtype=np.float32)
            if tv_input.shape != field.shape:
                raise ValueError(f"tv_input shape {tv_input.shape} differs from the field's {field.shape}")
            tv_input = tv_input[None] if single else tv_input
        inputs = self._input_stack(batch, mask, self.normalisation_, voxel_size, b0_dir, tv_input)
        dev = torch.device(device) if device is not None else self._device()
        nets = [member.to(dev).eval() for member in members]
        outs, sds = [], []
        for x in inputs:
            chis = [self._predict_volume(net, x, patch_size, overlap, dev) * self.normalisation_.chi_scale
                    for net in nets]
            if len(chis) == 1:
                outs.append(chis[0])
                continue
            mean, sd = combine_members(np.stack(chis).astype(np.float64), axis=0)
            outs.append(mean)
            sds.append(sd)
        chi = np.stack(outs).astype(np.float32)
        sd = np.stack(sds).astype(np.float32) if return_sd else None
        if mask is not None:
            chi = chi * mask
            sd = None if sd is None else sd * mask
        if not return_sd:
            return chi[0] if single else chi
        return (chi[0], sd[0]) if single else (chi, sd)

    def _predict_volume(self, net: UNet3D, x: np.ndarray, patch_size: int | None, overlap: int, dev) -> np.ndarray:
        """One network's normalised chi of one input stack ``(C, X, Y, Z)``: whole (padded) or in patches."""
        if patch_size is None:
            xp, crop = pad_to_multiple(x, net.size_multiple)
            chi = network_chi(net, torch.as_tensor(xp[None], device=dev), self.residual_channel_)
            return chi[0].cpu().numpy()[crop]
        return self._predict_patches(net, x, int(patch_size), int(overlap), dev, self.residual_channel_)

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
                    y = network_chi(net, torch.as_tensor(cube[None], device=dev), residual_channel)[0].cpu().numpy()
                    acc[i : i + patch, j : j + patch, k : k + patch] += w * y
                    wsum[i : i + patch, j : j + patch, k : k + patch] += w
        return (acc / wsum)[: shape[0], : shape[1], : shape[2]]

    # -- persistence -----------------------------------------------------------------------
    def manifest(self, extra: Mapping[str, Any] | None = None) -> dict:
        """The bundle manifest of this fitted network (see :mod:`qmri_labels.estimators.bundle`)."""
        self._check_fitted()
        params = self.get_params()
        params["checkpoint_path"] = None if params["checkpoint_path"] is None else str(params["checkpoint_path"])
        params["inputs"] = list(self._inputs)
        for key in ("devices", "strategy"):
            if not isinstance(params[key], (str, int, float, bool, list, type(None))):
                params[key] = str(params[key])
        record = {
            "normalisation": self.normalisation_.to_dict(),
            "voxel_size": list(self.voxel_size_),
            "b0_dir": list(self.b0_dir_),
            "train_fingerprint": self.train_fingerprint_,
            "train_spec": self.train_spec_,
            "input_kind": getattr(self, "input_kind_", input_kind_of(self.train_spec_)),
            "validation_fingerprint": getattr(self, "validation_fingerprint_", None),
            "history": getattr(self, "history_", []),
            "best_epoch": getattr(self, "best_epoch_", None),
            "n_parameters": sum(member.n_parameters() for member in self._members()),
            "versions": package_versions(),
            "device": device_info(self._device()),
            "world_size": int(getattr(self, "world_size_", 1)),
        }
        if getattr(self, "members_training_", None):
            record["ensemble"] = {"n_members": len(self._members()), "members": self.members_training_}
        # the architecture of every member (an ensemble's weights are saved under
        # ``members.<k>.`` prefixes, DeepEnsemble's state_dict)
        return build_manifest(type(self), params, self._members()[0].config.to_dict(), record, extra)

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the network and its manifest as a model bundle folder (atomically).

        After a distributed fit only rank 0 writes (every rank holds the same weights); the
        other ranks return the path without touching it.
        """
        if getattr(self, "global_rank_", 0) != 0:
            return Path(path)
        return save_estimator(self, path, self.manifest(extra))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "QSMEstimator":
        """Load a bundle written by :meth:`save`, from its folder or by the name of a shipped
        network (checksum verified, no code executed)."""
        path = bundle_path(path)
        state, manifest = load_estimator(cls, path)
        params = dict(manifest["params"])
        params["inputs"] = tuple(params["inputs"])
        if device is not None:
            params["device"] = device
        est = cls(**params)
        # bundles written before ensembles existed hold one network (n_members absent: 1)
        n_members = check_n_members(params.get("n_members", 1))
        config = UNet3DConfig.from_dict(manifest["network"])
        net = UNet3D(config) if n_members == 1 else DeepEnsemble([UNet3D(config) for _ in range(n_members)])
        net.load_state_dict(state)
        est.network_ = net.eval()
        if n_members > 1:
            est.members_training_ = list(manifest.get("ensemble", {}).get("members", []))
        est.normalisation_ = QSMNormalisation.from_dict(manifest["normalisation"])
        est.voxel_size_ = tuple(manifest["voxel_size"])
        est.b0_dir_ = tuple(manifest["b0_dir"])
        est.train_fingerprint_ = manifest["train_fingerprint"]
        est.train_spec_ = manifest.get("train_spec")
        # bundles written before the kind was recorded were trained on unmasked local fields
        est.input_kind_ = str(manifest.get("input_kind", "local_unmasked"))
        est.validation_fingerprint_ = manifest.get("validation_fingerprint")
        est.history_ = manifest.get("history", [])
        est.best_epoch_ = manifest.get("best_epoch")
        est.manifest_ = manifest
        return est
