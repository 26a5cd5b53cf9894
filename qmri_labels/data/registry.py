"""Named common datasets: defined once in ``studies/datasets/*.yaml``
(:mod:`qmri_labels.data.definitions`), built deterministically, cached on disk by fingerprint
and loadable by name.

Oh et al. (2021) showed that a network looks best on test data that shares its training data's
characteristics, so claims that one network beats another only hold on a *common* test set.
This module gives every such set a name (``ivim_epstein_snr30``, ``qsm_synthetic_1x1x3mm``,
...) and builds it the same way on every machine; :func:`qmri_labels.data.comparability.check_comparable`
refuses to compare results whose test data differ.

Python::

    from qmri_labels.data.registry import load_dataset
    train = load_dataset("ivim_epstein_snr30", "train")
    test = load_dataset("ivim_epstein_snr30", "test")

Command line::

    python -m qmri_labels.data.registry list
    python -m qmri_labels.data.registry show ivim_epstein_snr30
    python -m qmri_labels.data.registry build ivim_epstein_snr30 [--split test]

Cached files live in ``qmri_labels.paths.cache_dir() / "datasets"``, named by a hash of the
resolved definition and of the generating code; they are written atomically and verified on
load (the fingerprint is checked); a corrupt or stale file is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from qmri_labels.data.datasets import Dataset
from qmri_labels.data.definitions import DatasetDefinition, get_definition, list_datasets
from qmri_labels.data.fingerprint import canonical_json
from qmri_labels.data.qsm import QSMPhantomSet, generate_qsm
from qmri_labels.paths import cache_dir

#: bump when the on-disk layout or the generation recipe changes in a way the key cannot see
REGISTRY_VERSION = 1

#: the modules whose source generates each kind of data (their bytes are part of the cache key)
GENERATOR_MODULES = {
    "voxel": ("qmri_labels.data.datasets", "qmri_labels.data.priors", "qmri_labels.physics.noise",
              "qmri_labels.physics.ivim", "qmri_labels.physics.monoexp"),
    "qsm": ("qmri_labels.physics.qsm", "qmri_labels.data.qsm.phantoms", "qmri_labels.data.qsm.phantom_set",
            "qmri_labels.fitting.bfr"),
}


def _generator_code_hash(kind: str) -> str:
    """Hash of the source files that generate this kind of data: edit them, and caches rebuild."""
    h = hashlib.sha256()
    for module in GENERATOR_MODULES[kind]:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin and os.path.exists(spec.origin):
            h.update(Path(spec.origin).read_bytes())
        else:
            h.update(f"missing:{module}".encode())
    return h.hexdigest()[:16]


def cache_key(definition: DatasetDefinition, split: str, **overrides) -> str:
    """Hash of the resolved spec and of the generating code (names the cache file)."""
    payload = canonical_json({"kind": definition.kind, "spec": definition.spec_dict(split, **overrides),
                              "registry_version": REGISTRY_VERSION, "code": _generator_code_hash(definition.kind)})
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(name: str | Mapping | DatasetDefinition, split: str, *, directory=None, **overrides) -> Path:
    """Where the cached file of one split lives (whether or not it was built yet)."""
    definition = get_definition(name, directory=directory)
    key = cache_key(definition, split, **overrides)
    return cache_dir() / "datasets" / f"{definition.name}-{split}-{key[:20]}.npz"


_LOADERS = {"voxel": Dataset.load, "qsm": QSMPhantomSet.load}


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
    Dataset (voxel) or QSMPhantomSet (qsm); its ``fingerprint`` identifies the data.
    """
    definition = get_definition(name, directory=directory)
    if not cache:
        return _generate(definition, split, overrides)
    path = cache_path(definition, split, directory=directory, **overrides)
    loader = _LOADERS[definition.kind]
    if path.exists():
        try:
            data = loader(path)
        except ValueError as exc:
            warnings.warn(f"rebuilding cached dataset {definition.name}/{split}: {exc}", RuntimeWarning,
                          stacklevel=2)
        else:
            stored = data.spec.to_dict() if definition.kind == "voxel" else data.recipe
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


def main(argv: list[str] | None = None) -> int:
    """The ``list``, ``show`` and ``build`` commands; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m qmri_labels.data.registry",
                                     description="Named common datasets: list, show, build (and cache).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="names and descriptions of the defined datasets")
    show = sub.add_parser("show", help="the resolved definition, cache paths and (if built) fingerprints")
    show.add_argument("name")
    build_parser = sub.add_parser("build", help="generate and cache the splits; print their fingerprints")
    build_parser.add_argument("name", nargs="+")
    build_parser.add_argument("--split", action="append", help="only this split (repeatable)")
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
                        entry["fingerprint"] = _LOADERS[d.kind](path).fingerprint
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
