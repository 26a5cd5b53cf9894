"""What a voxel-wise network is before it is trained: named designs, the check of a
:class:`~qmri_labels.estimators.NetworkEstimator`'s settings, the freshly initialised network,
and the bundle's description of an architecture (and the network rebuilt from it).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from qmri_labels.nets import MLP
from qmri_labels.nets.ensemble import DeepEnsemble, check_n_members
from qmri_labels.nets.heteroscedastic import VARIANCE_KINDS, HeteroscedasticNet
from qmri_labels.nets.mlp import widen_bounds
from qmri_labels.training import resolve_weights
from qmri_labels.training.schedules import check_schedule

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


def check_settings(params: Mapping) -> dict:
    """Refuse settings of a :class:`NetworkEstimator` that cannot train; return the loss's term
    weights ``{"gt", "mle", "self"}``.

    Parameters
    ----------
    params : mapping
        The estimator's ``get_params()``.

    Returns
    -------
    dict of the loss terms' weights.
    """
    weights = resolve_weights(params["label"], params["alpha"], params["weights"])
    for name in ("batch_size", "max_epochs", "batches_per_block"):
        value = params[name]
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(params["patience"]) != params["patience"] or params["patience"] < 0:
        raise ValueError(f"patience must be an integer >= 0, got {params['patience']!r}")
    if not (0.0 <= float(params["val_fraction"]) < 1.0):
        raise ValueError(f"val_fraction must lie in [0, 1), got {params['val_fraction']!r}")
    for name in ("parallel", "batch_norm", "fit_s0", "warm_start", "standardise_inputs"):
        if not isinstance(params[name], (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {params[name]!r}")
    if not (0.0 <= float(params["dropout"]) < 1.0):
        raise ValueError(f"dropout must lie in [0, 1), got {params['dropout']!r}")
    widen_bounds(np.zeros((2, 1)), params["bounds_margin"])  # checks the margin
    uncertainty = params["uncertainty"]
    if uncertainty not in UNCERTAINTY_KINDS:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {uncertainty!r}")
    check_n_members(params["n_members"])
    if uncertainty is not None and "self" in weights and weights["self"] and len(
            [t for t, w in weights.items() if w]) > 1:
        raise ValueError(f"uncertainty={uncertainty!r} cannot mix the self-supervised term (a signal-noise "
                         f"variance) with parameter terms; got weights {weights}")
    check_schedule(params["lr_schedule"])
    if not (math.isfinite(float(params["lr"])) and float(params["lr"]) > 0):
        raise ValueError(f"lr must be finite and > 0, got {params['lr']!r}")
    if not (math.isfinite(float(params["weight_decay"])) and float(params["weight_decay"]) >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0, got {params['weight_decay']!r}")
    return weights


def new_network(params: Mapping, signals: np.ndarray, signal_model, support, normalisation, weights: Mapping,
                init_seed: int):
    """A freshly initialised network (with a log-variance branch for ``uncertainty``).

    Its weights are drawn from a private RNG stream seeded with ``init_seed``, so the caller's
    global RNG state is untouched.

    Parameters
    ----------
    params : mapping
        The estimator's ``get_params()``.
    signals : ndarray (N, M)
        Training signals (their mean and SD standardise the inputs).
    signal_model : SignalModel
    support : ndarray (2, P)
        Parameter range of the training data (the output bounds with ``output_bounds="prior"``).
    normalisation : ParameterNormalisation
    weights : mapping
        The loss's term weights.
    init_seed : int

    Returns
    -------
    MLP, or HeteroscedasticNet around one.
    """
    m = signals.shape[1]
    if params["standardise_inputs"]:
        shift = signals.mean(0, dtype=np.float64)
        scale = signals.std(0, dtype=np.float64)
        scale = np.where(scale > 0, scale, 1.0)
    else:
        shift, scale = np.zeros(m), np.ones(m)
    output_bounds = params["output_bounds"]
    if isinstance(output_bounds, str):
        if output_bounds != "prior":
            raise ValueError(f"output_bounds must be None, 'prior' or an array (2, P), got {output_bounds!r}")
        bounds = np.asarray(support, dtype=np.float64)
    elif output_bounds is None:
        bounds = signal_model.default_bounds
    else:
        bounds = np.asarray(output_bounds, float)
    fixed = None
    if not params["fit_s0"]:
        if signal_model.scale_index is None:
            raise ValueError(f"fit_s0=False: model {signal_model.name!r} has no signal scale parameter")
        fixed = {signal_model.scale_index: 1.0}
    hidden = {"hidden_layers": params["hidden_layers"], "width": params["width"], "activation": params["activation"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        network = MLP(m, signal_model.n_params, bounds=bounds, output=params["output"], input_shift=shift,
                      input_scale=scale, parallel=bool(params["parallel"]), batch_norm=bool(params["batch_norm"]),
                      dropout=float(params["dropout"]), bounds_margin=float(params["bounds_margin"]),
                      fixed_outputs=fixed, **hidden)
        if params["uncertainty"] is not None:
            # (created after the mean network from the same RNG stream, so the mean network's
            # initial weights are those of a plain network with this seed)
            # the self label learns one signal-noise variance (signal units), the parameter
            # labels one variance per parameter on the loss's normalised scale
            if weights.get("self"):
                network = HeteroscedasticNet(network, m, 1, scale=None, kind=params["uncertainty"], **hidden)
            else:
                network = HeteroscedasticNet(network, m, signal_model.n_params, scale=normalisation.scale,
                                             kind=params["uncertainty"], **hidden)
    return network


def network_config(network) -> dict:
    """The bundle's description of a network: its config, or ``{"kind": "ensemble", "members":
    [config, ...]}`` for a :class:`~qmri_labels.nets.ensemble.DeepEnsemble` (whose weights are
    saved in the same file under ``members.<k>.`` prefixes)."""
    if isinstance(network, DeepEnsemble):
        return {"kind": "ensemble", "members": [dict(m.config) for m in network.members]}
    return dict(network.config)


def network_from_config(config: Mapping):
    """An untrained network from :func:`network_config`'s description (load the weights after)."""
    config = dict(config)
    kind = config.get("kind")
    if kind == "ensemble":
        members = config["members"]
        if not isinstance(members, list) or not members:
            raise ValueError(f"an ensemble config needs a non-empty list of members, got {members!r}")
        return DeepEnsemble([network_from_config(m) for m in members])
    if kind in VARIANCE_KINDS:
        return HeteroscedasticNet.from_config(config)
    if kind is not None:
        raise ValueError(f"unknown network kind {kind!r}")
    return MLP(**config)
