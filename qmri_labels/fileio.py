"""Writing files safely and plainly.

Every file the toolkit writes goes through :func:`atomic_write_bytes` (a temporary file in the
target folder, then a rename), so that a crash never leaves a half-written result or damages
an earlier one; a whole folder (a model bundle, the fit command's output) is built with
:func:`atomic_dir` and renamed into place when complete. Manifests and configurations are
written as JSON of plain types (:func:`to_jsonable`), and configurations are combined with
:func:`deep_merge`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def apply_umask_permissions(folder: str | os.PathLike) -> None:
    """Give a folder made by ``mkdtemp`` (0700) and the files in it (``mkstemp``: 0600) the
    permissions of ordinary new entries under the user's umask."""
    folder = Path(folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in folder.iterdir():
        if entry.is_file():
            os.chmod(entry, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a hidden temporary sibling and rename it into place when complete.

    ``with atomic_dir(out) as staging: write files into staging``. On a clean exit the staging
    folder becomes ``path`` (an existing ``path`` is replaced only with ``overwrite``; it is
    first moved aside, so that at every instant ``path`` is the complete old folder, absent,
    or the complete new one). On an exception the staging folder is removed and ``path`` is
    untouched. The result gets the usual permissions of the user's umask.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    NotADirectoryError
        ``path`` exists and is not a folder.
    """
    path = Path(path).absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
        apply_umask_permissions(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, retired / "previous")
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(retired / "previous", path)
                raise
            finally:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path = Path(path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert NumPy/torch scalars and arrays, paths and tuples into plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON of plain types (see :func:`to_jsonable`), atomically."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=sort_keys) + "\n")


def read_verified_npz(path: str | os.PathLike, build, what: str, format_version: int | None = None):
    """Read an ``.npz`` file the toolkit wrote and check it against its stored fingerprint.

    ``build(npz) -> object`` makes the object from the open file's arrays; the object's
    ``fingerprint`` must equal the file's ``fingerprint`` entry. With ``format_version`` the
    file's ``format_version`` entry must match too. Anything unreadable, truncated, of another
    format or modified raises a ``ValueError`` that names the file and ``what`` it should be.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            version = None if format_version is None else int(npz["format_version"])
            stored = str(npz["fingerprint"])
            obj = build(npz)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from exc
    if version != format_version:
        raise ValueError(f"{path}: {what} format {version}, this version reads {format_version}")
    if obj.fingerprint != stored:
        raise ValueError(f"{path}: fingerprint mismatch (file corrupt or modified): stored {stored[:12]}, "
                         f"computed {obj.fingerprint[:12]}")
    return obj


def deep_merge(base: Mapping, override: Mapping, *, strict: bool = False, free: Iterable[str] = (),
               allow: Iterable[str] = (), _path: str = "") -> dict:
    """``base`` with ``override`` laid over it; nested mappings are merged key by key.

    Parameters
    ----------
    base, override : Mapping
    strict : bool
        A key of ``override`` that ``base`` does not have is a ``ValueError`` naming its dotted
        path and the known keys, at every level where ``base`` holds a mapping. Not checked
        below: a value whose default is not a mapping or is an empty mapping (e.g. ``None``: the
        given value replaces it whole), and the dotted paths in ``free``; their consumers
        validate them.
    free : iterable of str
        Dotted paths of free-form sub-mappings (merged, not checked) when ``strict``.
    allow : iterable of str
        Extra top-level keys accepted when ``strict`` (e.g. ``name``, ``description``).
    """
    free = tuple(free)
    if strict:
        known = set(base) | (set(allow) if not _path else set())
        unknown = [key for key in override if key not in known]
        if unknown:
            where = f" in {_path!r}" if _path else ""
            raise ValueError(f"unknown configuration key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(_path + '.' + str(k) if _path else str(k)) for k in unknown)}{where}; "
                             f"known: {', '.join(sorted(map(str, base)))}")
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            path = f"{_path}.{key}" if _path else str(key)
            check = strict and path not in free and bool(out[key])
            out[key] = deep_merge(out[key], value, strict=check, free=free, _path=path)
        else:
            out[key] = copy.deepcopy(value)
    return out
