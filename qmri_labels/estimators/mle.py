"""Maximum-likelihood fits behind the estimator contract: :class:`MLEEstimator`."""

from __future__ import annotations

import numpy as np

from qmri_labels.data.datasets import Dataset
from qmri_labels.estimators.base import BaseEstimator, as_signals
from qmri_labels.fitting import fit_mle
from qmri_labels.physics import get_model


class MLEEstimator(BaseEstimator):
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
    sigma_scale : array-like (M,) or None
        Noise level of each measurement relative to ``sigma`` (e.g. ``1 / sqrt(N)`` for a
        per-shell average of N volumes); ``None``: 1 for every measurement.

    Attributes (after fit)
    ----------------------
    protocol_ : ndarray (M,)
        The protocol the fits use: ``protocol``, or the dataset's when that is ``None``.
    """

    def __init__(self, model: str = "ivim", protocol=None, noise: str = "rician", sigma=None, bounds=None,
                 n_starts: int | None = None, device=None, chunk_size: int | None = None, progress: bool = False,
                 sigma_scale=None):
        self.model = model
        self.protocol = protocol
        self.noise = noise
        self.sigma = sigma
        self.bounds = bounds
        self.n_starts = n_starts
        self.device = device
        self.chunk_size = chunk_size
        self.progress = progress
        self.sigma_scale = sigma_scale

    @property
    def model_name(self) -> str:
        return get_model(self.model).name

    @property
    def param_names(self) -> tuple[str, ...]:
        return get_model(self.model).param_names

    @property
    def reports_sd(self) -> bool:
        """Always: ``predict(..., return_sd=True)`` gives the Wald standard errors."""
        return True

    #: ``predict(..., return_sd=True, return_sd_reason=True)`` also says why an SD is NaN
    reports_sd_reason = True

    @property
    def sd_method(self) -> str:
        """What the SD of ``predict(..., return_sd=True)`` is, in words (for a map's sidecar)."""
        return ("Wald standard error: square root of the diagonal of the inverse expected Fisher information at "
                f"the estimate, {self.noise} likelihood, the noise level the fit used")

    def describe(self) -> dict:
        """What a map's provenance records about the fitter: kind, likelihood and (where given)
        bounds."""
        record = {"kind": "mle", "name": "mle", "noise": self.noise}
        if self.bounds is not None:
            record["bounds"] = self.bounds
        return record

    def fit(self, X: Dataset | None = None, y=None) -> "MLEEstimator":
        """Take the protocol from a dataset when none was given; returns ``self``.

        A fitter learns nothing from training data; this exists so that MLE can sit next to
        networks in one loop.

        Parameters
        ----------
        X : Dataset or None
        y : ignored

        Returns
        -------
        self
        """
        protocol = self.protocol
        if X is not None:
            if X.spec.model != self.model_name:
                raise ValueError(f"dataset is for model {X.spec.model!r}, estimator for {self.model_name!r}")
            if protocol is None:
                protocol = X.protocol
        self.protocol_ = None if protocol is None else np.asarray(protocol, dtype=np.float64)
        return self

    def _protocol(self) -> np.ndarray:
        # a fitter needs no fit: the constructor's protocol serves until fit learns one
        protocol = getattr(self, "protocol_", None)
        if protocol is None:
            protocol = self.protocol
        if protocol is None:
            raise ValueError("MLEEstimator needs a protocol: pass protocol=... or call fit(dataset) first")
        return np.asarray(protocol, dtype=np.float64)

    def predict(self, signals, return_sd: bool = False, device=None, return_sd_reason: bool = False):
        """Parameters ``(..., P)`` float32 for signals ``(..., M)``; NaN where a fit is invalid.

        Parameters
        ----------
        signals : array-like (..., M)
        return_sd : bool
            Also return the Wald standard errors ``(..., P)`` float32 from the Fisher
            information at the estimate (NaN for a parameter on a bound or not identifiable;
            see :mod:`qmri_labels.fitting.uncertainty`).
        device : str or None
            Where to fit (``None``: the constructor's ``device``).
        return_sd_reason : bool
            With ``return_sd``, also return why each SD is NaN (``(..., P)`` str: ``""`` where
            reported, else e.g. ``"at lower bound"``).

        Returns
        -------
        params : ndarray (..., P)
        sd : ndarray (..., P)
            Only with ``return_sd=True``.
        sd_reason : ndarray (..., P) of str
            Only with ``return_sd_reason=True``.
        """
        if return_sd_reason and not return_sd:
            raise ValueError("return_sd_reason=True needs return_sd=True")
        protocol = self._protocol()
        flat, lead = as_signals(signals, protocol.size)
        sigma = self.sigma
        if sigma is not None and np.ndim(sigma) > 0:
            sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), lead).reshape(-1)
        kwargs = {"model": self.model, "noise": self.noise, "sigma": sigma, "bounds": self.bounds,
                  "device": self.device if device is None else device, "progress": self.progress,
                  "uncertainty": bool(return_sd)}
        if self.n_starts is not None:
            kwargs["n_starts"] = self.n_starts
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        if self.sigma_scale is not None:
            kwargs["sigma_scale"] = self.sigma_scale
        fit = fit_mle(flat, protocol, **kwargs)
        params = np.asarray(fit.params, dtype=np.float32).reshape(*lead, -1)
        if not return_sd:
            return params
        sd = np.asarray(fit.sd, dtype=np.float32).reshape(*lead, -1)
        if not return_sd_reason:
            return params, sd
        return params, sd, np.asarray(fit.sd_reason).reshape(*lead, -1)
