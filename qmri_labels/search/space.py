"""The one search-space format of :mod:`qmri_labels.search`.

A space maps a hyperparameter name to either

* a list of choices (categorical): ``"activation": ["elu", "relu"]``, ``"width_factor": [1, 2, 4]``
  (``None``, booleans, numbers and strings may be mixed); or
* a range ``{"low": L, "high": H, "log": bool}``: integers when both bounds are integers and
  ``log`` is false, floats otherwise (``log: true`` draws on a log scale and needs ``L > 0``).

The same format is written in a study's YAML file (the ``search_space`` of kind ``hparam``) and
in Python (:data:`qmri_labels.search.tuning.DEFAULT_SPACE`).
"""

from __future__ import annotations

from typing import Iterable, Mapping

__all__ = ["check_space", "suggest", "is_int_range", "contains"]

RANGE_KEYS = ("low", "high", "log")


def is_int_range(spec: Mapping) -> bool:
    """Whether the range ``spec`` draws integers (both bounds integers, not on a log scale)."""
    return (all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high"))
            and not spec.get("log"))


def check_space(space: Mapping, searchable: Iterable[str] | None = None) -> dict:
    """``space`` checked (see the module docstring); ValueError naming a bad entry.

    ``searchable``: the names a caller can search over (None: any).
    """
    if not isinstance(space, Mapping) or not space:
        raise ValueError("search space must be a non-empty mapping of hyperparameter -> choices or range")
    allowed = None if searchable is None else list(searchable)
    out = {}
    for name, spec in space.items():
        if allowed is not None and name not in allowed:
            raise ValueError(f"search space: cannot search over {name!r}; searchable: {', '.join(allowed)}")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError(f"search_space.{name}: empty list of choices")
            out[name] = list(spec)
        elif isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(RANGE_KEYS))
            if unknown:
                raise ValueError(f"search_space.{name}: unknown range keys {unknown}; known: {', '.join(RANGE_KEYS)}")
            if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
                raise ValueError(f"search_space.{name}: a range needs low < high, got {dict(spec)}")
            if spec.get("log") and spec["low"] <= 0:
                raise ValueError(f"search_space.{name}: a log range needs low > 0")
            out[name] = dict(spec)
        else:
            raise ValueError(f"search_space.{name}: give a list of choices or {{low, high, log}}, got {spec!r}")
    return out


def suggest(trial, space: Mapping) -> dict:
    """Draw one point of ``space`` with an Optuna trial, in the space's order."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, (list, tuple)):
            params[name] = trial.suggest_categorical(name, list(spec))
        elif is_int_range(spec):
            params[name] = trial.suggest_int(name, spec["low"], spec["high"])
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return params


def contains(spec, value) -> bool:
    """Whether ``value`` is a point of the space entry ``spec`` (a categorical choice matches
    only its own kind: ``None``, booleans and strings are not numbers)."""
    if isinstance(spec, (list, tuple)):
        return any(_same_choice(value, choice) for choice in spec)
    try:
        return bool(spec["low"] <= value <= spec["high"])
    except (TypeError, ValueError):
        return False


def _same_choice(value, choice) -> bool:
    for kind in (type(None), bool, str):
        if isinstance(value, kind) or isinstance(choice, kind):
            return isinstance(value, kind) and isinstance(choice, kind) and value == choice
    try:
        return bool(value == choice)
    except (TypeError, ValueError):
        return False
