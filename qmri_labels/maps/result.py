"""What :func:`~qmri_labels.maps.fit_volume` returns: :class:`Maps`, and the codes that say why a
voxel (or one parameter's standard deviation) has no number."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: status code per voxel
STATUS_CODES = {
    0: "outside the mask",
    1: "fitted with every measurement",
    2: "fitted without its NaN/Inf or negative samples",
    3: "skipped: no positive sample",
    5: "skipped: too few usable measurements for the model",
    6: "skipped: a network needs every measurement",
    7: "skipped: the estimate is invalid (fit failed or NaN)",
}
#: why a standard deviation is or is not reported, per voxel and parameter (``Maps.sd_reason``)
SD_REASON_CODES = {
    0: "outside the mask",
    1: "reported",
    2: "at lower bound",
    3: "at upper bound",
    4: "singular information",
    5: "no residual degrees of freedom",
    6: "voxel not estimated",
    7: "not reported by the estimator",
}
SKIP_KEYS = {3: "no_positive_sample", 5: "too_few_usable_measurements", 6: "missing_measurements_for_network",
             7: "invalid_estimate"}


@dataclass
class Maps:
    """Parameter maps of one volume.

    Attributes
    ----------
    params : ndarray (..., P) float32
        0 outside the mask, NaN where not estimated.
    param_names : tuple of str
    units : dict
        Unit of each parameter (S0: the input's intensity units).
    status : ndarray (...) uint8
        :data:`STATUS_CODES` per voxel.
    model : str
    estimator : dict
        What estimated the maps (kind, name, bundle, preprocessing, ...).
    noise : dict or None
        The noise level used and how it was obtained (MLE), else None.
    sigma_map : ndarray (...) or None
        The per-voxel noise level the fit used, where it was a map.
    counts : dict
        Voxels in the mask, estimated and skipped (by reason), NaN/Inf and negative samples.
    sd : ndarray (..., P) float32 or None
        Standard deviation of each estimate (``fit_volume(..., uncertainty=True)``), in the
        parameter's units: 0 outside the mask, NaN where there is no number (see ``sd_reason``).
    sd_reason : ndarray (..., P) uint8 or None
        :data:`SD_REASON_CODES` per voxel and parameter.
    sd_method : str or None
        What the SD is (e.g. the Fisher standard error at the estimate).
    protocol : dict or None
        What was fitted: every volume or the per-shell average (``directions``), the fitted
        b-values, the noise model of the fitted measurements, and any identifiability problem
        that ``force=True`` overrode.
    sd_kind : {"truth", "label"} or None
        ``"truth"``: the error bar of the estimate against the true value; ``"label"``: a
        network's spread around its training label, written only because it was asked for.
    """

    params: np.ndarray
    param_names: tuple
    units: dict
    status: np.ndarray
    model: str
    estimator: dict
    noise: dict | None = None
    sigma_map: np.ndarray | None = None
    counts: dict = field(default_factory=dict)
    sd: np.ndarray | None = None
    sd_reason: np.ndarray | None = None
    sd_method: str | None = None
    protocol: dict | None = None
    sd_kind: str | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.param_names:
            raise KeyError(f"no map {name!r}; maps: {list(self.param_names)}")
        return self.params[..., list(self.param_names).index(name)]

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{name: map}`` for every parameter."""
        return {name: self[name] for name in self.param_names}

    def sd_map(self, name: str) -> np.ndarray:
        """The standard-deviation map of parameter ``name`` (needs ``uncertainty=True``)."""
        if self.sd is None:
            raise ValueError("these maps have no standard deviations: call fit_volume(..., uncertainty=True)")
        self[name]  # an unknown name is a KeyError naming the maps
        return self.sd[..., list(self.param_names).index(name)]

    def sd_reason_counts(self, name: str) -> dict[str, int]:
        """``{reason: voxels}`` inside the mask for parameter ``name``'s SD (non-zero counts only)."""
        if self.sd_reason is None:
            raise ValueError("these maps have no standard deviations: call fit_volume(..., uncertainty=True)")
        codes = self.sd_reason[..., list(self.param_names).index(name)]
        return {SD_REASON_CODES[c]: int(n) for c, n in zip(*np.unique(codes, return_counts=True)) if c != 0}

