"""A dipy-style IVIM model backed by qmri_labels: swap one import in a dipy script.

>>> # from dipy.reconst.ivim import IvimModel
>>> from qmri_labels.interop.dipy import IvimModel                       # doctest: +SKIP
>>> ivimfit = IvimModel(gtab, fit_method="trr").fit(data)               # doctest: +SKIP
>>> ivimfit.perfusion_fraction, ivimfit.D_star, ivimfit.D               # doctest: +SKIP

The fit object has dipy's names: ``model_params`` ``(..., 4)`` in dipy's order
``[S0, f, D*, D]``, ``S0_predicted``, ``perfusion_fraction``, ``D_star``, ``D``, ``shape``,
indexing, and ``predict(gtab, S0=None)``. Underneath it is
:func:`qmri_labels.maps.fit_volume`: the batched MLE (least squares by default, as dipy's
fit; ``noise="rician"`` with ``sigma`` or ``"auto"`` for magnitude data at low SNR) or a trained
network (``estimator=`` a bundle name/folder or a NetworkEstimator). Units as dipy's: b in
s/mm^2, D and D* in mm^2/s.

dipy's optimiser settings (``fit_method``, ``split_b_D``, ``split_b_S0``, ``two_stage``, ``tol``,
``x_scale``, ``gtol``, ``ftol``, ``eps``, ``maxiter``) are accepted so that a dipy script runs
unchanged, and a warning says they do not apply; ``bounds`` (dipy order ``[S0, f, D*, D]``) is
used. Any other option is an error.
"""

from __future__ import annotations

import warnings

import numpy as np

#: dipy order of IVIM parameters; qmri_labels order is S0, f, D, Dstar
DIPY_ORDER = ("S0", "f", "Dstar", "D")
_DIPY_OPTIMISER_OPTIONS = {"fit_method", "split_b_D", "split_b_S0", "two_stage", "tol", "x_scale", "gtol", "ftol",
                           "eps", "maxiter", "options"}
_OUR_OPTIONS = {"noise", "sigma", "device", "chunk_size", "progress", "directions", "force"}


def _to_dipy(params: np.ndarray) -> np.ndarray:
    """(..., 4) from qmri_labels order (S0, f, D, Dstar) to dipy order (S0, f, D*, D)."""
    return params[..., [0, 1, 3, 2]]


def _from_dipy(params: np.ndarray) -> np.ndarray:
    return np.asarray(params)[..., [0, 1, 3, 2]]


class IvimModel:
    """IVIM model with dipy's interface.

    Parameters
    ----------
    gtab : dipy GradientTable (or anything with ``.bvals``)
    estimator : "mle", a NetworkEstimator, or a network bundle name / folder
    bounds : array_like (2, 4), optional
        MLE bounds in dipy order ``[S0, f, D*, D]`` (lower row, upper row).
    noise : {"gaussian", "rician"}
        MLE likelihood (default ``gaussian``, i.e. least squares as dipy's own fit).
    sigma : float, array, "auto" or None
        Noise SD for the Rician likelihood (see :func:`qmri_labels.maps.fit_volume`).
    directions : {"auto", "all", "average"}
        Fit every volume or each b-value shell's geometric mean (``auto``: average when a shell
        with b > 0 holds several volumes); the gtab's b-vectors say which volumes repeat each
        other for ``sigma="auto"``.
    force : bool
        Fit a protocol that cannot identify IVIM (otherwise refused with a ValueError).
    device, chunk_size, progress
        Passed to :func:`~qmri_labels.maps.fit_volume`.
    """

    def __init__(self, gtab, estimator="mle", **options):
        unknown = set(options) - _DIPY_OPTIMISER_OPTIONS - _OUR_OPTIONS - {"bounds"}
        if unknown:
            raise TypeError(f"IvimModel got unknown options {sorted(unknown)}")
        ignored = sorted(set(options) & _DIPY_OPTIMISER_OPTIONS)
        if ignored:
            warnings.warn(f"dipy optimiser options {ignored} do not apply to qmri_labels' {estimator!r} estimator; "
                          "they are ignored", UserWarning, stacklevel=2)
        self.gtab = gtab
        self.bvals = np.asarray(gtab.bvals, dtype=np.float64)
        bvecs = getattr(gtab, "bvecs", None)
        self.bvecs = None if bvecs is None else np.asarray(bvecs, dtype=np.float64)
        self.directions = options.get("directions", "auto")
        self.force = bool(options.get("force", False))
        self.estimator = estimator
        self.noise = options.get("noise", "gaussian")
        self.sigma = options.get("sigma")
        self.bounds = options.get("bounds")
        self.device = options.get("device")
        self.chunk_size = options.get("chunk_size", 20000)
        self.progress = options.get("progress", False)

    def _estimator(self):
        if isinstance(self.estimator, str) and self.estimator == "mle":
            from qmri_labels.estimators import MLEEstimator

            bounds = None if self.bounds is None else _from_dipy(np.asarray(self.bounds, dtype=np.float64))
            return MLEEstimator(model="ivim", noise=self.noise, bounds=bounds)
        if self.bounds is not None:
            raise ValueError("bounds apply to the MLE only; a network's outputs are bounded by its training")
        return self.estimator

    def fit(self, data, mask=None) -> "IvimFit":
        """Fit every voxel of ``data (..., M)`` (inside ``mask``); returns an :class:`IvimFit`."""
        from qmri_labels.maps import fit_volume

        data = np.asarray(data)
        if data.shape[-1] != self.bvals.size:
            raise ValueError(f"data have {data.shape[-1]} samples per voxel, gtab has {self.bvals.size} b-values")
        single = data.ndim == 1
        array = data[None] if single else data
        mask_array = None if mask is None else (np.asarray(mask)[None] if single else np.asarray(mask))
        maps = fit_volume(array, mask_array, protocol=self.bvals, estimator=self._estimator(), noise=self.noise,
                          sigma=self.sigma if self.noise == "rician" else None, chunk_size=self.chunk_size,
                          device=self.device, progress=self.progress, bvecs=self.bvecs,
                          directions=self.directions, force=self.force)
        params = _to_dipy(maps.params.astype(np.float64))
        return IvimFit(self, params[0] if single else params, maps=maps)

    def predict(self, ivim_params, gtab=None, S0=None) -> np.ndarray:
        """Signals for ``ivim_params (..., 4)`` in dipy order at ``gtab`` (default: the model's)."""
        return ivim_prediction(ivim_params, self.gtab if gtab is None else gtab, S0)


def ivim_prediction(params, gtab, S0=None) -> np.ndarray:
    """``S0 (f e^{-b D*} + (1 - f) e^{-b D})`` for dipy-ordered ``params (..., 4)``."""
    import torch

    from qmri_labels.physics import get_model

    ours = _from_dipy(np.asarray(params, dtype=np.float64)).copy()
    if S0 is not None:
        ours[..., 0] = S0
    bvals = torch.as_tensor(np.asarray(gtab.bvals, dtype=np.float64))
    return get_model("ivim").forward(torch.as_tensor(ours), bvals).numpy()


class IvimFit:
    """Result of :meth:`IvimModel.fit`, with dipy's attribute names."""

    def __init__(self, model: IvimModel, model_params: np.ndarray, maps=None):
        self.model = model
        self.model_params = model_params
        self.maps = maps

    def __getitem__(self, index):
        params = self.model_params
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > params.ndim - 1:
            raise IndexError("IndexError: invalid index")
        return IvimFit(self.model, params[index])

    @property
    def shape(self) -> tuple:
        return self.model_params.shape[:-1]

    @property
    def S0_predicted(self) -> np.ndarray:
        return self.model_params[..., 0]

    @property
    def perfusion_fraction(self) -> np.ndarray:
        return self.model_params[..., 1]

    @property
    def D_star(self) -> np.ndarray:
        return self.model_params[..., 2]

    @property
    def D(self) -> np.ndarray:
        return self.model_params[..., 3]

    def predict(self, gtab, S0=None) -> np.ndarray:
        """Signals at ``gtab``'s b-values from the fitted parameters (``S0`` overrides S0)."""
        return ivim_prediction(self.model_params, gtab, S0)
