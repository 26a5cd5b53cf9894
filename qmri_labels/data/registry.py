"""Named common datasets: defined once in ``studies/datasets/*.yaml``, built deterministically,
cached on disk by fingerprint and loadable by name.

Oh et al. (2021) showed that a network looks best on test data that shares its training data's
characteristics, so claims that one network beats another only hold on a *common* test set.
This module gives every such set a name (``ivim_epstein_snr30``, ``qsm_synthetic_1x1x3mm``,
...), builds it the same way on every machine, and refuses to compare results whose test data
differ (:func:`check_comparable`).

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

A split set to ``null`` is removed (e.g. an inherited validation split).

Python::

    from qmri_labels.data.registry import load_dataset, check_comparable
    train = load_dataset("ivim_epstein_snr30", "train")
    test = load_dataset("ivim_epstein_snr30", "test")

Command line::

    python -m qmri_labels.data.registry list
    python -m qmri_labels.data.registry show ivim_epstein_snr30
    python -m qmri_labels.data.registry build ivim_epstein_snr30 [--split test]

Cached files live in ``qmri_labels.paths.cache_dir() / "datasets"``, named by a hash of the
resolved definition and of the generating code; they are written atomically and verified on
load (:meth:`Dataset.load` checks the fingerprint); a corrupt or stale file is rebuilt.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml

from qmri_labels.data.datasets import Dataset, DatasetSpec
from qmri_labels.data.priors import TissueMixturePrior, UniformPrior
from qmri_labels.fileio import atomic_write_bytes, deep_merge, read_verified_npz
from qmri_labels.paths import cache_dir, studies_dir

SPLITS = ("train", "test")
KINDS = ("voxel", "qsm")
#: bump when the on-disk layout or the generation recipe changes in a way the key cannot see
REGISTRY_VERSION = 1


class IncomparableResultsError(ValueError):
    """Results computed on different test data were about to be compared."""


# --------------------------------------------------------------------------------------------
# definitions
# --------------------------------------------------------------------------------------------


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


#: a QSM split: the fields of :class:`qmri_labels.data.phantoms.QSMPhantomSpec` (phantoms,
#: fields and noise at ``voxel_size``) plus ``truncate_to``, the voxel size after k-space
#: truncation (``None``: keep the phantom resolution), and ``bfr``, a background-field removal
#: method of :mod:`qmri_labels.fitting.bfr` applied (after any truncation) to a total field
#: (``field_kind: total``), which gives local fields on the method's eroded mask: a method name
#: or ``{method: NAME, option: value, ...}`` (resolved with every default option written out)
QSM_EXTRA_FIELDS = ("truncate_to", "bfr")


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
        """The generator spec of one split: a :class:`DatasetSpec` for voxel datasets, a dict for QSM."""
        d = self.spec_dict(split, **overrides)
        return DatasetSpec.from_dict(d) if self.kind == "voxel" else d

    def cache_key(self, split: str, **overrides) -> str:
        """Hash of the resolved spec and of the generating code (names the cache file)."""
        payload = json.dumps({"kind": self.kind, "spec": self.spec_dict(split, **overrides),
                              "registry_version": REGISTRY_VERSION, "code": _generator_code_hash(self.kind)},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

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
    try:
        from qmri_labels.data.phantoms import QSMPhantomSpec
    except ImportError as exc:  # pragma: no cover - the QSM modules ship with the package
        raise ValueError(f"{where}: QSM datasets need qmri_labels.data.phantoms: {exc}") from exc
    spec = dict(spec)
    truncate_to = spec.pop("truncate_to", None)
    bfr = spec.pop("bfr", None)
    try:
        phantom = QSMPhantomSpec.from_dict(spec).to_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if bfr is not None:
        from qmri_labels.fitting.bfr import bfr_record

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
    return phantom


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
    """Build a :class:`DatasetDefinition` from a mapping (inline configs use this too)."""
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
    """The definition of a named dataset (or of an inline mapping, or a path to a YAML file)."""
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


# --------------------------------------------------------------------------------------------
# building and caching
# --------------------------------------------------------------------------------------------


def _generator_code_hash(kind: str) -> str:
    """Hash of the source files that generate this kind of data: edit them, and caches rebuild."""
    import importlib.util

    modules = ["qmri_labels.data.datasets", "qmri_labels.data.priors", "qmri_labels.physics.noise",
               "qmri_labels.physics.ivim", "qmri_labels.physics.monoexp"]
    if kind == "qsm":
        modules = ["qmri_labels.physics.qsm", "qmri_labels.data.phantoms", "qmri_labels.fitting.bfr", __name__]
    h = hashlib.sha256()
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin and os.path.exists(spec.origin):
            h.update(Path(spec.origin).read_bytes())
        else:
            h.update(f"missing:{module}".encode())
    return h.hexdigest()[:16]


def cache_path(name: str | Mapping | DatasetDefinition, split: str, *, directory=None, **overrides) -> Path:
    """Where the cached file of one split lives (whether or not it was built yet)."""
    definition = get_definition(name, directory=directory)
    key = definition.cache_key(split, **overrides)
    return cache_dir() / "datasets" / f"{definition.name}-{split}-{key[:20]}.npz"


def _generate(definition: DatasetDefinition, split: str, overrides: dict):
    if definition.kind == "voxel":
        return definition.spec(split, **overrides).generate()
    return generate_qsm(definition.spec_dict(split, **overrides))


def load_dataset(name: str | Mapping | DatasetDefinition, split: str = "train", *, directory=None,
                 cache: bool = True, **overrides):
    """Load (building and caching on first use) one split of a named dataset.

    Parameters
    ----------
    name : str, mapping or DatasetDefinition
        A dataset name from ``studies/datasets``, a path to a definition YAML, or an inline
        definition.
    split : {"train", "test", ...}
    cache : bool
        Read and write the on-disk cache (default). ``False`` always generates.
    **overrides
        Changes to the split's spec (e.g. ``n=5000`` for a smaller training set). The result is
        a different dataset with its own fingerprint and cache file.

    Returns
    -------
    Dataset (voxel) or QSMDataset (qsm); its ``fingerprint`` identifies the data.
    """
    definition = get_definition(name, directory=directory)
    if not cache:
        return _generate(definition, split, overrides)
    path = cache_path(definition, split, directory=directory, **overrides)
    loader = Dataset.load if definition.kind == "voxel" else QSMDataset.load
    if path.exists():
        try:
            data = loader(path)
        except ValueError as exc:
            warnings.warn(f"rebuilding cached dataset {definition.name}/{split}: {exc}", RuntimeWarning,
                          stacklevel=2)
        else:
            stored = data.spec.to_dict() if definition.kind == "voxel" else data.spec
            if stored == definition.spec_dict(split, **overrides):
                return data
            warnings.warn(f"rebuilding cached dataset {definition.name}/{split}: stored spec differs",
                          RuntimeWarning, stacklevel=2)
    data = _generate(definition, split, overrides)
    data.save(path)
    return data


def build(name, splits: Iterable[str] | None = None, *, directory=None, **overrides) -> dict[str, str]:
    """Build (or verify the cache of) the given splits; return ``split -> fingerprint``."""
    definition = get_definition(name, directory=directory)
    return {split: load_dataset(definition, split, directory=directory, **overrides).fingerprint
            for split in (splits or definition.splits)}


# --------------------------------------------------------------------------------------------
# QSM: synthetic phantoms at a base resolution, coarser resolutions by k-space truncation
# --------------------------------------------------------------------------------------------


@dataclass
class QSMDataset:
    """Synthetic QSM volumes at one resolution: susceptibility, mask and noisy local fields.

    The arrays have the names and layout of :class:`qmri_labels.data.phantoms.QSMPhantomSet`,
    so code written for one takes the other.

    Attributes
    ----------
    spec : dict
        The resolved split spec (``QSMPhantomSpec`` fields plus ``truncate_to``).
    chi : ndarray (N, X, Y, Z) float32, ppm
    mask : ndarray (N, X, Y, Z) bool
    fields : ndarray (N, K, X, Y, Z) float32, ppm, one field per B0 orientation, zero outside the mask
    orientations : ndarray (K, 3) float64
    """

    spec: dict
    chi: np.ndarray
    mask: np.ndarray
    fields: np.ndarray
    orientations: np.ndarray

    @property
    def field(self) -> np.ndarray:
        """Noisy field (N, X, Y, Z) at the reference orientation (B0 along z)."""
        return self.fields[:, 0]

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(self.spec["truncate_to"] or self.spec["voxel_size"])

    def __len__(self) -> int:
        return self.chi.shape[0]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.spec, sort_keys=True, separators=(",", ":")).encode())
        for a in (self.chi, self.mask, self.fields, self.orientations):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        return h.hexdigest()

    def to_phantom_set(self):
        """This dataset as a :class:`~qmri_labels.data.phantoms.QSMPhantomSet` (for the QSM trainers).

        Its spec describes the phantoms at this dataset's grid and voxel size, and its ``bfr`` is
        this dataset's (so that a network trained on it records ``"bfr:<method>"`` as its input);
        the fingerprint is this dataset's (a truncated set cannot be regenerated from that spec
        alone).
        """
        from qmri_labels.data.phantoms import QSMPhantomSet, QSMPhantomSpec

        fields = {k: v for k, v in self.spec.items() if k not in QSM_EXTRA_FIELDS}
        fields.update(shape=list(self.chi.shape[1:]), voxel_size=list(self.voxel_size))
        return QSMPhantomSet(spec=QSMPhantomSpec.from_dict(fields), chi=self.chi, mask=self.mask, fields=self.fields,
                             orientations=self.orientations, fingerprint=self.fingerprint, bfr=self.spec.get("bfr"))

    def save(self, path) -> Path:
        """One ``.npz`` file, written atomically, holding the arrays, the spec and the fingerprint."""
        path = Path(path)
        buffer = io.BytesIO()
        np.savez(buffer, format_version=np.int64(REGISTRY_VERSION),
                 spec_json=np.array(json.dumps(self.spec, sort_keys=True)), fingerprint=np.array(self.fingerprint),
                 chi=self.chi, mask=self.mask, fields=self.fields, orientations=self.orientations)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path) -> "QSMDataset":
        """Read a file written by :meth:`save`; ``ValueError`` if it is corrupt (fingerprint check)."""
        def build(z):
            return cls(json.loads(str(z["spec_json"])), z["chi"], z["mask"], z["fields"], z["orientations"])

        return read_verified_npz(path, build, "QSM dataset", REGISTRY_VERSION)


def generate_qsm(spec: dict) -> QSMDataset:
    """Generate a QSM split: phantoms and noisy fields at ``voxel_size``, then k-space truncation,
    then background-field removal.

    The phantoms, their fields (every orientation) and the noise are drawn by
    :meth:`QSMPhantomSpec.generate` at the phantom resolution; the fields are masked (local by
    default). With ``truncate_to`` set, chi, the fields and the mask (thresholded at 0.5) are
    coarsened by k-space truncation (:func:`qmri_labels.physics.qsm.change_resolution`), as Oh
    et al. (2021) made their 1x1x3 mm data from 1x1x1 mm acquisitions, and chi and the fields
    are masked again by the coarse mask: the two resolutions of one seed hold the same objects
    with the same masking, and differ only in resolution. With ``bfr`` set (a total field), the
    background is removed by that method at the final resolution; fields and chi are then
    restricted to the method's eroded mask, which becomes the dataset's mask.
    """
    from qmri_labels.data.phantoms import QSMPhantomSpec
    from qmri_labels.physics.qsm import change_resolution

    spec = dict(spec)
    truncate_to = spec.pop("truncate_to", None)
    bfr = spec.pop("bfr", None)
    base = QSMPhantomSpec.from_dict(spec).generate()
    chi, mask, fields = base.chi, base.mask, base.fields
    voxel_size = spec.get("voxel_size", [1.0, 1.0, 1.0])
    if truncate_to is not None:
        mask = change_resolution(mask.astype(np.float64), voxel_size, truncate_to) > 0.5
        chi = change_resolution(chi.astype(np.float64), voxel_size, truncate_to) * mask
        fields = change_resolution(fields.astype(np.float64), voxel_size, truncate_to)
        if base.spec.field_kind != "local_unmasked":
            fields = fields * mask[:, None]
        voxel_size = truncate_to
    if bfr is not None:
        # the one place where data generation calls a fitting step (architecture.md says so)
        from qmri_labels.fitting.bfr import remove_background_per_orientation

        options = {k: v for k, v in bfr.items() if k != "method"}
        fields, mask = remove_background_per_orientation(bfr["method"], fields, mask, voxel_size, base.orientations,
                                                         **options)
        chi = chi * mask
    return QSMDataset({**spec, "truncate_to": truncate_to, "bfr": bfr}, np.ascontiguousarray(chi, dtype=np.float32),
                      np.ascontiguousarray(mask, dtype=bool), np.ascontiguousarray(fields, dtype=np.float32),
                      np.asarray(base.orientations, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# comparability of results
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmri_labels.data.registry",
                                     description="Named common datasets: list, show, build (and cache).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="names and descriptions of the defined datasets")
    show = sub.add_parser("show", help="the resolved definition, cache paths and (if built) fingerprints")
    show.add_argument("name")
    build_p = sub.add_parser("build", help="generate and cache the splits; print their fingerprints")
    build_p.add_argument("name", nargs="+")
    build_p.add_argument("--split", action="append", help="only this split (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name in list_datasets():
                d = get_definition(name)
                sizes = ", ".join(f"{s}={spec['n']}" for s, spec in d.splits.items())
                print(f"{name:32s} {d.kind:6s} {sizes:28s} {d.description[:60]}")
        elif args.command == "show":
            d = get_definition(args.name)
            info = d.to_dict()
            info["source"] = str(d.source) if d.source else None
            info["cache"] = {}
            for split in d.splits:
                path = cache_path(d, split)
                entry = {"path": str(path), "built": path.exists()}
                if path.exists():
                    try:
                        entry["fingerprint"] = (Dataset.load(path) if d.kind == "voxel" else QSMDataset.load(path)).fingerprint
                    except ValueError as exc:
                        entry["error"] = str(exc)
                info["cache"][split] = entry
            print(yaml.safe_dump(info, sort_keys=False))
        else:
            for name in args.name:
                for split, fp in build(name, args.split).items():
                    print(f"{name} {split} {fp} {cache_path(name, split)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
