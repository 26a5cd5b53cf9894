"""scikit-learn's estimator contract, shared by every estimator of the toolkit.

``__init__`` only stores its arguments, unchanged; ``fit`` returns ``self``; what ``fit``
learns goes to attributes whose names end in ``_``. ``get_params`` / ``set_params`` /
``repr`` are read off the constructor's signature, and :func:`clone` builds a new, unfitted
estimator with the same parameters.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np

#: what a reported SD is: ``truth`` (the spread of the estimate around the true value,
#: calibrated on held-out simulations) or ``label`` (a network's raw spread: around its training
#: label, the self label's Fisher SD, or an ensemble's disagreement; given only when asked for
#: by that name)
SD_KINDS = ("truth", "label")


class SDNotCalibrated(ValueError):
    """An SD against the truth was asked of an estimator whose SD was never calibrated against it."""


class BaseEstimator:
    """``get_params`` / ``set_params`` / ``repr`` from the constructor's signature (scikit-learn style)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments, as given.

        ``deep`` is accepted for scikit-learn; no parameter of the toolkit's estimators is
        itself an estimator, so it changes nothing.
        """
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        """Set constructor arguments by name; returns ``self``. An unknown name is refused."""
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {sorted(valid)}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        changed = [f"{k}={v!r}" for k, v in self.get_params().items()
                   if sig.parameters[k].default is inspect.Parameter.empty or not _same(v, sig.parameters[k].default)]
        return f"{type(self).__name__}({', '.join(changed)})"


def clone(estimator: BaseEstimator) -> BaseEstimator:
    """A new, unfitted estimator with (deep copies of) ``estimator``'s parameters.

    Nothing learned is carried over, and the copy shares no mutable parameter with the
    original, so fitting or changing one leaves the other as it was.
    """
    if not isinstance(estimator, BaseEstimator):
        raise TypeError(f"clone needs an estimator of the toolkit, got {type(estimator).__name__}")
    params = {name: copy.deepcopy(value) for name, value in estimator.get_params(deep=False).items()}
    new = type(estimator)(**params)
    stored = new.get_params(deep=False)
    for name, value in params.items():
        if stored[name] is not value:
            raise RuntimeError(f"{type(estimator).__name__}.__init__ changed its argument {name!r}; the constructor "
                               f"must store its arguments unchanged")
    return new


def as_signals(signals, n_measurements: int) -> tuple[np.ndarray, tuple]:
    """Signals ``(..., M)`` as rows ``(N, M)`` and the leading shape to restore outputs to."""
    signals = np.asarray(signals)
    if signals.dtype.kind not in "fiu":
        raise ValueError(f"signals must be numeric, got dtype {signals.dtype}")
    if signals.ndim == 0 or signals.shape[-1] != n_measurements:
        raise ValueError(f"signals must have shape (..., {n_measurements}) (one value per measurement of the "
                         f"protocol), got {signals.shape}")
    return signals.reshape(-1, n_measurements), signals.shape[:-1]


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b
