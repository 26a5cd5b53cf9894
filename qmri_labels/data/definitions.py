"""Definitions of the named common datasets: read from ``studies/datasets/*.yaml`` (or given
inline), with ``base`` chains merged and every split resolved to a generator-ready spec.

A definition file looks like::

    name: ivim_epstein_snr15
    base: ivim_epstein_snr30          # optional: inherit everything, then override
    description: Epstein's protocol at SNR 15.
    kind: voxel                       # voxel (a DatasetSpec) or qsm (synthetic phantoms)
    spec: {snr: 15}                   # shared by every split
    splits:
      train: {n: 100000, seed: 1501}
      test: {n: 20000, seed: 1502}
      validation: {n: 10000, seed: 1503}   # optional (used by the hyperparameter search)

A split set to ``null`` is removed (e.g. an inherited validation split). A QSM split holds the
fields of :class:`~qmri_labels.data.qsm.QSMPhantomSpec` plus
:data:`~qmri_labels.data.qsm.RECIPE_FIELDS` (``truncate_to``, ``bfr``, ``resample_to``). Building and caching
the data is :mod:`qmri_labels.data.registry`'s job.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from qmri_labels.data.datasets import DatasetSpec
from qmri_labels.data.priors import TissueMixturePrior, UniformPrior
from qmri_labels.data.qsm import QSMPhantomSpec
from qmri_labels.fileio import deep_merge
from qmri_labels.fitting.bfr import bfr_record
from qmri_labels.paths import studies_dir

SPLITS = ("train", "test")
KINDS = ("voxel", "qsm")


def datasets_dir() -> Path:
    """Folder of dataset definitions: ``<studies_dir()>/datasets``."""
    return studies_dir() / "datasets"


def _canonical_prior(model: str, prior: Any) -> dict:
    """Complete a short prior dict (``{kind: uniform}``) with the prior's own defaults."""
    if prior is None:
        prior = {"kind": "uniform"}
    if not isinstance(prior, Mapping):
        raise ValueError(f"prior must be a mapping, got {type(prior).__name__}")
    prior = dict(prior)
    kind = prior.pop("kind", "uniform")
    prior.pop("model", None)
    classes = {"uniform": UniformPrior, "tissue_mixture": TissueMixturePrior}
    if kind not in classes:
        raise ValueError(f"unknown prior kind {kind!r}; known: {sorted(classes)}")
    try:
        return classes[kind](model=model, **prior).to_dict()
    except TypeError as exc:
        raise ValueError(f"bad {kind} prior settings {sorted(prior)}: {exc}") from exc


@dataclass(frozen=True)
class DatasetDefinition:
    """A named dataset: one resolved, generator-ready spec per split.

    Attributes
    ----------
    name : str
    kind : {"voxel", "qsm"}
    description : str
    splits : dict
        ``split -> resolved spec dict`` (for ``voxel`` the fields of :class:`DatasetSpec`).
    source : Path or None
        The YAML file it came from.
    """

    name: str
    kind: str
    description: str
    splits: dict
    source: Path | None = field(default=None, compare=False)

    def spec_dict(self, split: str, **overrides) -> dict:
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        spec = deep_merge(self.splits[split], overrides)
        return _resolve_split(self.kind, spec, f"{self.name}.{split}")

    def spec(self, split: str, **overrides):
        """The generator spec of one split: a :class:`DatasetSpec` for voxel datasets, a dict (the
        recipe of :func:`~qmri_labels.data.qsm.generate_qsm`) for QSM."""
        d = self.spec_dict(split, **overrides)
        return DatasetSpec.from_dict(d) if self.kind == "voxel" else d

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "splits": copy.deepcopy(self.splits)}


def _resolve_split(kind: str, spec: dict, where: str) -> dict:
    """Validate one split's spec and fill in defaults, so that equal data have equal dicts."""
    if kind == "voxel":
        spec = dict(spec)
        model = spec.get("model", "ivim")
        spec["model"] = model
        spec["prior"] = _canonical_prior(model, spec.get("prior"))
        unknown = set(spec) - set(DatasetSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown dataset fields {sorted(unknown)}; "
                             f"known: {sorted(DatasetSpec.__dataclass_fields__)}")
        try:
            return DatasetSpec(**{**spec, "protocol": tuple(spec.get("protocol", DatasetSpec().protocol))}).to_dict()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    spec = dict(spec)
    truncate_to = spec.pop("truncate_to", None)
    bfr = spec.pop("bfr", None)
    resample_to = spec.pop("resample_to", None)
    try:
        phantom = QSMPhantomSpec.from_dict(spec).to_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if bfr is not None:
        bfr = {"method": bfr} if isinstance(bfr, str) else dict(bfr)
        try:
            bfr = bfr_record(bfr.pop("method", None), **bfr)
        except ValueError as exc:
            raise ValueError(f"{where}: bfr: {exc}") from None
        if phantom["field_kind"] != "total":
            raise ValueError(f"{where}: bfr {bfr!r} needs field_kind: total (got {phantom['field_kind']!r})")
    phantom["bfr"] = bfr
    if truncate_to is not None:
        truncate_to = [float(v) for v in truncate_to]
        if len(truncate_to) != 3:
            raise ValueError(f"{where}: truncate_to needs 3 voxel sizes, got {truncate_to}")
        for base, target, size in zip(phantom["voxel_size"], truncate_to, phantom["shape"]):
            if target < base:
                raise ValueError(f"{where}: truncate_to {truncate_to} must not be finer than voxel_size "
                                 f"{phantom['voxel_size']} (truncation only coarsens)")
            new_size = size * base / target
            if abs(new_size - round(new_size)) > 1e-6:
                raise ValueError(f"{where}: shape {phantom['shape']} is not divisible by the resolution ratio "
                                 f"{target}/{base} on every axis")
        if truncate_to == phantom["voxel_size"]:
            truncate_to = None
    phantom["truncate_to"] = truncate_to
    if resample_to is not None:
        resample_to = _coarser_voxels(resample_to, truncate_to or phantom["voxel_size"], phantom["shape"],
                                      phantom["voxel_size"], "resample_to", where)
        if bfr is None:
            raise ValueError(f"{where}: resample_to coarsens the local fields after bfr; without bfr use truncate_to")
        # written only when set, so that the recipes (and fingerprints) of other datasets stay as they were
        phantom["resample_to"] = resample_to
    return phantom


def _coarser_voxels(target, current, shape, base, key: str, where: str) -> list[float]:
    """``target`` voxel size checked: 3 sizes, not finer than ``current``, whole voxels of the grid."""
    target = [float(v) for v in target]
    if len(target) != 3:
        raise ValueError(f"{where}: {key} needs 3 voxel sizes, got {target}")
    for now, new, size, first in zip(current, target, shape, base):
        if new < now:
            raise ValueError(f"{where}: {key} {target} must not be finer than {list(current)} (truncation only coarsens)")
        n_new = size * first / new
        if abs(n_new - round(n_new)) > 1e-6:
            raise ValueError(f"{where}: shape {shape} is not divisible by the resolution ratio {new}/{first} on every axis")
    return target


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a dataset definition must be a mapping")
    return data


def _definition_files(directory: Path | None = None) -> dict[str, Path]:
    directory = Path(directory) if directory is not None else datasets_dir()
    files = {}
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        name = _read_yaml(path).get("name", path.stem)
        if name in files:
            raise ValueError(f"dataset {name!r} is defined twice: {files[name]} and {path}")
        files[name] = path
    return files


def list_datasets(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the datasets defined in ``directory`` (default :func:`datasets_dir`)."""
    return sorted(_definition_files(directory))


def definition_from_dict(raw: Mapping, *, directory: str | os.PathLike | None = None,
                         source: Path | None = None, _seen: tuple = ()) -> DatasetDefinition:
    """Build a :class:`DatasetDefinition` from a mapping (inline configs use this too).

    Parameters
    ----------
    raw : Mapping
        The definition (``name``, ``kind``, ``description``, ``spec``, ``splits``, optionally
        ``base``).
    directory : path, optional
        Where ``base`` definitions are looked up (default :func:`datasets_dir`).
    source : Path, optional
        The file the mapping came from (recorded, and its stem names an unnamed definition).

    Returns
    -------
    DatasetDefinition
    """
    raw = _raw_with_bases(raw, directory=directory, source=source, seen=_seen)
    name = raw["name"]
    unknown = set(raw) - {"name", "kind", "description", "spec", "splits"}
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown keys {sorted(unknown)}")
    kind = raw.get("kind", "voxel")
    if kind not in KINDS:
        raise ValueError(f"dataset {name!r}: kind must be one of {KINDS}, got {kind!r}")
    shared = raw.get("spec") or {}
    # a split set to null (e.g. to drop an inherited validation split) is removed
    splits_raw = {k: v for k, v in (raw.get("splits") or {}).items() if v is not None}
    if not splits_raw:
        raise ValueError(f"dataset {name!r}: needs a 'splits' mapping (at least train and test)")
    missing = set(SPLITS) - set(splits_raw)
    if missing:
        raise ValueError(f"dataset {name!r}: missing splits {sorted(missing)}")
    splits = {}
    for split, values in splits_raw.items():
        merged = deep_merge(shared, values or {})
        splits[split] = _resolve_split(kind, merged, f"{name}.{split}")
    seeds = {split: s["seed"] for split, s in splits.items()}
    if len(set(seeds.values())) != len(seeds):
        raise ValueError(f"dataset {name!r}: splits share a seed {seeds}; train and test must not share draws")
    return DatasetDefinition(name=name, kind=kind, description=str(raw.get("description", "")).strip(),
                             splits=splits, source=source)


def _raw_with_bases(raw: Mapping, *, directory, source: Path | None, seen: tuple) -> dict:
    """The raw definition with its ``base`` chain merged in (child keys win, split by split)."""
    raw = dict(raw)
    name = raw.get("name") or (source.stem if source else None)
    if not name:
        raise ValueError("a dataset definition needs a name")
    raw["name"] = name
    if "base" not in raw:
        return raw
    base_name = raw.pop("base")
    if base_name in seen + (name,):
        raise ValueError(f"dataset {name!r}: circular base chain {(*seen, name, base_name)}")
    files = _definition_files(directory)
    if base_name not in files:
        raise ValueError(f"dataset {name!r}: unknown base {base_name!r}")
    base = _raw_with_bases(_read_yaml(files[base_name]), directory=directory, source=files[base_name],
                           seen=seen + (name,))
    base.pop("name")
    return deep_merge(base, raw)


def get_definition(name: str | Mapping | DatasetDefinition, *, directory: str | os.PathLike | None = None,
                   _seen: tuple = ()) -> DatasetDefinition:
    """The definition of a named dataset (or of an inline mapping, or a path to a YAML file).

    Parameters
    ----------
    name : str, Mapping or DatasetDefinition
        A name defined in ``directory``, a path to a definition file, an inline definition, or
        a definition (returned as it is).
    directory : path, optional
        Folder of the definitions (default :func:`datasets_dir`).

    Returns
    -------
    DatasetDefinition
    """
    if isinstance(name, DatasetDefinition):
        return name
    if isinstance(name, Mapping):
        return definition_from_dict(name, directory=directory, _seen=_seen)
    candidate = Path(str(name))
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return definition_from_dict(_read_yaml(candidate), directory=directory, source=candidate, _seen=_seen)
    files = _definition_files(directory)
    if name not in files:
        raise ValueError(f"unknown dataset {name!r}; defined: {', '.join(sorted(files)) or '(none)'} "
                         f"in {Path(directory) if directory else datasets_dir()}")
    return definition_from_dict(_read_yaml(files[name]), directory=directory, source=files[name], _seen=_seen)
