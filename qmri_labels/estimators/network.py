"""A voxel-wise network trained under a chosen training label: :class:`NetworkEstimator`.

It trains with Lightning under a label (``gt``, ``mle``, ``self``, ``hybrid`` or a weighted
sum), predicts ``(..., P)`` float32 parameters for NumPy signals ``(..., M)``, and saves to /
loads from a model bundle that carries everything needed to predict. Its designs and settings
check live in :mod:`~qmri_labels.estimators.network_design`, its training rows and Lightning
run in :mod:`~qmri_labels.estimators.network_training`.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from qmri_labels.data.datasets import Dataset
from qmri_labels.data.preprocessing import SignalPreprocessing, for_training_signals, from_manifest, lowest_b_mean
from qmri_labels.estimators.base import SD_KINDS, BaseEstimator, SDNotCalibrated, as_signals
from qmri_labels.estimators.bundle import build_manifest, estimator_kind, load_estimator, save_estimator
from qmri_labels.estimators.network_design import DESIGN_PRESETS, check_settings, network_config, new_network
from qmri_labels.estimators.network_record import json_params, network_record, restore_fitted
from qmri_labels.estimators.shipped import bundle_path
from qmri_labels.estimators.network_training import train_one, training_data
from qmri_labels.nets.ensemble import DeepEnsemble, combine_members, members_of
from qmri_labels.nets.heteroscedastic import HeteroscedasticNet
from qmri_labels.physics import get_model
from qmri_labels.provenance import device_info
from qmri_labels.training import ParameterNormalisation, method_name
from qmri_labels.training.likelihood_losses import signal_space_sd

class NetworkEstimator(BaseEstimator):
    """A voxel-wise network trained under a chosen training label.

    Parameters
    ----------
    label : {"gt", "mle", "self", "hybrid", "weighted", "mle_approx", "bias_reduced"}
        Training label (see :mod:`qmri_labels.training.labels`).
    alpha : float in [0, 1]
        MLE weight of the ``hybrid`` loss ``alpha * L_mle + (1 - alpha) * L_gt``.
    weights : dict or None
        Term weights ``{"gt", "mle", "self"}`` of the ``weighted`` loss; ``bias_reduced``'s
        ``{"variance": lambda, "draws": K}``; for the other labels, parameter weights
        (``{"Dstar": 4}``: the parameter terms weighted toward D*; see
        :func:`qmri_labels.training.labels.parameter_weights`).
    hidden_layers : int
    width : int or None
        Hidden width; ``None``: the number of measurements.
    activation : str
    output : {"sigmoid", "clamp", "identity"}
        Mapping of the outputs into ``output_bounds``.
    output_bounds : array-like (2, P) or None
        ``None``: the model's default (fitter) bounds, so MLE labels are reachable.
    standardise_inputs : bool
        Standardise each measurement by the training signals' mean and SD (stored in the net).
    lr, weight_decay : float
    optimiser : {"adam", "adamw", "sgd"}
    batch_size : int
        Optimiser batch size (under DDP: over all processes together).
    batches_per_block : int
        Batches handed to Lightning per call and stepped through inside it (same updates as
        one call per batch; amortises Lightning's per-call overhead, see
        ``benchmarks/train_throughput.py``).
    max_epochs, patience : int
        Early stopping on the validation loss after ``patience`` epochs without improvement;
        the best epoch's weights are kept.
    min_delta : float
        Smallest improvement that resets the patience counter.
    val_fraction : float
    seed : int
        Seeds the train/validation split; also the weight init and batch order unless
        ``init_seed`` / ``shuffle_seed`` are given (so one source can vary alone).
    init_seed, shuffle_seed : int or None
    accelerator, devices, num_nodes, strategy, precision
        Passed to ``lightning.Trainer`` (e.g. ``accelerator="gpu", devices=4, strategy="ddp"``);
        one device by default, so that ``fit`` never relaunches the calling script. Under
        DDP ``batch_size`` is the batch of one step over all processes and every rank ends
        with the same weights (see the guide's "Scaling out").
    deterministic : bool
        ``torch.use_deterministic_algorithms`` during training (Lightning's flag).
    benchmark : bool or None
        cuDNN benchmarking during training (Lightning's flag); ``None``: Lightning's default
        (off when ``deterministic``).
    record_step_losses : bool
        Keep the loss of every optimiser step in ``step_losses_``.
    num_threads : int or None
        CPU threads of torch during training (restored afterwards); ``None``: unchanged. Small
        networks train fastest on one thread.
    progress : bool
        Lightning's progress bar.
    mle_options : dict or None
        Settings of the MLE labels (``noise``, ``sigma``, ``bounds``, ``n_starts``, ``device``,
        ``cache``); see :func:`qmri_labels.training.compute_mle_labels`.
    parallel : bool
        One sub-network per parameter (IVIM-NET's design) instead of one shared network.
    batch_norm : bool
        Batch normalisation after every hidden layer.
    dropout : float in [0, 1)
        Dropout after every hidden layer but the last.
    bounds_margin : float in [0, 1]
        ``output_bounds`` widened by this fraction of each range at both ends (IVIM-NET: 0.3).
    fit_s0 : bool
        Estimate the signal scale S0; ``False`` fixes it at 1 (signals normalised by S0).
    lr_schedule : {None, "plateau", "cosine"}
        Learning-rate schedule (see :mod:`qmri_labels.training.schedules`).
    warm_start : bool
        Continue training the fitted network (e.g. a shipped one) instead of starting from new
        weights: fine-tuning. The input standardisation of the network is kept.
    uncertainty : {None, "heteroscedastic", "variance_head"}
        ``"heteroscedastic"``: add a log-variance branch
        (:class:`~qmri_labels.nets.heteroscedastic.HeteroscedasticNet`) trained with the
        Gaussian negative log-likelihood of the label
        (:class:`~qmri_labels.training.likelihood_losses.HeteroscedasticLabelLoss`). The SD
        ``predict`` reports is the error bar against the *truth*: the raw SD below times a
        per-parameter factor calibrated on the validation split where the truth is known
        (``uncertainty_["sd_scale"]``, :attr:`sd_kind` ``"truth"``); without the truth the raw
        SD is given only as ``sd_kind="label"``. The raw SD: for
        ``gt`` / ``mle`` / ``hybrid`` labels the expected error *to that
        label* (for MLE labels: to the MLE, not to the truth). The ``self`` label has no
        parameter target: the branch learns the per-voxel *signal* noise level (signal-space
        Gaussian or Rician likelihood, the training data's noise model) and the raw SD is
        the Cramer-Rao (Fisher) SD at the predicted parameters for that noise level, the spread
        an efficient estimator would have there, not the network's own error (``inf`` where a
        parameter is not identifiable, e.g. D* at f = 0). Whether any of these is calibrated
        against the truth is measured by :mod:`qmri_labels.analysis.calibration`. The
        likelihood also trains the mean, so the point estimates differ from a plain network's.
        ``"variance_head"``: the same branch and the same meaning of the SD per label, but the
        mean is trained by the plain label loss alone and the branch by the likelihood at the
        *detached* mean (:class:`~qmri_labels.training.likelihood_losses.VarianceHeadLoss`);
        early stopping watches the plain loss. With the same seeds the point estimates are
        bit-identical to ``uncertainty=None``'s, so a label comparison stays one factor at a time.
    n_members : int
        Members of a deep ensemble (M independently trained networks, member ``k`` with
        ``init_seed + k`` and ``shuffle_seed + k``, the same train/validation split);
        ``predict`` returns the mean of the members and, with ``return_sd``, the SD of the
        mixture (member variances plus the spread of the member means;
        :func:`~qmri_labels.nets.ensemble.combine_members`). 1: a single network.

    Every option is recorded in the bundle's ``training_config`` and restored by :meth:`load`;
    :data:`DESIGN_PRESETS` names published designs (``NetworkEstimator.from_preset``).
    """

    def __init__(self, label: str = "gt", alpha: float = 0.5, weights: Mapping[str, float] | None = None,
                 hidden_layers: int = 3, width: int | None = None, activation: str = "elu", output: str = "sigmoid",
                 output_bounds=None, standardise_inputs: bool = True, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimiser: str = "adam", batch_size: int = 256, batches_per_block: int = 32,
                 max_epochs: int = 100, patience: int = 10,
                 min_delta: float = 0.0, val_fraction: float = 0.1, seed: int = 0, init_seed: int | None = None,
                 shuffle_seed: int | None = None, accelerator: str = "auto", devices: Any = 1,
                 num_nodes: int = 1, strategy: Any = "auto", precision: Any = "32-true", deterministic: bool = True,
                 benchmark: bool | None = None, record_step_losses: bool = False, num_threads: int | None = None,
                 progress: bool = True, mle_options: Mapping | None = None, parallel: bool = False,
                 batch_norm: bool = False, dropout: float = 0.0, bounds_margin: float = 0.0, fit_s0: bool = True,
                 lr_schedule: str | None = None, warm_start: bool = False, uncertainty: str | None = None,
                 n_members: int = 1):
        self.label = label
        self.alpha = alpha
        self.weights = weights
        self.hidden_layers = hidden_layers
        self.width = width
        self.activation = activation
        self.output = output
        self.output_bounds = output_bounds
        self.standardise_inputs = standardise_inputs
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimiser = optimiser
        self.batch_size = batch_size
        self.batches_per_block = batches_per_block
        self.max_epochs = max_epochs
        self.patience = patience
        self.min_delta = min_delta
        self.val_fraction = val_fraction
        self.seed = seed
        self.init_seed = init_seed
        self.shuffle_seed = shuffle_seed
        self.accelerator = accelerator
        self.devices = devices
        self.num_nodes = num_nodes
        self.strategy = strategy
        self.precision = precision
        self.deterministic = deterministic
        self.benchmark = benchmark
        self.record_step_losses = record_step_losses
        self.num_threads = num_threads
        self.progress = progress
        self.mle_options = mle_options
        self.parallel = parallel
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.bounds_margin = bounds_margin
        self.fit_s0 = fit_s0
        self.lr_schedule = lr_schedule
        self.warm_start = warm_start
        self.uncertainty = uncertainty
        self.n_members = n_members

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "NetworkEstimator":
        """An estimator with a named design of :data:`DESIGN_PRESETS`; ``overrides`` win."""
        if preset not in DESIGN_PRESETS:
            raise ValueError(f"unknown design preset {preset!r}; known: {sorted(DESIGN_PRESETS)}")
        return cls(**{**DESIGN_PRESETS[preset], **overrides})

    # -- identity -----------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return method_name(self.label, self.alpha, self.weights)

    def describe(self) -> dict:
        """What a map's provenance records about the network: kind, method (its training
        label) and protocol."""
        self._check_fitted()
        return {"kind": "network", "name": "network", "method": self.method_name,
                "protocol": [float(b) for b in self.protocol_]}

    def _check_fitted(self):
        if not hasattr(self, "network_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(dataset) or load(path)")

    def _members(self) -> list:
        """The fitted network's members (one for a single network)."""
        return members_of(self.network_)

    def _fitted_members(self) -> int:
        return len(self._members())

    def _fitted_uncertainty(self) -> str | None:
        member = self._members()[0]
        return member.config["kind"] if isinstance(member, HeteroscedasticNet) else None

    @property
    def reports_sd(self) -> bool:
        """Whether the fitted network reports SDs (``predict(..., return_sd=True)``): a
        heteroscedastic head or an ensemble of more than one member."""
        self._check_fitted()
        return self._fitted_uncertainty() is not None or self._fitted_members() > 1

    @property
    def model_name(self) -> str:
        self._check_fitted()
        return self.model_name_

    @property
    def protocol(self) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self.protocol_)

    @property
    def param_names(self) -> tuple[str, ...]:
        self._check_fitted()
        return tuple(self.param_names_)

    # -- training -------------------------------------------------------------------------------
    def _validate(self) -> dict:
        weights = check_settings(self.get_params())
        if self.warm_start and hasattr(self, "network_") and (
                self.uncertainty != self._fitted_uncertainty() or int(self.n_members) != self._fitted_members()):
            raise ValueError(f"warm_start: the fitted network has uncertainty={self._fitted_uncertainty()!r}, "
                             f"n_members={self._fitted_members()}; this estimator asks for "
                             f"uncertainty={self.uncertainty!r}, n_members={self.n_members!r}")
        return weights

    def fit(self, X, y=None, *, protocol=None, bounds=None, model: str = "ivim", sigma=None,
            mle_labels=None, callbacks=()) -> "NetworkEstimator":
        """Train on a simulated :class:`Dataset` or on arrays of signals (any data).

        Parameters
        ----------
        X : Dataset or array-like (N, M)
            A dataset (signals, true parameters, noise level, protocol and prior), or signals,
            e.g. in vivo voxels, with ``protocol`` given.
        y : array-like (N, P), dict or None
            Labels for array input, in the model's parameter order: the true parameters for
            ``gt``, MLE labels for ``mle`` (computed from ``X`` with ``mle_options`` when
            ``None``), nothing for ``self``; for ``hybrid`` / ``weighted`` a dict
            ``{"gt": ..., "mle": ...}``. With a dataset, ``y`` may give its MLE labels (as
            ``mle_labels``).
        protocol : array-like (M,)
            b-values (s/mm^2) of array input.
        bounds : array-like (2, P) or None
            Parameter range of array input that normalises the parameter losses (and the
            outputs with ``output_bounds="prior"``); ``None``: the model's default bounds.
        model : str
            Signal model of array input.
        sigma : float, array-like (N,) or None
            Noise level of array input, used when MLE labels are computed here.
        mle_labels : ndarray (N, P), MLEFit, MLELabels or None
            MLE labels of ``dataset.signals``; computed (and cached) when the loss needs them
            and none are given. Rows with non-finite labels are left out of training.
        callbacks : sequence of lightning callbacks
            Further callbacks of every training run (e.g. the pruner of
            :func:`qmri_labels.search.tuning.tune`); a callback that sets ``trainer.should_stop``
            ends training early, and the best epoch so far is kept.

        Returns
        -------
        self
        """
        weights = self._validate()
        if self.warm_start and hasattr(self, "network_") and not isinstance(X, Dataset):
            X, y, sigma = self._arrays_at_training_scale(X, y, sigma, protocol)
        data = training_data(self.get_params(), weights, X, y, protocol=protocol, bounds=bounds, model=model,
                             sigma=sigma, mle_labels=mle_labels)
        normalisation = ParameterNormalisation.from_support(data.support, data.signal_model.param_names)
        self._train(data.tensors, weights, data.signal_model, data.protocol, data.support, normalisation, data.noise,
                    callbacks, truth=data.truth)
        self.n_excluded_ = data.n_excluded
        self.mle_labels_ = data.mle_info
        for key, value in data.record.items():
            setattr(self, key, value)
        return self

    def _arrays_at_training_scale(self, X, y, sigma, protocol):
        """Fine-tuning data (signals in any units) brought to the fitted network's training scale
        by its recorded preprocessing, as :meth:`predict` does: the signals, the noise level and
        the S0 of given labels divided by the same number."""
        if protocol is None:
            return X, y, sigma  # training_data names what is missing
        signals = np.asarray(X, dtype=np.float64)
        scale = self._preprocessing().scale(lowest_b_mean(signals, protocol))
        if np.ndim(scale) and not np.all(np.isfinite(scale)):
            raise ValueError("warm_start: some rows have no positive signal at the lowest b-value; their scale "
                             "cannot be known (leave them out)")
        divisor = scale if np.ndim(scale) == 0 else np.asarray(scale)[..., None]
        s0 = list(self.param_names_).index("S0") if "S0" in self.param_names_ else None

        def labels(values):
            if values is None or s0 is None:
                return values
            values = np.array(values, dtype=np.float64, copy=True)
            values[..., s0] /= scale
            return values

        y = {k: labels(v) for k, v in y.items()} if isinstance(y, Mapping) else labels(y)
        sigma = None if sigma is None else np.asarray(sigma, dtype=np.float64) / scale
        return (signals / divisor).astype(np.float32), y, sigma

    def _train(self, tensors: dict, weights: dict, signal_model, protocol, support, normalisation,
               noise: str = "rician", callbacks=(), truth=None) -> None:
        """Build (or, with ``warm_start``, reuse) the network(s) and train them on ``tensors``;
        an ensemble trains its members one after another, member ``k`` with seeds offset by ``k``.
        With the true parameters of the rows (``truth``) and a validation split, the reported SD
        is calibrated against the truth on that split (:meth:`_calibrate_sd`)."""
        start = time.perf_counter()
        seed = int(self.seed)
        init_seed = seed if self.init_seed is None else int(self.init_seed)
        shuffle_seed = seed if self.shuffle_seed is None else int(self.shuffle_seed)
        n_members = int(self.n_members)
        warm = self.warm_start and hasattr(self, "network_")
        if warm:
            if self.model_name_ != signal_model.name or len(self.protocol_) != len(protocol) or not np.allclose(
                    self.protocol_, protocol):
                raise ValueError(f"warm_start: the fitted network is for model {self.model_name_!r} with protocol "
                                 f"{self.protocol_}, the data for {signal_model.name!r} with {list(protocol)}")
            previous = self._members()
        params = self.get_params()
        members, runs = [], []
        for k in range(n_members):
            if warm:
                network = copy.deepcopy(previous[k])  # the fitted network stays as it was
            else:
                network = new_network(params, tensors["signals"], signal_model, support, normalisation, weights,
                                      init_seed + k)
            runs.append(train_one(params, network, tensors, weights, signal_model, protocol, normalisation, noise,
                                  seed, shuffle_seed + k, callbacks))
            members.append(runs[-1][0].network.to("cpu").eval())
        network = members[0] if n_members == 1 else DeepEnsemble(members).eval()
        module, trainer, keeper, data = runs[0]

        self.network_ = network
        self.history_ = list(module.history)
        self.flags_in_fit_ = module.flags_in_fit
        if module.step_losses is not None:
            # float64 holds float32 and bfloat16 losses exactly
            self.step_losses_ = np.array([float(t) for t in module.step_losses], dtype=np.float64)
        self.normalisation_ = normalisation.to_dict()
        self.loss_weights_ = weights
        # how real data must be scaled for this network (qmri_labels.data.preprocessing)
        self.preprocessing_ = for_training_signals(np.asarray(tensors["signals"]), protocol).to_dict()
        self.model_name_ = signal_model.name
        self.protocol_ = [float(b) for b in protocol]
        self.param_names_ = list(signal_model.param_names)
        self.n_train_, self.n_val_ = int(data.train_indices.numel()), int(data.n_val)
        self.best_epoch_ = keeper.best_epoch
        self.best_val_loss_ = keeper.best_score if math.isfinite(keeper.best_score) else None
        self.n_epochs_ = int(trainer.current_epoch)
        self.fit_seconds_ = time.perf_counter() - start
        self.device_ = device_info(trainer.strategy.root_device)
        # under DDP every rank holds the same weights; only rank 0 writes (see save)
        self.global_rank_, self.world_size_ = int(trainer.global_rank), int(trainer.world_size)
        self.seeds_ = {"seed": seed, "split_seed": seed, "init_seed": init_seed, "shuffle_seed": shuffle_seed}
        self.uncertainty_ = {"kind": self.uncertainty, "n_members": n_members, "noise": noise}
        if self.reports_sd:
            self.uncertainty_.update(self._calibrate_sd(tensors["signals"], truth, data.val_indices))
        if n_members > 1:
            self.seeds_["members"] = [{"init_seed": init_seed + k, "shuffle_seed": shuffle_seed + k}
                                      for k in range(n_members)]
            self.members_training_ = [
                {"best_epoch": kp.best_epoch, "best_val_loss": kp.best_score if math.isfinite(kp.best_score) else None,
                 "n_epochs": int(tr.current_epoch), "history": list(mod.history)} for mod, tr, kp, _ in runs]

    def _calibrate_sd(self, signals, truth, val_indices) -> dict:
        """The ``uncertainty`` entries that make the reported SD an error bar against the truth.

        The raw SD (the head's spread around the training label, the self label's Fisher SD,
        an ensemble's spread) is multiplied per parameter by ``sd_scale``, the RMS of
        ``(estimate - truth) / raw SD`` over the validation rows: rows that neither the mean nor
        the head trained on, whose truth is known because they are simulated. Without truth (or
        without a validation split) nothing is calibrated and the SD is given only as
        ``sd_kind="label"``.
        """
        val = np.asarray(val_indices, dtype=np.int64)
        if truth is None or val.size == 0:
            return {"sd_kind": "label"}
        estimate, raw_sd = self.predict(np.asarray(signals)[val], return_sd=True, signal_scale=1.0, sd_kind="label")
        z = (estimate.astype(np.float64) - np.asarray(truth, dtype=np.float64)[val]) / raw_sd.astype(np.float64)
        scale = []
        for column in z.T:
            column = column[np.isfinite(column)]
            scale.append(float(np.sqrt(np.mean(column ** 2))) if column.size else float("nan"))
        return {"sd_kind": "truth", "sd_scale": scale,
                "sd_calibration": {"rows": int(val.size), "on": "the validation split: held-out simulated rows "
                                   "with known truth; sd_scale = RMS of (estimate - truth) / raw SD"}}

    @property
    def sd_kind(self) -> str | None:
        """What ``predict(..., return_sd=True)`` reports by default: ``"truth"`` when the SD was
        calibrated against the truth, ``"label"`` when it was not (it is then given only when
        asked for with ``sd_kind="label"``), ``None`` when the network reports no SD."""
        if not self.reports_sd:
            return None
        return (getattr(self, "uncertainty_", None) or {}).get("sd_kind", "label")

    @property
    def sd_method(self) -> str | None:
        """What a truth-calibrated SD is, in words (what a map's sidecar says)."""
        if self.sd_kind != "truth":
            return None
        return ("standard deviation of the estimate around the true value: the network's raw SD times a "
                "per-parameter factor calibrated on held-out simulations (the validation split)")

    def label_sd_method(self) -> str:
        """What an ``sd_kind="label"`` SD is, in words."""
        if self.label == "self" and self._fitted_uncertainty() is not None:
            what = "the Cramer-Rao SD at the prediction for the learned signal noise level (self label)"
        else:
            what = f"the spread of the estimate around its training label ({self.method_name})"
        return (f"{what}, NOT calibrated against the true value; written only because it was asked for "
                "by name (sd_kind='label', qmri-fit --sd-kind label)")

    def at_training_scale(self) -> "NetworkEstimator":
        """The same fitted network reading signals that are already at its training scale (the
        toolkit's own simulations, whose S0 reference is the training data's): ``predict``'s
        ``signal_scale`` defaults to 1 instead of ``"auto"``. The weights are shared."""
        self._check_fitted()
        view = copy.copy(self)
        view.default_signal_scale_ = 1.0
        return view

    def signal_scale(self, signals):
        """The divisor that brings ``signals (..., M)`` to this network's training scale, by the
        bundle's recorded preprocessing (:mod:`qmri_labels.data.preprocessing`): one number
        for ``global_scale`` (the median lowest-b signal of all of them over the training
        reference), one per voxel for ``per_voxel_lowest_b`` (NaN where it is not positive).
        Compute it over every voxel of a scan and pass it to :meth:`predict` when predicting
        chunk by chunk."""
        self._check_fitted()
        flat, lead = as_signals(signals, len(self.protocol_))
        scale = self._preprocessing().scale(lowest_b_mean(flat, self.protocol_))
        return scale if np.ndim(scale) == 0 else np.reshape(scale, lead)

    def _preprocessing(self) -> SignalPreprocessing:
        entry = getattr(self, "preprocessing_", None)
        return SignalPreprocessing.from_dict(entry) if entry else from_manifest(None)[0]

    # -- inference ---------------------------------------------------------------------------
    def predict(self, signals, batch_size: int = 65536, device=None, return_sd: bool = False,
                signal_scale="auto", sd_kind: str = "truth"):
        """Parameters ``(..., P)`` float32 for signals ``(..., M)`` in any units.

        Parameters
        ----------
        signals : array-like (..., M)
            In the scan's units (S0 of hundreds to thousands is fine): they are brought to the
            training scale by the bundle's recorded preprocessing, and S0 (and its SD) is
            returned in the signals' units.
        batch_size : int
            Voxels per forward pass (bounds the memory).
        device : str or None
            Where to run the network (``None``: CPU).
        return_sd : bool
            Also return the SD ``(..., P)`` float32 of each estimate (see ``sd_kind``). A
            single network without a head reports none (ValueError).
        signal_scale : "auto", float or array-like (...)
            The divisor of the signals. ``"auto"``: :meth:`signal_scale` of these signals
            (``global_scale``: the median over all of them, so give a whole scan, or pass the
            scan's scale when predicting a part); a number or per-voxel array: that divisor;
            ``1``: the signals are at the training scale already (:meth:`at_training_scale`).
            With ``"auto"`` a voxel's estimate depends a little on the other voxels of the
            call (a network is not exactly invariant to the scale of its input): the shipped
            networks predicting the brightest or darkest tenth of a scan alone differ from the
            whole scan's prediction by a median 0.3-1 % in f (95th percentile 3.6-7 %), 4-18 %
            of their own error (``benchmarks/network_preprocessing.py``).
        sd_kind : {"truth", "label"}
            ``"truth"``: the SD of the estimate around the true value, calibrated on held-out
            simulations when the network was trained (:class:`SDNotCalibrated` for a network
            without that calibration, e.g. the shipped bundles). ``"label"``: the raw SD, the
            spread around the training label (self label: the Fisher SD), asked for by name.

        Returns
        -------
        params : ndarray (..., P)
        sd : ndarray (..., P)
            Only with ``return_sd=True``.
        """
        self._check_fitted()
        if not isinstance(return_sd, (bool, np.bool_)):
            raise TypeError(f"return_sd must be True or False, got {return_sd!r}")
        if sd_kind not in SD_KINDS:
            raise ValueError(f"sd_kind must be one of {SD_KINDS}, got {sd_kind!r}")
        if return_sd and not self.reports_sd:
            raise ValueError("this network reports no standard deviations: train it with "
                             "uncertainty='heteroscedastic' or 'variance_head', or n_members > 1")
        if return_sd and sd_kind == "truth" and self.sd_kind != "truth":
            raise SDNotCalibrated(
                "this network's SD was never calibrated against the truth: it is "
                f"{self.label_sd_method().split(', NOT')[0]}, not an error bar. Ask for it by that name with "
                "sd_kind='label' (qmri-fit --sd-kind label), or retrain the network on a simulated Dataset "
                "(its validation split calibrates the SD)")
        flat, lead = as_signals(signals, len(self.protocol_))
        if isinstance(signal_scale, str) and signal_scale == "auto":
            signal_scale = getattr(self, "default_signal_scale_", "auto")
        preprocessing = self._preprocessing()
        if isinstance(signal_scale, str):
            if signal_scale != "auto":
                raise ValueError(f"signal_scale must be 'auto', a number or a per-voxel array, got {signal_scale!r}")
            scale = preprocessing.scale(lowest_b_mean(flat, self.protocol_)) if flat.shape[0] else 1.0
        else:
            scale = np.asarray(signal_scale, dtype=np.float64)
            if scale.ndim:
                scale = np.broadcast_to(scale, lead).reshape(-1)
            if np.any(scale <= 0):
                raise ValueError("signal_scale must be positive (NaN marks a voxel that cannot be scaled)")
        unscaled = None
        if np.ndim(scale) == 0:
            if scale != 1.0:
                flat = preprocessing.apply(flat, scale)
        else:
            unscaled = ~np.isfinite(scale)
            flat = preprocessing.apply(flat, np.where(unscaled, 1.0, scale))
        device = torch.device(device) if device is not None else torch.device("cpu")
        network = self.network_.to(device).eval()
        members = self._members()
        out = np.empty((flat.shape[0], len(self.param_names_)), dtype=np.float32)
        sd = np.empty_like(out) if return_sd else None
        with torch.inference_mode():
            for start in range(0, flat.shape[0], int(batch_size)):
                block = torch.as_tensor(flat[start : start + batch_size], dtype=torch.float32, device=device)
                if len(members) == 1 and self._fitted_uncertainty() is None:
                    out[start : start + batch_size] = network(block).cpu().numpy()
                    continue
                mean, variance = self._member_predictions(members, block, return_sd)
                out[start : start + batch_size] = mean
                if return_sd:
                    sd[start : start + batch_size] = variance
        self.network_.to("cpu")
        if return_sd and sd_kind == "truth":
            sd *= np.asarray(self.uncertainty_["sd_scale"], dtype=np.float32)
        if np.ndim(scale) or scale != 1.0:
            out = preprocessing.restore(out, self.param_names_, scale)
            if return_sd:
                sd = preprocessing.restore(sd, self.param_names_, scale)
        if unscaled is not None and unscaled.any():
            # a voxel the preprocessing cannot scale has no estimate
            out[unscaled] = np.nan
            if return_sd:
                sd[unscaled] = np.nan
        n_params = len(self.param_names_)
        if not return_sd:
            return out.reshape(*lead, n_params)
        return out.reshape(*lead, n_params), sd.reshape(*lead, n_params)

    def _member_predictions(self, members, block: torch.Tensor, return_sd: bool):
        """Mean and (with ``return_sd``) SD of the members' predictions of one block."""
        means, variances = [], []
        for member in members:
            output = member(block)
            if isinstance(output, tuple):
                mean, log_var = output
                if not return_sd:
                    variance = None
                elif log_var.shape[-1] == 1 and mean.shape[-1] != 1:
                    # self label: the Fisher SD at the prediction for the learned signal noise
                    noise = (getattr(self, "uncertainty_", None) or {}).get("noise", "rician")
                    variance = signal_space_sd(get_model(self.model_name_), mean.cpu().numpy(), self.protocol_,
                                               log_var.cpu().numpy(), noise) ** 2
                else:
                    variance = (member.sd(log_var) ** 2).cpu().numpy().astype(np.float64)
            else:
                mean, variance = output, (np.zeros(tuple(output.shape)) if return_sd else None)
            means.append(mean.cpu().numpy().astype(np.float64))
            variances.append(variance)
        mean, sd = combine_members(np.stack(means), np.stack(variances) if return_sd else None, axis=0)
        return mean.astype(np.float32), sd.astype(np.float32)

    # -- persistence -------------------------------------------------------------------------
    def training_config(self) -> dict:
        """Hyperparameters as plain JSON types (what :meth:`load` rebuilds the estimator from)."""
        return json_params(self.get_params())

    def manifest(self, metrics: Mapping | None = None, extra: Mapping | None = None) -> dict:
        """The bundle manifest of this fitted network (see :mod:`qmri_labels.estimators.bundle`)."""
        self._check_fitted()
        return build_manifest(type(self), self.training_config(), network_config(self.network_),
                              network_record(self, metrics), extra)

    def save(self, path, metrics: Mapping | None = None, extra: Mapping | None = None, overwrite: bool = True) -> Path:
        """Write a model bundle folder (weights + manifest with SHA-256); see :mod:`qmri_labels.estimators.bundle`.

        After a distributed fit only rank 0 writes (every rank holds the same weights); the
        other ranks return the path without touching it.
        """
        if getattr(self, "global_rank_", 0) != 0:
            return Path(path)
        return save_estimator(self, path, self.manifest(metrics, extra), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "NetworkEstimator":
        """Load a bundle written by :meth:`save`, from its folder or by the name of a shipped
        network (``qmri-fit --list-models``); the checksum is verified before reading weights."""
        path = bundle_path(path)
        state, manifest = load_estimator(cls, path)
        try:
            names = cls._param_names()
            estimator = cls(**{k: v for k, v in manifest["params"].items() if k in names})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: bundle manifest/weights do not describe a network ({exc})") from exc
        restore_fitted(estimator, state, manifest, path)
        return estimator


#: the bundle kind of a voxel-wise network
ESTIMATOR_KIND = estimator_kind(NetworkEstimator)
