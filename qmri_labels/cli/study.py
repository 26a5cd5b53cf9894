"""The study command: ``python -m qmri_labels.study``.

Runs a complete comparison and writes a results folder. With no flag it runs the default IVIM
label comparison (``studies/default.yaml``: Epstein et al.'s 10 b-values, Rician SNR 30, nets
trained on GT, MLE, self-supervised and hybrid labels, evaluated with the MLE fitter on a
held-out grid)::

    python -m qmri_labels.study --alpha 0.5
    python -m qmri_labels.study --alpha 0.25 0.5 0.75 --snr 15 --n-train 50000
    python -m qmri_labels.study --snr 10 50 --snr-test 10 20 50      # train over an SNR range
    python -m qmri_labels.study --tune 20 --seeds 4                  # tuned vs default, 4 seeds
    python -m qmri_labels.study --tune 20 --storage sqlite:///tune.db --study-name s1   # one search, many runs
    python -m qmri_labels.study --config ivimnet_sim                 # IVIM-NET's simulation protocol
    python -m qmri_labels.study --config tiny_ivim --out runs/smoke --quiet
    python -m qmri_labels.study --model qsm            # the QSM label study
    python -m qmri_labels.study --config mismatch_ivim # any named study in studies/
    python -m qmri_labels.study --list
    python -m qmri_labels.study --config hparam_ivim --storage sqlite:///search.db --study-name s1 --worker

A configuration (YAML) has a ``kind`` that selects the workflow (the table
:data:`qmri_labels.workflows.registry.WORKFLOWS`); keys not given take the workflow's defaults.
Flags override configuration keys; ``--set key=value`` (YAML value, dotted keys for nested
entries) overrides any other.

The results folder (``--out``, default ``runs/<name>-<timestamp>``) holds the resolved
``config.yaml``, ``manifest.json`` (seeds, dataset fingerprints, package versions, device,
determinism flags, timings, the command line), the workflow's tables (for the label
comparison ``summary.csv``), report and trained networks.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Mapping

import yaml

from qmri_labels import __version__, paths
from qmri_labels.fileio import deep_merge
from qmri_labels.log import add_verbosity_flags, configure_cli_logging
from qmri_labels.workflows.registry import Workflow, get_workflow

DEFAULT_CONFIG = "default"
#: ``--model`` value -> study kind (voxel models all use the label comparison)
MODEL_KINDS = {"qsm": "qsm_labels"}
#: flags that override configuration keys (flag destination -> key)
FLAG_KEYS = {"alpha": "alpha", "snr": "snr", "bvalues": "bvalues", "n_train": "n_train", "max_epochs": "max_epochs",
             "seed": "seed", "device": "device", "storage": "storage", "study_name": "study_name", "worker": "worker",
             "snr_test": "grid.snr", "tune": "tune.n_trials", "seeds": "seeds",
             "workers": "workers"}


def available_configs() -> dict[str, Path]:
    folder = paths.studies_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def load_config(name_or_path: str) -> tuple[dict, str]:
    """Read a named configuration (``studies/<name>.yaml``) or a YAML/JSON file."""
    path = Path(name_or_path)
    if not path.suffix or not path.exists():
        named = available_configs()
        stem = path.stem if path.suffix in (".yaml", ".yml") else name_or_path
        if stem in named and not path.exists():
            path = named[stem]
        elif not path.exists():
            raise ValueError(f"no study configuration {name_or_path!r}: not a file, and not one of the named "
                             f"configurations in {paths.studies_dir()}: {', '.join(named) or '(none)'}")
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read study configuration {path}: {exc}") from exc
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"study configuration {path} must be a mapping of keys to values")
    return config, path.stem


def locate_key(defaults: Mapping, key: str, kind: str, flag: str) -> list[str]:
    """Where ``key`` lives in a workflow's config: at the top or in exactly one nested mapping."""
    if "." in key:
        return key.split(".")
    if key in defaults:
        return [key]
    homes = [parent for parent, value in defaults.items() if isinstance(value, Mapping) and key in value]
    if len(homes) == 1:
        return [homes[0], key]
    raise ValueError(f"{flag} does not apply to study kind {kind!r} (its configuration has no {key!r} entry); "
                     f"known: {', '.join(sorted(defaults))}")


def set_key(config: dict, path: list[str], value) -> None:
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {'.'.join(path)}: {part!r} is not a mapping")
    node[path[-1]] = value


def _workers(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmri-study",
                                     description="\n\n".join(__doc__.split("\n\n")[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Named configurations: see --list.")
    parser.add_argument("--config", help="named configuration in studies/ or a YAML/JSON file "
                                         f"(default: {DEFAULT_CONFIG}, or the --model's default)")
    parser.add_argument("--model", help="signal model: ivim (default), monoexp, or qsm for the QSM label study")
    parser.add_argument("--alpha", type=float, nargs="+", help="hybrid weights of the MLE loss, one network each")
    parser.add_argument("--snr", type=float, nargs="+", metavar="SNR",
                        help="signal-to-noise ratio S0 / sigma of the training data; two values LOW HIGH: "
                             "one SNR per voxel, uniform in that range")
    parser.add_argument("--snr-test", type=float, nargs="+", metavar="SNR",
                        help="SNRs of the evaluation grid (default: the training SNR)")
    parser.add_argument("--tune", type=int, metavar="N",
                        help="tune every label's network with N trials (equal budget) and compare tuned vs default")
    parser.add_argument("--seeds", type=int, metavar="K",
                        help="train each method K times with different initialisation and batch order")
    parser.add_argument("--workers", type=_workers, metavar="N",
                        help="label studies: train N networks side by side in worker processes, or 'auto' "
                             "(default: the usable CPU cores / num_threads; 1 on a GPU); results do not "
                             "depend on it")
    parser.add_argument("--bvalues", type=float, nargs="+", help="b-values in s/mm^2")
    parser.add_argument("--n-train", type=int, help="number of training signals")
    parser.add_argument("--max-epochs", type=int, help="maximum training epochs per network")
    parser.add_argument("--seed", type=int, help="seed of data, weights and batch order")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage shared by all workers of a search, e.g. sqlite:///runs/search.db "
                             "(one machine) or postgresql://user@host/db (many). Search studies (kind hparam): "
                             "default sqlite in --out, or $QMRI_LABELS_OPTUNA_STORAGE; label studies with --tune: "
                             "the same study run on several machines shares its searches and gives the same "
                             "results (default: each search in its process)")
    parser.add_argument("--study-name", metavar="NAME",
                        help="name of the shared search (the same on every worker; hparam default: "
                             "hparam-<dataset>; with --tune each label's search is NAME-<method>)")
    parser.add_argument("--worker", action="store_const", const=True, default=None,
                        help="search studies: only run trials until the study holds n_trials completed ones, "
                             "no comparison; start one run without --worker to finish and compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any configuration key (dotted for nested keys; VALUE is YAML)")
    parser.add_argument("--out", help="results folder (default: runs/<name>-<timestamp>)")
    add_verbosity_flags(parser)
    parser.add_argument("--list", action="store_true", help="list the named configurations and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def resolve(args: argparse.Namespace) -> tuple[str, dict, Workflow, str]:
    """(kind, config merged over the workflow's defaults, workflow, config name) from parsed arguments."""
    model_kind = None
    if args.model is not None:
        model_kind = MODEL_KINDS.get(args.model.lower(), "ivim_labels")
        if model_kind == "ivim_labels":
            from qmri_labels.physics import get_model

            get_model(args.model)  # a clear error for unknown models
    if args.config is not None:
        config, name = load_config(args.config)
    elif model_kind not in (None, "ivim_labels"):
        # the kind's own named configuration when there is one (studies/qsm_labels.yaml)
        config, name = load_config(model_kind) if model_kind in available_configs() else ({"kind": model_kind},
                                                                                          model_kind)
    elif DEFAULT_CONFIG in available_configs():
        config, name = load_config(DEFAULT_CONFIG)
    else:
        config, name = {"kind": "ivim_labels"}, "ivim_labels"
    kind = config.get("kind", "ivim_labels")
    if model_kind is not None and kind != model_kind and not (model_kind == "ivim_labels" and kind == "mismatch"):
        raise ValueError(f"--model {args.model} selects study kind {model_kind!r}, but the configuration "
                         f"{name!r} is of kind {kind!r}")
    workflow = get_workflow(kind)
    defaults = workflow.defaults
    # flags and --set go into the user's configuration, which is then merged over the
    # workflow's defaults, checked at every level: a key the workflow does not read is an error
    config = copy.deepcopy(config)
    if args.model is not None and kind == "ivim_labels":
        config["model"] = args.model.lower()
    if args.snr is not None and len(args.snr) not in (1, 2):
        raise ValueError(f"--snr takes one value or a range LOW HIGH, got {len(args.snr)} values")
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "snr" and len(value) == 1:
            value = value[0]
        flag = "--" + dest.replace("_", "-")
        set_key(config, locate_key(defaults, key, kind, flag), value)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {key}: value {text!r} is not valid YAML ({exc})") from exc
        set_key(config, locate_key(defaults, key.strip(), kind, f"--set {key}"), value)
    try:
        merged = workflow.merge(config)
    except ValueError as exc:
        raise ValueError(f"configuration {name!r} (kind {kind!r}): {exc}") from None
    merged["kind"] = kind
    return kind, merged, workflow, name


def default_out(name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{name}-{stamp}"
    k = 1
    while out.exists():
        k += 1
        out = Path("runs") / f"{name}-{stamp}-{k}"
    return out


def _write(path: Path, text: str) -> None:
    from qmri_labels.fileio import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_cli_logging(quiet=args.quiet, verbose=args.verbose)
    if args.list:
        for name, path in available_configs().items():
            try:
                config, _ = load_config(str(path))
                kind = config.get("kind", "ivim_labels")
                about = config.get("description") or config.get("title") or ""
            except ValueError as exc:
                kind, about = "?", str(exc)
            print(f"{name:28s} {kind:18s} {about}")
        return 0
    try:
        kind, config, workflow, name = resolve(args)
        checked = workflow.check(config)  # a bad value fails here, before anything is written
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out) if args.out else default_out(name)
    out.mkdir(parents=True, exist_ok=True)
    from qmri_labels.fileio import to_jsonable

    plain = to_jsonable(config)
    _write(out / "config.yaml", yaml.safe_dump(plain, sort_keys=False))
    logging.getLogger("qmri_labels").info("study %r (kind %s) -> %s", name, kind, out)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        result = workflow.run(checked, out, quiet=args.quiet) or {}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0

    manifest_path = out / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
    if isinstance(result.get("manifest"), Mapping):
        manifest = deep_merge(result["manifest"], manifest)
    manifest.setdefault("kind", kind)
    if "versions" not in manifest:
        from qmri_labels.provenance import package_versions

        manifest["versions"] = package_versions()
    if "device" not in manifest:
        from qmri_labels.provenance import device_info

        manifest["device"] = device_info()
    manifest["command"] = {"argv": ["python", "-m", "qmri_labels.study", *(argv if argv is not None else sys.argv[1:])],
                           "config_name": name, "started": started, "wall_seconds": wall,
                           "host": platform.node(), "cwd": os.getcwd()}
    _write(manifest_path, json.dumps(to_jsonable(manifest), indent=2, sort_keys=True) + "\n")

    if args.quiet:  # quiet: warnings and errors only, which go to stderr
        return 0
    text = result.get("summary_text")
    print()
    if text:
        print(text)
        print()
    print(f"finished in {wall:.1f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
