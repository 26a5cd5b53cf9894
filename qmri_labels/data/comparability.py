"""Comparability of results: claims that one estimator beats another hold only on a *common*
test set (Oh et al., 2021), so results computed on different test data are refused
(:func:`check_comparable`), by the fingerprints their manifests record (:func:`data_record`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class IncomparableResultsError(ValueError):
    """Results computed on different test data were about to be compared."""


def data_record(train=None, test=None, **more) -> dict:
    """``{"train": fingerprint, "test": fingerprint, ...}`` for a result's manifest.

    Accepts datasets (anything with ``fingerprint``) or fingerprint strings.
    """
    record = {}
    for split, data in {"train": train, "test": test, **more}.items():
        if data is not None:
            record[split] = data if isinstance(data, str) else data.fingerprint
    return record


def _test_fingerprint(result: Any, label: str) -> str:
    if isinstance(result, str):
        return result
    if hasattr(result, "fingerprint") and not isinstance(result, Mapping):
        return result.fingerprint
    if isinstance(result, Mapping):
        for path in (("test_fingerprint",), ("data_fingerprints", "test"), ("fingerprints", "test"),
                     ("manifest", "data_fingerprints", "test")):
            node = result
            for key in path:
                node = node.get(key) if isinstance(node, Mapping) else None
            if isinstance(node, str):
                return node
    raise ValueError(f"result {label!r} records no test-data fingerprint (expected 'test_fingerprint' or "
                     "'data_fingerprints': {'test': ...}); it cannot be compared fairly")


@dataclass(frozen=True)
class Comparability:
    """Outcome of :func:`check_comparable`."""

    comparable: bool
    fingerprints: dict
    message: str

    def __bool__(self) -> bool:
        return self.comparable


def check_comparable(results: Mapping[str, Any] | Iterable[Any], *, strict: bool = True) -> Comparability:
    """Check that results were computed on the same test data before comparing them.

    Parameters
    ----------
    results : mapping name -> result, or iterable of results
        Each result is a test fingerprint string, a dataset, or a record/manifest dict with
        ``test_fingerprint`` or ``data_fingerprints["test"]``.
    strict : bool
        ``True`` (default): raise :class:`IncomparableResultsError` (a ``ValueError``) when the
        test fingerprints differ. ``False``: return a flagged :class:`Comparability` and emit a
        warning.
    """
    items = dict(results) if isinstance(results, Mapping) else {str(i): r for i, r in enumerate(results)}
    if len(items) < 2:
        raise ValueError("check_comparable needs at least two results")
    prints = {label: _test_fingerprint(result, label) for label, result in items.items()}
    groups: dict[str, list[str]] = {}
    for label, fp in prints.items():
        groups.setdefault(fp, []).append(label)
    if len(groups) == 1:
        return Comparability(True, prints, f"all {len(prints)} results share test data {next(iter(groups))[:12]}")
    detail = "; ".join(f"{fp[:12]}: {', '.join(labels)}" for fp, labels in groups.items())
    message = (f"results were computed on {len(groups)} different test sets ({detail}); "
               "differences between them mix the estimators' quality with the data's")
    if strict:
        raise IncomparableResultsError(f"refusing to compare: {message}")
    warnings.warn(f"NOT COMPARABLE: {message}", RuntimeWarning, stacklevel=2)
    return Comparability(False, prints, "NOT COMPARABLE: " + message)
