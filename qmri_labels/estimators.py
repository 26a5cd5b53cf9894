"""One interface for every way of estimating parameters: ``predict(signals) -> params``.

* :class:`MLEEstimator` wraps the batched maximum-likelihood fitter;
* :class:`NetworkEstimator` trains a voxel-wise network under a chosen training label
  (``gt``, ``mle``, ``self``, ``hybrid`` or a weighted sum) with Lightning, and saves to /
  loads from a model bundle that carries everything needed to predict.

Both accept NumPy signals of any leading shape ``(..., M)`` and return ``(..., P)`` float32
parameters in the model's parameter order, and expose ``model_name``, ``protocol`` and
``param_names``. Hyperparameters are plain keyword arguments (scikit-learn's contract);
``fit`` returns ``self`` and learned attributes end in ``_``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from qmri_labels.bundle import device_info, load_bundle, package_versions, save_bundle
from qmri_labels.data.datasets import Dataset
from qmri_labels.data.preprocessing import for_training_signals, from_manifest
from qmri_labels.params import ParamsMixin
from qmri_labels.physics import get_model

ESTIMATOR_KIND = "qmri_labels.NetworkEstimator"

#: Named network designs (keyword arguments of :class:`NetworkEstimator`).
#: ``epstein``: the default, Epstein et al. (MELBA 2024). ``ivimnet``: the published
#: configuration of IVIM-NET "optim" (Kaandorp et al., MRM 2021): one sub-network of two
#: hidden layers per parameter, batch norm, dropout 0.1, sigmoid bounds (the constraints
#: D 0-0.005, f 0-0.7, D* 0.005-0.2 mm^2/s, S0 0-2) widened by 30 %, Adam at 3e-5 on batches of 128,
#: patience 10.
DESIGN_PRESETS: dict[str, dict] = {
    "epstein": {},
    "ivimnet": {
        "parallel": True, "hidden_layers": 2, "width": None, "activation": "elu", "batch_norm": True,
        "dropout": 0.1, "output": "sigmoid", "bounds_margin": 0.3,
        # S0, f, D, Dstar (the IVIM model's parameter order)
        "output_bounds": [[0.0, 0.0, 0.0, 0.005], [2.0, 0.7, 0.005, 0.2]],
        "lr": 3e-5, "batch_size": 128, "patience": 10, "max_epochs": 1000,
    },
}


#: Kinds of network uncertainty (``NetworkEstimator(uncertainty=...)``).
UNCERTAINTY_KINDS = (None, "heteroscedastic", "variance_head")


def _as_signals(signals, n_measurements: int) -> tuple[np.ndarray, tuple]:
    signals = np.asarray(signals)
    if signals.dtype.kind not in "fiu":
        raise ValueError(f"signals must be numeric, got dtype {signals.dtype}")
    if signals.ndim == 0 or signals.shape[-1] != n_measurements:
        raise ValueError(f"signals must have shape (..., {n_measurements}) (one value per measurement of the "
                         f"protocol), got {signals.shape}")
    return signals.reshape(-1, n_measurements), signals.shape[:-1]


class MLEEstimator(ParamsMixin):
    """Maximum-likelihood fits as an estimator.

    Parameters
    ----------
    model : str
    protocol : array-like (M,) or None
        b-values (s/mm^2); taken from the dataset in :meth:`fit` when ``None``.
    noise : {"rician", "gaussian"}
    sigma : float, array-like or None
        Noise level handed to the fitter (``None``: estimated by the fitter where it can).
    bounds : array-like (2, P), dict or None
    n_starts : int or None
        Starting points per voxel; ``None``: the fitter's default.
    device : str or None
    chunk_size : int or None
    progress : bool
    """

    def __init__(self, model: str = "ivim", protocol=None, noise: str = "rician", sigma=None, bounds=None,
                 n_starts: int | None = None, device=None, chunk_size: int | None = None, progress: bool = False):
        self.model = model
        self.protocol = protocol
        self.noise = noise
        self.sigma = sigma
        self.bounds = bounds
        self.n_starts = n_starts
        self.device = device
        self.chunk_size = chunk_size
        self.progress = progress

    @property
    def model_name(self) -> str:
        return get_model(self.model).name

    @property
    def param_names(self) -> tuple[str, ...]:
        return get_model(self.model).param_names

    def fit(self, dataset: Dataset | None = None, y=None) -> "MLEEstimator":
        """Take the protocol from a dataset when none was given; returns ``self``.

        A fitter learns nothing from training data; this exists so that MLE can sit next to
        networks in one loop.
        """
        if dataset is not None:
            if dataset.spec.model != self.model_name:
                raise ValueError(f"dataset is for model {dataset.spec.model!r}, estimator for {self.model_name!r}")
            if self.protocol is None:
                self.protocol = np.asarray(dataset.protocol, dtype=np.float64)
        self.fitted_ = True
        return self

    def predict(self, signals, return_sd: bool = False):
        """Parameters ``(..., P)`` float32 for signals ``(..., M)``; NaN where a fit is invalid.

        Parameters
        ----------
        signals : array-like (..., M)
        return_sd : bool
            Also return the Wald standard errors ``(..., P)`` float32 from the Fisher
            information at the estimate (NaN for a parameter on a bound or not identifiable;
            see :mod:`qmri_labels.fitting.uncertainty`).

        Returns
        -------
        params : ndarray (..., P)
        sd : ndarray (..., P)
            Only with ``return_sd=True``.
        """
        from qmri_labels.fitting import fit_mle

        if self.protocol is None:
            raise ValueError("MLEEstimator needs a protocol: pass protocol=... or call fit(dataset) first")
        protocol = np.asarray(self.protocol, dtype=np.float64)
        flat, lead = _as_signals(signals, protocol.size)
        sigma = self.sigma
        if sigma is not None and np.ndim(sigma) > 0:
            sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), lead).reshape(-1)
        kwargs = {"model": self.model, "noise": self.noise, "sigma": sigma, "bounds": self.bounds,
                  "device": self.device, "progress": self.progress, "uncertainty": bool(return_sd)}
        if self.n_starts is not None:
            kwargs["n_starts"] = self.n_starts
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        fit = fit_mle(flat, protocol, **kwargs)
        params = np.asarray(fit.params, dtype=np.float32).reshape(*lead, -1)
        if not return_sd:
            return params
        return params, np.asarray(fit.sd, dtype=np.float32).reshape(*lead, -1)


class NetworkEstimator(ParamsMixin):
    """A voxel-wise network trained under a chosen training label.

    Parameters
    ----------
    label : {"gt", "mle", "self", "hybrid", "weighted"}
        Training label (see :mod:`qmri_labels.training.labels`).
    alpha : float in [0, 1]
        MLE weight of the ``hybrid`` loss ``alpha * L_mle + (1 - alpha) * L_gt``.
    weights : dict or None
        Term weights ``{"gt", "mle", "self"}`` of the ``weighted`` loss.
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
        (:class:`~qmri_labels.training.likelihood_losses.HeteroscedasticLabelLoss`). For
        ``gt`` / ``mle`` / ``hybrid`` labels the reported SD is the expected error *to that
        label* (for MLE labels: to the MLE, not to the truth). The ``self`` label has no
        parameter target: the branch learns the per-voxel *signal* noise level (signal-space
        Gaussian or Rician likelihood, the training data's noise model) and the reported SD is
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
        from qmri_labels.training import method_name

        return method_name(self.label, self.alpha)

    def _check_fitted(self):
        if not hasattr(self, "network_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(dataset) or load(path)")

    def _members(self) -> list:
        """The fitted network's members (one for a single network)."""
        from qmri_labels.nets.ensemble import members_of

        return members_of(self.network_)

    def _fitted_members(self) -> int:
        return len(self._members())

    def _fitted_uncertainty(self) -> str | None:
        from qmri_labels.nets.heteroscedastic import HeteroscedasticNet

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
        from qmri_labels.nets.ensemble import check_n_members
        from qmri_labels.nets.mlp import widen_bounds
        from qmri_labels.training import resolve_weights
        from qmri_labels.training.schedules import check_schedule

        weights = resolve_weights(self.label, self.alpha, self.weights)
        for name in ("batch_size", "max_epochs", "batches_per_block"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(self.patience) != self.patience or self.patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not (0.0 <= float(self.val_fraction) < 1.0):
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        for name in ("parallel", "batch_norm", "fit_s0", "warm_start", "standardise_inputs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        widen_bounds(np.zeros((2, 1)), self.bounds_margin)  # checks the margin
        if self.uncertainty not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {self.uncertainty!r}")
        check_n_members(self.n_members)
        if self.uncertainty is not None and "self" in weights and weights["self"] and len(
                [t for t, w in weights.items() if w]) > 1:
            raise ValueError(f"uncertainty={self.uncertainty!r} cannot mix the self-supervised term (a signal-noise "
                             f"variance) with parameter terms; got weights {weights}")
        if self.warm_start and hasattr(self, "network_") and (
                self.uncertainty != self._fitted_uncertainty() or int(self.n_members) != self._fitted_members()):
            raise ValueError(f"warm_start: the fitted network has uncertainty={self._fitted_uncertainty()!r}, "
                             f"n_members={self._fitted_members()}; this estimator asks for "
                             f"uncertainty={self.uncertainty!r}, n_members={self.n_members!r}")
        check_schedule(self.lr_schedule)
        if not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr!r}")
        if not (math.isfinite(float(self.weight_decay)) and float(self.weight_decay) >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
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
            :func:`qmri_labels.tuning.tune`); a callback that sets ``trainer.should_stop``
            ends training early, and the best epoch so far is kept.

        Returns
        -------
        self
        """
        from qmri_labels.training import ParameterNormalisation
        from qmri_labels.training.targets import array_targets, arrays_fingerprint, dataset_targets

        weights = self._validate()
        if isinstance(X, Dataset):
            if protocol is not None or bounds is not None or sigma is not None:
                raise ValueError("protocol, bounds and sigma are taken from the dataset; pass them only with arrays")
            if y is not None and mle_labels is not None:
                raise ValueError("give the dataset's MLE labels once (y or mle_labels)")
            signal_model = X.model
            tensors, mle_info = dataset_targets(X, weights, y if mle_labels is None else mle_labels,
                                                mle_options=self.mle_options, progress=bool(self.progress))
            support = X.prior_support
            record = {"train_fingerprint_": X.fingerprint, "train_spec_": X.spec.to_dict()}
            train_protocol = X.protocol
            noise = X.spec.noise
        else:
            if mle_labels is not None:
                raise ValueError("with array input, give MLE labels as y")
            signal_model = get_model(model)
            # the noise model of the self label's signal-space likelihood: the MLE labels' one
            noise = dict(self.mle_options or {}).get("noise", "rician")
            if protocol is None:
                raise ValueError("fit(X) with X an array, not a Dataset, needs protocol=... (b-values in s/mm^2, one "
                                 "per column of X)")
            train_protocol = np.asarray(signal_model.validate_protocol(protocol), dtype=np.float64)
            signals, _ = _as_signals(X, train_protocol.size)
            tensors, mle_info = array_targets(self.label, weights, signals, y, signal_model, train_protocol, sigma,
                                              mle_options=self.mle_options, progress=bool(self.progress))
            support = signal_model.default_bounds if bounds is None else np.asarray(bounds, dtype=np.float64)
            if support.shape != (2, signal_model.n_params) or not np.all(np.isfinite(support)) or np.any(
                    support[1] < support[0]):
                raise ValueError(f"bounds must be finite with shape (2, {signal_model.n_params}) and lower <= upper, "
                                 f"got {np.asarray(support).tolist()}")
            record = {"train_fingerprint_": arrays_fingerprint(tensors),
                      "train_spec_": {"source": "arrays", "model": signal_model.name, "n": int(signals.shape[0]),
                                      "protocol": [float(b) for b in train_protocol],
                                      "bounds": np.asarray(support, float).tolist()}}

        n = tensors["signals"].shape[0]
        keep = np.ones(n, dtype=bool)
        if "mle" in tensors:
            keep &= np.all(np.isfinite(tensors["mle"]), axis=1)
            mle_info["n_excluded"] = int((~keep).sum())
        if not keep.all():
            if keep.sum() < 2:
                raise ValueError("fewer than 2 training rows have finite MLE labels")
            tensors = {k: v[keep] for k, v in tensors.items()}
        normalisation = ParameterNormalisation.from_support(support, signal_model.param_names)
        self._train(tensors, weights, signal_model, train_protocol, support, normalisation, noise, callbacks)
        self.n_excluded_ = int((~keep).sum())
        self.mle_labels_ = mle_info
        for key, value in record.items():
            setattr(self, key, value)
        return self

    def _train(self, tensors: dict, weights: dict, signal_model, protocol, support, normalisation,
               noise: str = "rician", callbacks=()) -> None:
        """Build (or, with ``warm_start``, reuse) the network(s) and train them on ``tensors``;
        an ensemble trains its members one after another, member ``k`` with seeds offset by ``k``."""
        import copy

        from qmri_labels.nets.ensemble import DeepEnsemble

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
        members, runs = [], []
        for k in range(n_members):
            if warm:
                network = copy.deepcopy(previous[k])
            else:
                network = self._new_network(tensors["signals"], signal_model, support, normalisation, weights,
                                            init_seed + k)
            runs.append(self._train_network(network, tensors, weights, signal_model, protocol, normalisation, noise,
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
        if n_members > 1:
            self.seeds_["members"] = [{"init_seed": init_seed + k, "shuffle_seed": shuffle_seed + k}
                                      for k in range(n_members)]
            self.members_training_ = [
                {"best_epoch": kp.best_epoch, "best_val_loss": kp.best_score if math.isfinite(kp.best_score) else None,
                 "n_epochs": int(tr.current_epoch), "history": list(mod.history)} for mod, tr, kp, _ in runs]

    def _new_network(self, signals, signal_model, support, normalisation, weights, init_seed: int):
        """A freshly initialised network (with a log-variance branch for ``uncertainty``); its
        weights are drawn from a private RNG stream seeded with ``init_seed``, so the caller's
        global RNG state is untouched."""
        from qmri_labels.nets import MLP
        from qmri_labels.nets.heteroscedastic import HeteroscedasticNet

        m = signals.shape[1]
        if self.standardise_inputs:
            shift = signals.mean(0, dtype=np.float64)
            scale = signals.std(0, dtype=np.float64)
            scale = np.where(scale > 0, scale, 1.0)
        else:
            shift, scale = np.zeros(m), np.ones(m)
        if isinstance(self.output_bounds, str):
            if self.output_bounds != "prior":
                raise ValueError(f"output_bounds must be None, 'prior' or an array (2, P), "
                                 f"got {self.output_bounds!r}")
            bounds = np.asarray(support, dtype=np.float64)
        elif self.output_bounds is None:
            bounds = signal_model.default_bounds
        else:
            bounds = np.asarray(self.output_bounds, float)
        fixed = None
        if not self.fit_s0:
            if signal_model.scale_index is None:
                raise ValueError(f"fit_s0=False: model {signal_model.name!r} has no signal scale parameter")
            fixed = {signal_model.scale_index: 1.0}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            network = MLP(m, signal_model.n_params, hidden_layers=self.hidden_layers, width=self.width,
                          activation=self.activation, bounds=bounds, output=self.output,
                          input_shift=shift, input_scale=scale, parallel=bool(self.parallel),
                          batch_norm=bool(self.batch_norm), dropout=float(self.dropout),
                          bounds_margin=float(self.bounds_margin), fixed_outputs=fixed)
            if self.uncertainty is not None:
                # (created after the mean network from the same RNG stream, so the mean network's
                # initial weights are those of a plain network with this seed)
                # the self label learns one signal-noise variance (signal units), the parameter
                # labels one variance per parameter on the loss's normalised scale
                if weights.get("self"):
                    network = HeteroscedasticNet(network, m, 1, scale=None, hidden_layers=self.hidden_layers,
                                                 width=self.width, activation=self.activation, kind=self.uncertainty)
                else:
                    network = HeteroscedasticNet(network, m, signal_model.n_params, scale=normalisation.scale,
                                                 hidden_layers=self.hidden_layers, width=self.width,
                                                 activation=self.activation, kind=self.uncertainty)
        return network

    def _train_network(self, network, tensors: dict, weights: dict, signal_model, protocol, normalisation,
                       noise: str, split_seed: int, shuffle_seed: int, callbacks=()):
        """Train one network; returns ``(module, trainer, keeper, datamodule)``."""
        from qmri_labels.training import InMemoryDataModule, LabelLoss, LabelRegressor, LRSchedule
        from qmri_labels.training.likelihood_losses import HeteroscedasticLabelLoss, VarianceHeadLoss
        from qmri_labels.training.reproducibility import torch_threads
        from qmri_labels.training.trainer import build_trainer

        if self.uncertainty == "heteroscedastic":
            loss = HeteroscedasticLabelLoss(weights, signal_model.name, protocol, normalisation, noise=noise)
        elif self.uncertainty == "variance_head":
            # the mean by the plain label loss, the log-variance by the likelihood at the detached
            # mean; the logged (monitored) loss is the plain one, so the same epoch is kept
            loss = VarianceHeadLoss(weights, signal_model.name, protocol, normalisation, noise=noise)
        else:
            loss = LabelLoss(weights, signal_model.name, protocol, normalisation)
        module = LabelRegressor(network, loss, lr=self.lr, weight_decay=self.weight_decay, optimiser=self.optimiser,
                                step_batch_size=int(self.batch_size), record_step_losses=bool(self.record_step_losses))
        data = InMemoryDataModule(tensors, batch_size=int(self.batch_size), val_fraction=float(self.val_fraction),
                                  split_seed=split_seed, shuffle_seed=shuffle_seed,
                                  batches_per_block=int(self.batches_per_block))
        monitor = "val_loss" if data.has_validation else "train_loss"
        schedules = []
        if self.lr_schedule is not None:
            schedules.append(LRSchedule(self.lr_schedule, int(self.max_epochs), monitor=monitor,
                                        plateau_patience=max(int(self.patience) // 2, 1)))
        with _quiet_lightning(True), _deterministic_scope(), torch_threads(self.num_threads), \
                _training_rng(shuffle_seed):
            trainer, keeper = build_trainer(
                max_epochs=int(self.max_epochs), has_validation=data.has_validation, patience=int(self.patience),
                min_delta=float(self.min_delta), accelerator=self.accelerator, devices=self.devices,
                num_nodes=self.num_nodes, strategy=self.strategy, precision=self.precision,
                deterministic=self.deterministic, benchmark=self.benchmark, progress=bool(self.progress),
                callbacks=[*schedules, *callbacks])
            trainer.fit(module, datamodule=data)
        return module, trainer, keeper, data

    # -- inference ---------------------------------------------------------------------------
    def predict(self, signals, batch_size: int = 65536, device=None, return_sd: bool = False):
        """Parameters ``(..., P)`` float32 for signals ``(..., M)``.

        Parameters
        ----------
        signals : array-like (..., M)
        batch_size : int
            Voxels per forward pass (bounds the memory).
        device : str or None
            Where to run the network (``None``: CPU).
        return_sd : bool
            Also return the SD ``(..., P)`` float32 of each estimate: the heteroscedastic
            head's and/or the ensemble's (see ``uncertainty`` and ``n_members`` in the class
            docstring for what it means per label). A single network without a head
            reports none (ValueError).

        Returns
        -------
        params : ndarray (..., P)
        sd : ndarray (..., P)
            Only with ``return_sd=True``.
        """
        self._check_fitted()
        if not isinstance(return_sd, (bool, np.bool_)):
            raise TypeError(f"return_sd must be True or False, got {return_sd!r}")
        if return_sd and not self.reports_sd:
            raise ValueError("this network reports no standard deviations: train it with "
                             "uncertainty='heteroscedastic' or 'variance_head', or n_members > 1")
        flat, lead = _as_signals(signals, len(self.protocol_))
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
        if not return_sd:
            return out.reshape(*lead, -1)
        return out.reshape(*lead, -1), sd.reshape(*lead, -1)

    def _member_predictions(self, members, block: torch.Tensor, return_sd: bool):
        """Mean and (with ``return_sd``) SD of the members' predictions of one block."""
        from qmri_labels.nets.ensemble import combine_members
        from qmri_labels.training.likelihood_losses import signal_space_sd

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
        params = self.get_params()
        if params["output_bounds"] is not None and not isinstance(params["output_bounds"], str):
            params["output_bounds"] = np.asarray(params["output_bounds"], float).tolist()
        if params["weights"] is not None:
            params["weights"] = dict(params["weights"])
        if params["mle_options"] is not None:
            params["mle_options"] = dict(params["mle_options"])
        for key in ("devices", "strategy", "precision"):
            if not isinstance(params[key], (str, int, float, bool, list, type(None))):
                params[key] = str(params[key])
        return params

    def manifest(self, metrics: Mapping | None = None, extra: Mapping | None = None) -> dict:
        """The bundle manifest of this fitted network."""
        self._check_fitted()
        manifest = {
            "kind": ESTIMATOR_KIND,
            "method": self.method_name,
            "model": self.model_name_,
            "protocol": self.protocol_,
            "param_names": self.param_names_,
            "network": _network_config(self.network_),
            "normalisation": self.normalisation_,
            "preprocessing": getattr(self, "preprocessing_", None) or from_manifest(None)[0].to_dict(),
            "loss_weights": self.loss_weights_,
            "training_config": self.training_config(),
            "data": {"train_fingerprint": self.train_fingerprint_, "train_spec": self.train_spec_,
                     "n_train": self.n_train_, "n_val": self.n_val_, "n_excluded": self.n_excluded_,
                     "mle_labels": self.mle_labels_},
            "training": {"best_epoch": self.best_epoch_, "best_val_loss": self.best_val_loss_,
                         "n_epochs": self.n_epochs_, "fit_seconds": self.fit_seconds_, "seeds": self.seeds_,
                         "history": self.history_},
            "device": self.device_,
            "determinism": {"deterministic": bool(self.deterministic), "precision": str(self.precision)},
            "versions": package_versions(),
            "metrics": dict(metrics or getattr(self, "metrics_", {}) or {}),
        }
        if getattr(self, "uncertainty_", None) and (self.uncertainty_["kind"] is not None
                                                    or self.uncertainty_["n_members"] > 1):
            manifest["uncertainty"] = dict(self.uncertainty_)
        if getattr(self, "members_training_", None):
            manifest["training"]["members"] = self.members_training_
        if getattr(self, "tuning_", None) is not None:
            from qmri_labels.fileio import to_jsonable

            manifest["tuning"] = to_jsonable(self.tuning_)
        if extra:
            manifest.update(extra)
        return manifest

    def save(self, path, metrics: Mapping | None = None, extra: Mapping | None = None, overwrite: bool = True) -> Path:
        """Write a model bundle folder (weights + manifest with SHA-256); see :mod:`qmri_labels.bundle`.

        After a distributed fit only rank 0 writes (every rank holds the same weights); the
        other ranks return the path without touching it.
        """
        if getattr(self, "global_rank_", 0) != 0:
            return Path(path)
        return save_bundle(path, self.network_.state_dict(), self.manifest(metrics, extra), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "NetworkEstimator":
        """Load a bundle written by :meth:`save`; the checksum is verified before reading weights."""
        state, manifest = load_bundle(path)
        if manifest.get("kind") != ESTIMATOR_KIND:
            raise ValueError(f"{path} is a bundle of kind {manifest.get('kind')!r}, not a {ESTIMATOR_KIND}")
        try:
            config = dict(manifest["training_config"])
            net_cfg = dict(manifest["network"])
            names = cls._param_names()
            estimator = cls(**{k: v for k, v in config.items() if k in names})
            network = _network_from_config(net_cfg)
            network.load_state_dict(state, strict=True)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"{path}: bundle manifest/weights do not describe a network ({exc})") from exc
        estimator.network_ = network.eval()
        estimator.model_name_ = manifest["model"]
        estimator.protocol_ = list(manifest["protocol"])
        estimator.param_names_ = list(manifest["param_names"])
        estimator.normalisation_ = manifest["normalisation"]
        estimator.loss_weights_ = manifest["loss_weights"]
        data, training = manifest.get("data", {}), manifest.get("training", {})
        estimator.train_fingerprint_ = data.get("train_fingerprint")
        estimator.train_spec_ = data.get("train_spec")
        estimator.n_train_ = data.get("n_train")
        estimator.n_val_ = data.get("n_val")
        estimator.n_excluded_ = data.get("n_excluded")
        estimator.mle_labels_ = data.get("mle_labels")
        estimator.history_ = training.get("history", [])
        estimator.best_epoch_ = training.get("best_epoch")
        estimator.best_val_loss_ = training.get("best_val_loss")
        estimator.n_epochs_ = training.get("n_epochs")
        estimator.fit_seconds_ = training.get("fit_seconds")
        estimator.seeds_ = training.get("seeds")
        if "uncertainty" in manifest:
            estimator.uncertainty_ = dict(manifest["uncertainty"])
        if "members" in training:
            estimator.members_training_ = list(training["members"])
        estimator.device_ = manifest.get("device")
        estimator.metrics_ = manifest.get("metrics", {})
        estimator.manifest_ = manifest
        estimator.preprocessing_ = from_manifest(manifest)[0].to_dict()
        if "tuning" in manifest:
            estimator.tuning_ = manifest["tuning"]
        if get_model(estimator.model_name_).param_names != tuple(estimator.param_names_):
            raise ValueError(f"{path}: parameter names {estimator.param_names_} do not match model "
                             f"{estimator.model_name_!r}")
        return estimator


def _network_config(network) -> dict:
    """The bundle's description of a network: its config, or ``{"kind": "ensemble", "members":
    [config, ...]}`` for a :class:`~qmri_labels.nets.ensemble.DeepEnsemble` (whose weights are
    saved in the same file under ``members.<k>.`` prefixes)."""
    from qmri_labels.nets.ensemble import DeepEnsemble

    if isinstance(network, DeepEnsemble):
        return {"kind": "ensemble", "members": [dict(m.config) for m in network.members]}
    return dict(network.config)


def _network_from_config(config: Mapping):
    """An untrained network from :func:`_network_config`'s description (load the weights after)."""
    from qmri_labels.nets import MLP
    from qmri_labels.nets.ensemble import DeepEnsemble
    from qmri_labels.nets.heteroscedastic import VARIANCE_KINDS, HeteroscedasticNet

    config = dict(config)
    kind = config.get("kind")
    if kind == "ensemble":
        members = config["members"]
        if not isinstance(members, list) or not members:
            raise ValueError(f"an ensemble config needs a non-empty list of members, got {members!r}")
        return DeepEnsemble([_network_from_config(m) for m in members])
    if kind in VARIANCE_KINDS:
        return HeteroscedasticNet.from_config(config)
    if kind is not None:
        raise ValueError(f"unknown network kind {kind!r}")
    return MLP(**config)


@contextlib.contextmanager
def _quiet_lightning(quiet: bool):
    """Silence Lightning's info logs and advice (device summary, tips, worker counts); the
    progress bar is separate and stays."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric",
                                                     "lightning_fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _training_rng(seed: int):
    """Seed the global torch RNG for the fit (dropout masks draw from it) and restore the
    caller's state afterwards: the same seeds give the same network whatever ran before."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def _deterministic_scope():
    """Restore the global deterministic-algorithms flag that Lightning sets for the fit."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
