"""What a label's loss trains against: the tensors of a training run, from a simulated
dataset or from arrays of any data (signals and, where the label needs them, labels)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from qmri_labels.data.fingerprint import fingerprint
from qmri_labels.physics.noise import add_noise
from qmri_labels.training.labels import label_mle_options, noise_draw_count


def as_labels(values, shape: tuple, what: str, allow_nan: bool = False) -> np.ndarray:
    """``values`` as float32 of ``shape``; non-finite entries refused unless ``allow_nan``."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)} (one row per signal, one column per parameter), "
                         f"got {values.shape}")
    if not allow_nan and not np.all(np.isfinite(values)):
        raise ValueError(f"{what} hold non-finite values")
    return values


def arrays_fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """Fingerprint of training arrays given directly (no dataset spec to record), as float32."""
    return fingerprint("arrays:", {key: np.asarray(value, dtype=np.float32) for key, value in tensors.items()})


def noise_draws(signals: np.ndarray, theta: np.ndarray, sigma, protocol, signal_model, noise: str, n_draws: int,
                seed) -> np.ndarray:
    """``(N, K, M)`` float32: K noisy versions of each ground-truth signal, the first the
    measured ``signals`` themselves, the others new draws of ``noise`` at ``sigma`` around the
    noise-free signal of ``theta`` (NumPy's generator seeded with ``seed``: reproducible).

    Parameters
    ----------
    signals : ndarray (N, M)
    theta : ndarray (N, P)
    sigma : float or ndarray (N,)
    protocol : array-like (M,)
    signal_model : SignalModel
    noise : {"rician", "gaussian"}
    n_draws : int
    seed : int or sequence of int

    Returns
    -------
    ndarray (N, K, M) float32
    """
    clean = signal_model.forward(torch.as_tensor(np.asarray(theta, dtype=np.float64)),
                                 torch.as_tensor(np.asarray(protocol, dtype=np.float64))).numpy()
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (clean.shape[0],))[:, None, None]
    extra = add_noise(np.repeat(clean[:, None], n_draws - 1, axis=1), sigma, noise, rng=np.random.default_rng(seed))
    return np.concatenate([np.asarray(signals, dtype=np.float32)[:, None], extra.astype(np.float32)], axis=1)


#: mixed into the noise draws' seed so that they differ from the dataset's own noise
DRAWS_SEED_STREAM = 0xB1A5


def dataset_targets(dataset, weights: Mapping, mle_labels=None, mle_options: Mapping | None = None,
                    progress: bool = False, *, label: str | None = None,
                    label_weights: Mapping | None = None) -> tuple[dict, dict | None]:
    """Tensors ``signals`` (+ ``theta``, ``mle``, ``draws``) of a simulated dataset and the
    MLE-label record.

    Parameters
    ----------
    dataset : Dataset
    weights : mapping
        The label's loss terms (:func:`~qmri_labels.training.labels.resolve_weights`).
    mle_labels : ndarray, MLEFit, MLELabels or None
        Computed and cached when the loss needs them and none are given.
    mle_options : mapping or None
        Settings of the MLE labels (``mle_approx`` forces the Gaussian likelihood).
    progress : bool
    label : str or None
        The label strategy: ``mle_approx`` and ``bias_reduced`` need it.
    label_weights : mapping or None
        The label's ``weights`` (``bias_reduced``: its number of noise draws).

    Returns
    -------
    tensors : dict
    mle_info : dict or None
    """
    from qmri_labels.training.mle_labels import MLELabels, compute_mle_labels

    mle_options = label_mle_options(label, mle_options) if label else mle_options
    tensors = {"signals": dataset.signals}
    if weights["gt"] > 0 or weights.get("bias", 0) > 0:
        tensors["theta"] = dataset.theta_true
    if weights.get("bias", 0) > 0:
        n_draws = noise_draw_count("bias_reduced", label_weights)
        tensors["draws"] = noise_draws(dataset.signals, dataset.theta_true, dataset.sigma, dataset.protocol,
                                       dataset.model, dataset.spec.noise, n_draws,
                                       seed=[int(dataset.spec.seed), DRAWS_SEED_STREAM])
    mle_info = None
    if weights["mle"] > 0:
        if mle_labels is None:
            mle_labels = compute_mle_labels(dataset, progress=progress, **dict(mle_options or {}))
        if isinstance(mle_labels, MLELabels):
            if mle_labels.dataset_fingerprint != dataset.fingerprint:
                raise ValueError("mle_labels were computed for another dataset (fingerprints differ)")
            wanted = (mle_options or {}).get("noise") if label == "mle_approx" else None
            if wanted and mle_labels.settings.get("noise") != wanted:
                raise ValueError(f"label {label!r} trains on MLE labels of the {wanted} likelihood; these were fitted "
                                 f"with noise={mle_labels.settings.get('noise')!r}")
            mle_info = mle_labels.info()
            mle_params = mle_labels.params
        else:
            mle_params = getattr(mle_labels, "params", mle_labels)
            mle_info = {"source": "given"}
        mle_params = np.asarray(mle_params, dtype=np.float32)
        if mle_params.shape != dataset.theta_true.shape:
            raise ValueError(f"mle_labels must have shape {dataset.theta_true.shape}, got {mle_params.shape}")
        tensors["mle"] = mle_params
    return tensors, mle_info


def array_targets(label: str, weights: Mapping, signals: np.ndarray, y, signal_model, protocol, sigma=None,
                  mle_options: Mapping | None = None, progress: bool = False, *,
                  label_weights: Mapping | None = None, seed: int = 0) -> tuple[dict, dict | None]:
    """Tensors of array input, ``y`` checked against what the label's loss needs.

    ``y``: an array (N, P) when the loss needs one kind of label (``gt`` and ``bias_reduced``:
    true parameters, ``mle``: MLE labels, computed from ``signals`` with ``mle_options`` and
    ``sigma`` when omitted), a dict ``{"gt": ..., "mle": ...}`` for mixed losses, ``None`` for
    ``self``. ``bias_reduced`` also needs ``sigma`` (its noise draws, of the noise in
    ``mle_options``, Rician by default, seeded with ``seed``); ``label_weights`` are the
    label's ``weights``.
    """
    signals = np.asarray(signals, dtype=np.float32)
    if not np.all(np.isfinite(signals)):
        raise ValueError("X holds non-finite signals; mask or drop those voxels first")
    mle_options = label_mle_options(label, mle_options)
    shape = (signals.shape[0], signal_model.n_params)
    draws = weights.get("bias", 0) > 0
    needed = [t for t in ("gt", "mle") if weights[t] > 0 or (t == "gt" and draws)]
    if isinstance(y, Mapping):
        unknown = set(y) - {"gt", "mle"}
        if unknown:
            raise ValueError(f"y has unknown label kinds {sorted(unknown)}; known: ['gt', 'mle']")
        given = dict(y)
    elif y is None:
        given = {}
    elif len(needed) == 1:
        given = {needed[0]: y}
    else:
        raise ValueError(f"label {label!r} needs "
                         + (f"labels {needed} as a dict y={{'gt': ..., 'mle': ...}}" if needed
                            else "no labels (self-supervised): call fit(X) without y"))
    extra = set(given) - set(needed)
    if extra:
        raise ValueError(f"label {label!r} does not use {sorted(extra)} labels; drop them from y")
    tensors = {"signals": signals}
    mle_info = None
    if "gt" in needed:
        if "gt" not in given:
            raise ValueError(f"label {label!r} needs the true parameters: fit(X, y=theta (N, P))")
        tensors["theta"] = as_labels(given["gt"], shape, "gt labels (y)")
    if draws:
        if sigma is None:
            raise ValueError(f"label {label!r} draws new noise around each true signal: fit(X, y=theta, sigma=...)")
        tensors["draws"] = noise_draws(signals, tensors["theta"], sigma, protocol, signal_model,
                                       dict(mle_options or {}).get("noise", "rician"),
                                       noise_draw_count(label, label_weights), seed=[int(seed), DRAWS_SEED_STREAM])
    if "mle" in needed:
        if "mle" in given:
            tensors["mle"] = as_labels(given["mle"], shape, "mle labels (y)", allow_nan=True)
            mle_info = {"source": "given"}
        else:
            from qmri_labels.fitting import fit_mle

            options = {k: v for k, v in dict(mle_options or {}).items()
                       if k in ("noise", "sigma", "bounds", "n_starts", "device")}
            if options.get("sigma") == "known":  # arrays carry no known sigma: pass sigma=... to fit
                options.pop("sigma")
            if sigma is not None:
                options["sigma"] = sigma
            fit = fit_mle(signals, protocol, model=signal_model.name, progress=progress, **options)
            tensors["mle"] = np.asarray(fit.params, dtype=np.float32)
            mle_info = {"source": "computed", "settings": {k: v for k, v in fit.settings.items()
                                                            if isinstance(v, (str, int, float, bool, type(None)))}}
    return tensors, mle_info
