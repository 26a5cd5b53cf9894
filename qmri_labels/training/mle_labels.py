"""MLE labels for training: ``fit_mle`` on the noisy training signals, cached on disk.

Fitting 100k IVIM voxels takes far longer than training a small network on them, and every
``mle`` and ``hybrid`` network of a study uses the same labels, so they are computed once and
stored under ``cache_dir()/mle_labels/`` by a key made of the dataset fingerprint and every
fitter setting that changes the result. A cache file is rewritten when it is unreadable or its
key does not match.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qmri_labels import paths
from qmri_labels.data.datasets import Dataset
from qmri_labels.fileio import atomic_write_bytes

CACHE_FORMAT = 1


@dataclass
class MLELabels:
    """MLE labels of a dataset.

    Attributes
    ----------
    params : ndarray (N, P) float32
        Fitted parameters (NaN where the fit is invalid).
    valid : ndarray (N,) bool
        Rows usable as labels (finite and flagged valid by the fitter).
    settings : dict
        Fitter settings that define the labels.
    dataset_fingerprint : str
    key : str
        Cache key (SHA-256 of fingerprint and settings).
    from_cache : bool
    fit_seconds : float
        Time the fit took when it was computed (also when read back from the cache).
    """

    params: np.ndarray
    valid: np.ndarray
    settings: dict
    dataset_fingerprint: str
    key: str
    from_cache: bool = False
    fit_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_invalid(self) -> int:
        return int((~self.valid).sum())

    def info(self) -> dict:
        """A JSON-friendly record for manifests."""
        return {"key": self.key, "dataset_fingerprint": self.dataset_fingerprint, "settings": self.settings,
                "n_invalid": self.n_invalid, "from_cache": self.from_cache, "fit_seconds": self.fit_seconds}


def mle_settings(dataset: Dataset, *, noise: str | None = None, sigma: str | float | None = "known",
                 bounds=None, n_starts: int | None = None, dtype: str = "float32") -> dict:
    """Canonical fitter settings for ``dataset``.

    ``sigma="known"`` passes the dataset's true noise level to the fitter (as in Epstein et
    al.); ``None`` lets the fitter estimate it; a number fixes it.
    """
    if isinstance(sigma, str) and sigma != "known":
        raise ValueError(f"sigma must be 'known', None or a number, got {sigma!r}")
    if sigma is not None and not isinstance(sigma, str):
        sigma = float(sigma)
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    from qmri_labels.fitting import FITTER_VERSION, fit_mle

    if n_starts is None:
        # resolve the fitter's default so that a change of default changes the cache key
        n_starts = inspect.signature(fit_mle).parameters["n_starts"].default
    return {
        "fitter_version": FITTER_VERSION,
        "model": dataset.spec.model,
        "noise": noise or dataset.spec.noise,
        "sigma": sigma,
        "bounds": None if bounds is None else np.asarray(bounds, dtype=np.float64).tolist(),
        "n_starts": int(n_starts),
        "dtype": dtype,
    }


def cache_key(fingerprint: str, settings: dict) -> str:
    text = json.dumps({"fingerprint": fingerprint, "settings": settings, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def compute_mle_labels(dataset: Dataset, *, noise: str | None = None, sigma: str | float | None = "known",
                       bounds=None, n_starts: int | None = None, dtype: str = "float32", device=None,
                       chunk_size: int | None = None, cache: bool = True, cache_dir: str | Path | None = None,
                       progress: bool = False) -> MLELabels:
    """MLE labels of ``dataset``'s noisy signals, from the cache when available.

    Parameters
    ----------
    dataset : Dataset
    noise : {"rician", "gaussian"} or None
        Likelihood of the fit; ``None``: the dataset's noise type.
    sigma : "known", None or float
        Noise level handed to the fitter (see :func:`mle_settings`).
    bounds : array-like (2, P) or None
        Fitter bounds; ``None``: the model's defaults.
    n_starts, chunk_size, device, progress
        Passed to :func:`qmri_labels.fitting.fit_mle` (``chunk_size`` and ``device`` do not
        change the labels, so they are not part of the cache key).
    cache : bool
        Read and write the on-disk cache.
    cache_dir : path or None
        ``None``: ``qmri_labels.paths.cache_dir() / "mle_labels"``.
    """
    settings = mle_settings(dataset, noise=noise, sigma=sigma, bounds=bounds, n_starts=n_starts, dtype=dtype)
    fingerprint = dataset.fingerprint
    key = cache_key(fingerprint, settings)
    folder = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / "mle_labels"
    path = folder / f"{key}.npz"
    if cache and path.is_file():
        labels = _read_cache(path, key, len(dataset), dataset.model.n_params)
        if labels is not None:
            return labels

    from qmri_labels.fitting import (
        fit_mle,  # fitting sits left of training in the data flow
    )

    kwargs = {"model": settings["model"], "noise": settings["noise"], "bounds": bounds,
              "dtype": getattr(torch, dtype), "progress": progress}
    if settings["sigma"] == "known":
        kwargs["sigma"] = dataset.sigma
    elif settings["sigma"] is not None:
        kwargs["sigma"] = settings["sigma"]
    if n_starts is not None:
        kwargs["n_starts"] = int(n_starts)
    if chunk_size is not None:
        kwargs["chunk_size"] = int(chunk_size)
    if device is not None:
        kwargs["device"] = device
    start = time.perf_counter()
    fit = fit_mle(dataset.signals, dataset.protocol, **kwargs)
    seconds = time.perf_counter() - start
    params = np.asarray(fit.params, dtype=np.float32).reshape(len(dataset), -1)
    valid = np.asarray(fit.valid, dtype=bool).reshape(-1) & np.all(np.isfinite(params), axis=1)
    labels = MLELabels(params, valid, settings, fingerprint, key, from_cache=False, fit_seconds=seconds,
                       extra={"device": str(device) if device is not None else "default"})
    if cache:
        _write_cache(path, labels)
    return labels


def _write_cache(path: Path, labels: MLELabels) -> None:
    buffer = io.BytesIO()
    meta = {"format": CACHE_FORMAT, "key": labels.key, "settings": labels.settings,
            "dataset_fingerprint": labels.dataset_fingerprint, "fit_seconds": labels.fit_seconds, **labels.extra}
    np.savez(buffer, params=labels.params, valid=labels.valid, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buffer.getvalue())


def _read_cache(path: Path, key: str, n: int, n_params: int) -> MLELabels | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            params, valid = z["params"], z["valid"]
    except Exception:
        return None  # unreadable: recompute and overwrite
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT or params.shape != (n, n_params) \
            or valid.shape != (n,):
        return None
    return MLELabels(params.astype(np.float32), valid.astype(bool), meta["settings"], meta["dataset_fingerprint"],
                     key, from_cache=True, fit_seconds=float(meta.get("fit_seconds", 0.0)))
