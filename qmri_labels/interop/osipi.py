"""An OSIPI TF2.4 IVIM algorithm class backed by qmri_labels (MLE or any network).

The OSIPI IVIM code collection (OSIPI/TF2.4_IVIM-MRI_CodeCollection) wraps every algorithm in
a class derived from its ``OsipiBase``: identification attributes ``id_*``, requirement flags
``required_*`` / ``supported_*``, ``ivim_fit(signals, bvalues) -> {"f", "Dp", "D", ...}`` for
one voxel, ``ivim_fit_full_volume`` for an array, and the driver methods ``osipi_fit`` /
``osipi_fit_full_volume`` that first divide each voxel by the mean of its lowest-b samples.
:class:`QmriLabelsIVIM` provides that interface without importing OSIPI code, so it can be
dropped into the collection (e.g. as ``src/standardized/qmri_labels_mle.py`` with
``class qmri_labels_mle(QmriLabelsIVIM): pass``) or used on its own.

Names and orders: OSIPI's ``Dp`` is our ``Dstar``; OSIPI bounds are ``[[D, f, Dp, S0] lower,
[D, f, Dp, S0] upper]`` (older wrappers) or ``{"S0": [lo, hi], "f": ..., "Dp": ..., "D": ...}``
(newer ones); both are accepted. Units: mm^2/s.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

#: OSIPI's order of bounds and initial guesses (list form)
OSIPI_ORDER = ("D", "f", "Dp", "S0")
#: OSIPI name -> qmri_labels name
TO_QMRI = {"S0": "S0", "f": "f", "D": "D", "Dp": "Dstar"}


class QmriLabelsIVIM:
    """IVIM fits with the OSIPI wrapper interface.

    Parameters
    ----------
    bvalues : array_like, optional
        Default b-values (s/mm^2) when a fit call gives none.
    thresholds : None
        Not used (no segmented fit); anything else is refused.
    bounds : array_like (2, 4) in OSIPI order ``[D, f, Dp, S0]``, or dict, optional
        Bounds of the MLE (the toolkit's defaults when None). Networks ignore bounds.
    initial_guess : None
        Not supported (the MLE starts from a segmented estimate and several starts).
    estimator : "mle", a NetworkEstimator, or the name/folder of a network bundle
    noise : {"gaussian", "rician"}
        Likelihood of the MLE; ``gaussian`` is least squares and needs no sigma.
    sigma : float, optional
        Noise SD of the *normalised* signals (1 / SNR), required for ``noise="rician"``.
    bvecs : array_like (3, M), optional
        Gradient directions of the default b-values: with ``directions``, whether a shell's
        volumes are averaged (see :func:`qmri_labels.maps.fit_volume`).
    directions : {"auto", "all", "average"}
        Fit every volume or each b-value shell's geometric mean (``auto``: average when a shell
        with b > 0 holds several volumes).
    force : bool
        Fit a protocol that cannot identify IVIM (otherwise refused with a ValueError).
    """

    id_author = "qmri_labels"
    id_algorithm_type = "Bi-exponential fit: batched maximum likelihood (Gaussian or Rician) or a trained network"
    id_return_parameters = "f, D*, D, S0"
    id_units = "seconds per milli metre squared or milliseconds per micro metre squared"

    required_bvalues = 4
    required_thresholds = [0, 0]
    required_bounds = False
    required_bounds_optional = True
    required_initial_guess = False
    required_initial_guess_optional = False
    accepted_dimensions = 1

    supported_bounds = True
    supported_initial_guess = False
    supported_thresholds = False
    supported_dimensions = 1
    supported_priors = False

    result_keys = ["f", "Dp", "D", "S0"]

    def __init__(self, bvalues=None, thresholds=None, bounds=None, initial_guess=None, estimator="mle",
                 noise: str = "gaussian", sigma: float | None = None, bvecs=None, directions: str = "auto",
                 force: bool = False, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected options {sorted(kwargs)}")
        if thresholds is not None:
            raise ValueError("thresholds are not used by this algorithm (it fits all parameters jointly)")
        if initial_guess is not None:
            raise ValueError("initial_guess is not supported: the MLE starts from a segmented estimate")
        if noise not in ("gaussian", "rician"):
            raise ValueError(f"noise must be 'gaussian' or 'rician', got {noise!r}")
        if noise == "rician" and sigma is None and estimator == "mle":
            raise ValueError("noise='rician' needs sigma (noise SD of the normalised signals, 1 / SNR)")
        self.bvalues = None if bvalues is None else np.asarray(bvalues, dtype=np.float64)
        self.thresholds = None
        self.bounds = bounds
        self.initial_guess = None
        self.estimator = estimator
        self.noise = noise
        self.sigma = sigma
        self.bvecs = bvecs
        self.directions = directions
        self.force = force
        self.use_bounds = estimator == "mle"
        self.use_initial_guess = False
        self.deep_learning = estimator != "mle"
        self.supervised = False
        self._network = None

    # -- helpers ------------------------------------------------------------------------------
    def _bounds_in_our_order(self):
        """(2, 4) bounds in qmri_labels order (S0, f, D, Dstar), or None."""
        if self.bounds is None:
            return None
        if isinstance(self.bounds, Mapping):
            missing = set(TO_QMRI) - set(self.bounds)
            if missing:
                raise ValueError(f"bounds dict lacks {sorted(missing)}")
            lookup = {name: self.bounds[name] for name in TO_QMRI}
        else:
            array = np.asarray(self.bounds, dtype=np.float64)
            if array.shape != (2, 4):
                raise ValueError(f"bounds must be (2, 4) in OSIPI order {OSIPI_ORDER}, got shape {array.shape}")
            lookup = {name: array[:, i] for i, name in enumerate(OSIPI_ORDER)}
        return np.array([[lookup[n][k] for n in ("S0", "f", "D", "Dp")] for k in (0, 1)], dtype=np.float64)

    def _estimator(self):
        from qmri_labels.estimators import MLEEstimator

        if isinstance(self.estimator, str) and self.estimator == "mle":
            return MLEEstimator(model="ivim", noise=self.noise, bounds=self._bounds_in_our_order())
        if self._network is None:
            from qmri_labels.estimators.shipped import find_bundle
            from qmri_labels.maps import load_network

            if isinstance(self.estimator, str):
                self._network = load_network(find_bundle(self.estimator))
            else:
                self._network = self.estimator
        return self._network

    def _bvalues(self, bvalues):
        use = bvalues if bvalues is not None else self.bvalues
        if use is None:
            raise ValueError("no b-values: pass bvalues to the call or to the constructor")
        use = np.asarray(use, dtype=np.float64).ravel()
        if use.size < self.required_bvalues:
            raise ValueError(f"{use.size} b-values; this algorithm needs at least {self.required_bvalues}")
        return use

    # -- OSIPI's algorithm methods ------------------------------------------------------------
    def ivim_fit_full_volume(self, signals, bvalues=None, **kwargs) -> dict:
        """Fit every voxel of ``signals (..., M)``; returns ``{"f", "Dp", "D", "S0"}`` maps."""
        from qmri_labels.maps import fit_volume

        if kwargs:
            raise TypeError(f"unexpected options {sorted(kwargs)}")
        bvals = self._bvalues(bvalues)
        data = np.asarray(signals, dtype=np.float64)
        if data.shape[-1] != bvals.size:
            raise ValueError(f"signals have {data.shape[-1]} samples per voxel, bvalues {bvals.size}")
        flat = data.reshape(-1, bvals.size)
        sigma = self.sigma if self.noise == "rician" else None
        bvecs = self.bvecs if bvalues is None else None
        maps = fit_volume(flat, protocol=bvals, estimator=self._estimator(), noise=self.noise, sigma=sigma,
                          chunk_size=65536, bvecs=bvecs, directions=self.directions, force=self.force)
        lead = data.shape[:-1]
        return {"f": maps["f"].reshape(lead), "Dp": maps["Dstar"].reshape(lead), "D": maps["D"].reshape(lead),
                "S0": maps["S0"].reshape(lead)}

    def ivim_fit(self, signals, bvalues=None, **kwargs) -> dict:
        """Fit one voxel; returns floats ``{"f", "Dp", "D", "S0"}``."""
        signals = np.asarray(signals, dtype=np.float64)
        if signals.ndim != 1:
            raise ValueError(f"ivim_fit takes one voxel (1-D signals), got shape {signals.shape}; "
                             "use ivim_fit_full_volume")
        result = self.ivim_fit_full_volume(signals[None], bvalues, **kwargs)
        return {key: float(value[0]) for key, value in result.items()}

    # -- OSIPI's drivers ----------------------------------------------------------------------
    @staticmethod
    def _normalise(data, bvals):
        lowest = np.flatnonzero(bvals == bvals.min())
        factor = np.mean(data[..., lowest], axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return data / factor

    def osipi_fit(self, data, bvalues=None, **kwargs) -> dict:
        """OSIPI's voxel-by-voxel driver: each voxel divided by its mean lowest-b signal, then
        :meth:`ivim_fit`; D and D* are swapped where D > D* (as OSIPI does)."""
        bvals = self._bvalues(bvalues)
        data = np.asarray(data, dtype=np.float64)
        normalised = self._normalise(data, bvals)
        results = {key: np.empty(data.shape[:-1]) for key in self.result_keys}
        for index in np.ndindex(data.shape[:-1]):
            fit = self.D_and_Ds_swap(self.ivim_fit(normalised[index], bvals, **kwargs))
            for key in self.result_keys:
                results[key][index] = fit[key]
        return results

    def osipi_fit_full_volume(self, data, bvalues=None, **kwargs) -> dict:
        """OSIPI's whole-array driver: normalised as :meth:`osipi_fit`, fitted in one batch."""
        bvals = self._bvalues(bvalues)
        data = np.asarray(data, dtype=np.float64)
        return self.ivim_fit_full_volume(self._normalise(data, bvals), bvals, **kwargs)

    @staticmethod
    def D_and_Ds_swap(results: dict) -> dict:
        """Swap D and D* (and f with 1 - f) where the fit put the slow component in D*."""
        if results["D"] > results["Dp"]:
            results = dict(results)
            results["D"], results["Dp"] = results["Dp"], results["D"]
            results["f"] = 1 - results["f"]
        return results

    def osipi_author(self) -> str:
        return self.id_author
