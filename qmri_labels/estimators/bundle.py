"""Shareable model bundles: weights plus a manifest, verified before they are read.

A bundle is a folder::

    my_network/
        weights.safetensors   # tensors only: a loader that cannot execute code
        manifest.json         # config, data fingerprints, versions, device, metrics, SHA-256

Loading checks the manifest, the weights file's size and its SHA-256 *before* the bytes are
deserialised, so a tampered, truncated or incomplete bundle is refused with a ``ValueError``
that names the problem. Writing goes to a temporary sibling folder that is renamed into
place, so an existing bundle is never left half overwritten.

The container is generic (a ``state_dict`` and a JSON-serialisable manifest). An estimator's
bundle is written by :func:`save_estimator` and read by :func:`load_estimator`, one layout for
every estimator kind::

    kind      "qmri_labels.<class name>" (e.g. "qmri_labels.QSMEstimator")
    params    the constructor's arguments (what the estimator is rebuilt from)
    network   the architecture the weights belong to
    versions, device, format, format_version, created, weights
    ...       what the estimator records besides (normalisation, data, training, metrics)

Bundles of format version 1 spelled some of this per kind (``qsm_unet``, ``training_config``,
``unet``); they are read as they are (their files are never rewritten), and
:func:`estimator_manifest` gives every manifest in the layout above.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from qmri_labels.fileio import atomic_dir, atomic_write_bytes, to_jsonable
from qmri_labels.provenance import device_info, package_versions

BUNDLE_FORMAT = "qmri_labels.bundle"
#: 2: one estimator layout (kind, params, network) for every estimator
BUNDLE_VERSION = 2
#: format versions this version reads
READABLE_VERSIONS = (1, 2)
#: an estimator bundle's kind: this prefix and the estimator's class name
KIND_PREFIX = "qmri_labels."
#: where the estimator classes live whose names make the kinds
ESTIMATORS_PACKAGE = "qmri_labels.estimators."
#: kinds of format version 1 outside that scheme
LEGACY_KINDS = {"qsm_unet": "qmri_labels.QSMEstimator"}
#: keys of format version 1 that hold what ``params`` / ``network`` hold now
LEGACY_KEYS = {"training_config": "params", "unet": "network"}
MANIFEST_FILE = "manifest.json"
SAFETENSORS_FILE = "weights.safetensors"
TORCH_FILE = "weights.pt"

try:  # safetensors is preferred; torch.load(weights_only=True) is the fallback
    import safetensors.torch as _safetensors
except ImportError:  # pragma: no cover - exercised only without safetensors
    _safetensors = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialise_weights(state_dict: Mapping[str, torch.Tensor]) -> tuple[bytes, str, str]:
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        # safetensors refuses shared storage; a contiguous CPU copy of each tensor avoids it
        tensors[str(name)] = value.detach().to("cpu").contiguous().clone()
    if _safetensors is not None:
        return _safetensors.save(tensors), SAFETENSORS_FILE, "safetensors"
    buffer = io.BytesIO()  # pragma: no cover
    torch.save(tensors, buffer)  # pragma: no cover
    return buffer.getvalue(), TORCH_FILE, "torch"  # pragma: no cover


def save_bundle(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], manifest: Mapping[str, Any],
                *, overwrite: bool = True) -> Path:
    """Write a model bundle folder atomically.

    Parameters
    ----------
    path : path-like
        The bundle folder to create (or replace when ``overwrite``).
    state_dict : mapping of str to Tensor
        The weights (and buffers).
    manifest : mapping
        JSON-serialisable description (config, data fingerprints, metrics, ...). The keys
        ``format``, ``format_version``, ``weights``, ``created`` are set here, and
        ``versions`` / ``device`` are filled in when absent.

    Returns
    -------
    Path of the bundle folder.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; a bundle is a folder")
    data, weights_name, weights_format = _serialise_weights(state_dict)
    full = dict(to_jsonable(dict(manifest)))
    full.setdefault("versions", package_versions())
    full.setdefault("device", device_info())
    full.update(
        format=BUNDLE_FORMAT,
        format_version=BUNDLE_VERSION,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        weights={"file": weights_name, "format": weights_format, "sha256": sha256_bytes(data), "bytes": len(data),
                 "tensors": {k: list(v.shape) for k, v in state_dict.items()}},
    )
    text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False) + "\n"

    with atomic_dir(path, overwrite=True) as staging:
        atomic_write_bytes(staging / weights_name, data)
        atomic_write_bytes(staging / MANIFEST_FILE, text.encode())
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check a bundle's manifest (no weights are read)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model bundle {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model bundle {path} is not a folder (expected {MANIFEST_FILE} and weights inside)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"model bundle {path} has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model bundle {path}: {MANIFEST_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"model bundle {path}: {MANIFEST_FILE} is not a {BUNDLE_FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"model bundle {path}: format version {manifest.get('format_version')!r}, "
                         f"this version reads {' and '.join(map(str, READABLE_VERSIONS))}")
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or not {"file", "format", "sha256", "bytes"} <= set(weights):
        raise ValueError(f"model bundle {path}: manifest lacks the weights entry (file, format, sha256, bytes)")
    if weights["file"] not in (SAFETENSORS_FILE, TORCH_FILE) or weights["format"] not in ("safetensors", "torch"):
        raise ValueError(f"model bundle {path}: unsupported weights file {weights['file']!r} ({weights['format']!r})")
    return manifest


def verify_bundle(path: str | os.PathLike) -> tuple[bytes, dict]:
    """Check a bundle's manifest, weights size and SHA-256; return the raw weights and manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = manifest["weights"]
    weights_path = path / weights["file"]
    if not weights_path.is_file():
        raise ValueError(f"model bundle {path}: weights file {weights['file']} is missing")
    data = weights_path.read_bytes()
    if len(data) != weights["bytes"]:
        raise ValueError(f"model bundle {path}: weights file has {len(data)} bytes, manifest says "
                         f"{weights['bytes']} (truncated or modified)")
    digest = sha256_bytes(data)
    if digest != weights["sha256"]:
        raise ValueError(f"model bundle {path}: SHA-256 of {weights['file']} is {digest[:16]}..., manifest says "
                         f"{weights['sha256'][:16]}... (file tampered with or corrupt); refusing to load it")
    return data, manifest


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load a bundle written by :func:`save_bundle`.

    The checksum is verified before deserialisation, and the weights are read with a loader
    that cannot execute code (safetensors, or ``torch.load(weights_only=True)``).

    Returns
    -------
    state_dict : dict of str to Tensor
    manifest : dict
    """
    data, manifest = verify_bundle(path)
    fmt = manifest["weights"]["format"]
    try:
        if fmt == "safetensors":
            if _safetensors is None:  # pragma: no cover
                raise ValueError("this bundle needs the `safetensors` package")
            state = _safetensors.load(data)
            state = {k: v.to(map_location) for k, v in state.items()}
        else:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except ValueError:
        raise
    except Exception as exc:  # the checksum matched, but the bytes are still not valid weights
        raise ValueError(f"model bundle {path}: weights could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model bundle {path}: weights are not a mapping of tensors")
    expected = manifest["weights"].get("tensors")
    if expected is not None and {k: list(v.shape) for k, v in state.items()} != expected:
        raise ValueError(f"model bundle {path}: tensor names/shapes differ from the manifest")
    return state, manifest


# -- estimator bundles ------------------------------------------------------------------------

def estimator_kind(estimator_class: type) -> str:
    """The bundle kind of an estimator class: ``"qmri_labels.<class name>"`` of the toolkit's
    class it is or derives from (a subclass reads and writes its parent's bundles)."""
    for cls in estimator_class.__mro__:
        if cls.__module__.startswith(ESTIMATORS_PACKAGE) and cls.__name__.endswith("Estimator") \
                and cls.__name__ != "BaseEstimator":
            return KIND_PREFIX + cls.__name__
    raise TypeError(f"{estimator_class.__name__} is not an estimator of {ESTIMATORS_PACKAGE}")


def manifest_kind(manifest: Mapping) -> str | None:
    """The kind of a bundle's manifest in the current scheme (``None``: not an estimator's)."""
    kind = manifest.get("kind")
    return LEGACY_KINDS.get(kind, kind)


def estimator_manifest(manifest: Mapping) -> dict:
    """A manifest in the one estimator layout, whatever format version wrote it.

    Format version 1's per-kind spellings are read into ``kind``, ``params`` and ``network``;
    everything else is kept as it is.
    """
    out = dict(manifest)
    out["kind"] = manifest_kind(manifest)
    for old, new in LEGACY_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    out.pop("estimator", None)  # version 1's second name of the QSM kind
    return out


def build_manifest(estimator_class: type, params: Mapping, network: Mapping, record: Mapping,
                   extra: Mapping | None = None) -> dict:
    """An estimator's manifest in the one layout.

    Parameters
    ----------
    estimator_class : type
        Gives the ``kind``.
    params : mapping
        The constructor's arguments as JSON types.
    network : mapping
        The architecture the weights belong to.
    record : mapping
        What the estimator records besides (normalisation, data, training, metrics, ...).
    extra : mapping or None
        Further entries from the caller (e.g. a workflow's command); they may replace entries of
        ``record`` but not ``kind``, ``params`` or ``network`` (a version 1 spelling of those,
        carried over from an older manifest, is dropped).

    Returns
    -------
    dict
    """
    extra = {k: v for k, v in dict(extra or {}).items() if k not in LEGACY_KEYS and k != "estimator"}
    return {**dict(record), **extra, "kind": estimator_kind(estimator_class), "params": dict(params),
            "network": dict(network)}


def save_estimator(estimator, path: str | os.PathLike, manifest: Mapping, *, overwrite: bool = True) -> Path:
    """Write a fitted estimator's bundle: ``estimator.network_``'s weights and ``manifest``
    (made by :func:`build_manifest`).

    After a distributed fit only rank 0 writes (every rank holds the same weights); the other
    ranks return the path without touching it.
    """
    if getattr(estimator, "global_rank_", 0) != 0:
        return Path(path)
    kind = estimator_kind(type(estimator))
    if manifest.get("kind") != kind or not {"params", "network"} <= set(manifest):
        raise ValueError(f"a {kind} bundle needs a manifest of kind {kind} with params and network "
                         f"(build_manifest), got kind {manifest.get('kind')!r}")
    return save_bundle(path, estimator.network_.state_dict(), manifest, overwrite=overwrite)


def load_estimator(estimator_class: type, path: str | os.PathLike,
                   map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read the bundle of an ``estimator_class`` (checksum verified before the weights are read).

    Returns
    -------
    state_dict : dict of str to Tensor
    manifest : dict
        In the one layout (:func:`estimator_manifest`).
    """
    kind = estimator_kind(estimator_class)
    found = read_manifest(path).get("kind")
    if LEGACY_KINDS.get(found, found) != kind:
        raise ValueError(f"{path} is a bundle of kind {found!r}, not a {kind}")
    state, manifest = load_bundle(path, map_location)
    return state, estimator_manifest(manifest)
