"""One fingerprint for data: the SHA-256 of a description and of arrays' values.

Datasets, phantom sets, evaluation grids and training arrays are identified by it in caches,
manifests and comparability checks. The values enter in little-endian byte order, and each
array's description (dtype and shape) is that of its little-endian form, so that the same
values give the same fingerprint on any machine and from any file, whatever byte order they
were read in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["canonical_json", "fingerprint"]


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces: equal values, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _little_endian(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def fingerprint(header: str | bytes, arrays: Iterable[np.ndarray] | Mapping[str, np.ndarray] = ()) -> str:
    """SHA-256 (hex) of ``header`` followed by each array's description and values.

    Parameters
    ----------
    header : str or bytes
        What the arrays are (a canonical spec, see :func:`canonical_json`); alone, without
        arrays, the fingerprint of a description.
    arrays : sequence of ndarray, or mapping name -> ndarray
        A sequence: each array is described by its dtype and shape (``"<f4(100, 10)"``). A
        mapping: the arrays in sorted name order, each described by its name and shape (the
        caller fixes the dtype).

    Returns
    -------
    str
        64 hexadecimal characters.
    """
    h = hashlib.sha256(header.encode() if isinstance(header, str) else bytes(header))
    if isinstance(arrays, Mapping):
        items = [(str(name), _little_endian(arrays[name])) for name in sorted(arrays)]
        described = [(f"{name}{a.shape}", a) for name, a in items]
    else:
        described = [(f"{a.dtype.str}{a.shape}", a) for a in map(_little_endian, arrays)]
    for description, a in described:
        h.update(description.encode())
        h.update(a.tobytes())
    return h.hexdigest()
