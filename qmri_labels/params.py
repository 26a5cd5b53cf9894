"""scikit-learn's parameter contract, shared by every estimator of the toolkit.

``get_params`` / ``set_params`` / ``repr`` are read off the constructor's signature, so an
estimator only has to store its arguments unchanged in ``__init__``. This module imports
nothing from the toolkit, so that estimators on any layer (``estimators``,
``training.qsm``) can share it.
"""

from __future__ import annotations

import inspect


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``repr`` from the constructor's signature (sklearn style)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments, as given (``deep`` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
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


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b
