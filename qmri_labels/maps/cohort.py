"""Mapping a cohort in shards: which scans exist, which shard maps which, which are done.

Pure helpers for the fit command's cohort mode (``python -m qmri_labels.fit`` over many
scans with ``--shard I/N``), so that ``N`` array jobs of a cluster scheduler split the scans
without talking to each other and a rerun skips what is finished:

* :func:`discover_scans` lists the scans of a BIDS-like folder (every ``*_dwi.nii.gz`` with
  its ``.bval``, and ``.bvec`` where present) or of a list file, in one sorted order that
  every job computes alike;
* :func:`parse_shard` and :func:`select_shard` give job ``I`` of ``N`` every ``N``-th scan
  from ``I`` on (0-based; shard sizes differ by at most one);
* :func:`output_checksums` are what a finished scan's manifest records, and
  :func:`outputs_verified` checks them (and, optionally, that the inputs are still the ones
  that were mapped), so that only a complete, intact result is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from qmri_labels.data.io import sha256_file

DWI_SUFFIXES = ("_dwi.nii.gz", "_dwi.nii")
#: manifest key holding ``{output file name: SHA-256}``
CHECKSUM_KEY = "output_sha256"


@dataclass(frozen=True)
class Scan:
    """One diffusion scan of a cohort.

    ``name`` is the DWI path relative to the cohort's folder (or list file) without
    ``_dwi.nii[.gz]``; it is unique within the cohort and names the scan's output folder.
    """

    name: str
    dwi: Path
    bval: Path
    bvec: Path | None = None
    mask: Path | None = None


def _stem(path: Path) -> str:
    for suffix in DWI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)] + "_dwi"
    raise ValueError(f"{path}: a diffusion series must be named *_dwi.nii.gz or *_dwi.nii")


def _scan(dwi: Path, root: Path, mask: Path | None = None) -> Scan:
    stem = _stem(dwi)
    bval = dwi.with_name(stem + ".bval")
    if not bval.is_file():
        raise ValueError(f"{dwi}: no b-value file {bval.name} next to it")
    bvec = dwi.with_name(stem + ".bvec")
    if mask is not None and not mask.is_file():
        raise ValueError(f"{dwi}: mask {mask} does not exist")
    try:
        relative = dwi.resolve().relative_to(root.resolve())
    except ValueError:
        relative = Path(dwi.name)
    name = str(relative.with_name(stem[: -len("_dwi")])).replace("\\", "/")
    return Scan(name=name, dwi=dwi, bval=bval, bvec=bvec if bvec.is_file() else None, mask=mask)


def discover_scans(source: str | Path) -> list[Scan]:
    """The scans of a folder or a list file, sorted by name.

    Parameters
    ----------
    source : path
        A folder: every ``*_dwi.nii.gz`` (or ``*_dwi.nii``) below it, BIDS-like
        (``sub-01/dwi/sub-01_dwi.nii.gz`` with ``sub-01_dwi.bval`` and ``.bvec`` beside it).
        A text file: one DWI path per line, optionally followed by whitespace and a mask path;
        relative paths are relative to the list file; empty lines and ``#`` comments are skipped.

    Raises
    ------
    ValueError
        No scan found, a DWI without its ``.bval``, a missing file, or two scans with one name.
    """
    source = Path(source)
    if source.is_dir():
        root = source
        dwis = sorted({p for suffix in DWI_SUFFIXES for p in source.rglob(f"*{suffix}") if p.is_file()})
        scans = [_scan(p, root) for p in dwis]
    elif source.is_file():
        root = source.parent
        scans = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) > 2:
                raise ValueError(f"{source}, line {number}: expected 'DWI [MASK]', got {len(fields)} fields")
            paths = [p if p.is_absolute() else root / p for p in map(Path, fields)]
            if not paths[0].is_file():
                raise ValueError(f"{source}, line {number}: {paths[0]} does not exist")
            scans.append(_scan(paths[0], root, paths[1] if len(paths) > 1 else None))
    else:
        raise ValueError(f"cohort {source} is neither a folder nor a list file")
    if not scans:
        raise ValueError(f"no *_dwi.nii.gz scans in {source}")
    names = [s.name for s in scans]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"cohort {source}: several scans named {duplicates}")
    return sorted(scans, key=lambda s: s.name)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (e.g. ``--shard $SLURM_ARRAY_TASK_ID/8``)."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with whole numbers (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs N >= 1 and 0 <= I < N (0-based), got {text!r}")
    return index, count


def select_shard(scans: Sequence[Scan], index: int, count: int) -> list[Scan]:
    """Shard ``index`` of ``count``: scans ``index, index + count, ...`` of the sorted list.

    The shards of ``0 .. count - 1`` are disjoint, cover every scan and differ in size by at
    most one; a job needs nothing but its own ``index`` and ``count``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: needs count >= 1 and 0 <= index < count")
    ordered = sorted(scans, key=lambda s: s.name)
    return list(ordered[index::count])


def output_checksums(out_dir: str | Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: SHA-256}`` of the output files ``names`` in ``out_dir`` (for the manifest)."""
    out_dir = Path(out_dir)
    return {name: sha256_file(out_dir / name) for name in sorted(names)}


def outputs_verified(out_dir: str | Path, inputs: Mapping[str, str | Path | None] | None = None) -> bool:
    """Whether ``out_dir`` holds a complete, intact result (so the scan can be skipped).

    True only if ``out_dir/manifest.json`` reads, its ``outputs`` (file -> description) are all
    covered by ``output_sha256`` (file -> SHA-256, ``manifest.json`` itself excepted), and every
    such file exists with that checksum; with ``inputs`` (role -> path, e.g.
    ``{"dwi": ..., "bval": ...}``), also only if each role's ``manifest["inputs"][role]["sha256"]``
    matches the file now (a changed input is mapped again).
    """
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    checksums = manifest.get(CHECKSUM_KEY) if isinstance(manifest, dict) else None
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    if not isinstance(checksums, dict) or not isinstance(outputs, dict):
        return False
    if set(outputs) - {"manifest.json"} - set(checksums):
        return False
    for name, expected in checksums.items():
        path = out_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            return False
        if sha256_file(path) != expected:
            return False
    for role, path in (inputs or {}).items():
        if path is None:
            continue
        recorded = (manifest.get("inputs") or {}).get(role)
        if not isinstance(recorded, dict) or not Path(path).is_file() or recorded.get("sha256") != sha256_file(path):
            return False
    return True
