"""Running a study from Python and from the command line: one path from a configuration to a
results folder.

:func:`run_study` is the study command without its argument parser::

    import qmri_labels as ql

    result = ql.run_study("tiny_ivim", out="runs/smoke")              # a named study
    result = ql.run_study(model="t2", n_train=2000)                     # T2 with its defaults
    result = ql.run_study(model=StretchedExp(), protocol=[0, 100, 500, 1000],
                          prior={"S0": (0.8, 1.2), "D": (0.5e-3, 3e-3), "alpha": (0.5, 1.0)},
                          labels=["gt", "mle", "self"])                 # a model from a notebook

Both it and ``python -m qmri_labels.study`` go through :func:`prepare_study` (the named
configuration, file or mapping, the overrides, the one merge over the workflow's defaults, the
workflow's own check) and :func:`execute_study` (``config.yaml``, the workflow, ``manifest.json``).

A model defined outside the package (a :class:`~qmri_labels.physics.SignalModel` instance, or
a configuration's ``model: {class: "package.module:ClassName", ...}`` naming an importable
class and its constructor's keywords) is made available by its name for the rest of the process
(:func:`qmri_labels.physics.use_model`), so that simulation, MLE labels, the self-supervised
loss, grid evaluation, CRLB, calibration and report all see the same instance; the manifest
records its class path under ``model``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from qmri_labels import paths
from qmri_labels.data.priors import UniformPrior
from qmri_labels.fileio import atomic_write_bytes, deep_merge, to_jsonable
from qmri_labels.paths import DEFAULT_CONFIG
from qmri_labels.physics import SignalModel, available_models, class_path, get_model, use_model
from qmri_labels.provenance import device_info, package_versions
from qmri_labels.threads import resolve_threads, torch_threads
from qmri_labels.workflows.registry import Workflow, get_workflow
from qmri_labels.workflows.results import StudyResult, load_results

__all__ = ["run_study", "prepare_study", "execute_study", "PreparedStudy", "load_config", "available_configs",
           "resolve_model", "parse_protocol"]


def available_configs() -> dict[str, Path]:
    """The named study configurations shipped in ``studies/``, by name."""
    folder = paths.studies_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def load_config(name_or_path: str) -> tuple[dict, str]:
    """Read a named configuration (``studies/<name>.yaml``) or a YAML/JSON file: (config, name)."""
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


def locate_key(defaults: Mapping, key: str, kind: str, source: str) -> list[str]:
    """Where ``key`` lives in a workflow's config: at the top or in exactly one nested mapping
    (dotted keys name their path). ``source`` names the flag or keyword in the error."""
    if "." in key:
        return key.split(".")
    if key in defaults:
        return [key]
    homes = [parent for parent, value in defaults.items() if isinstance(value, Mapping) and key in value]
    if len(homes) == 1:
        return [homes[0], key]
    raise ValueError(f"{source} does not apply to study kind {kind!r} (its configuration has no {key!r} entry); "
                     f"known: {', '.join(sorted(defaults))}")


def set_key(config: dict, path: list[str], value) -> None:
    """Set the nested entry ``path`` of ``config`` (creating mappings on the way)."""
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {'.'.join(path)}: {part!r} is not a mapping")
    node[path[-1]] = value


def _import_class(path: str):
    module_name, sep, qualname = str(path).partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"model class must be given as 'package.module:ClassName', got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the model class {path!r}: {exc}") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"module {module_name!r} has no {qualname!r} (model class {path!r})")
    if not (isinstance(obj, type) and issubclass(obj, SignalModel)):
        raise ValueError(f"{path!r} is not a SignalModel subclass")
    return obj


def resolve_model(model) -> tuple[str, dict | None]:
    """The registered name a study uses for ``model``, and what the manifest records about a
    model defined outside the package (``None`` for a registered one).

    ``model`` is a registered name, a :class:`SignalModel` instance, or a mapping
    ``{"class": "package.module:ClassName", **constructor keywords}``. The latter two are made
    available by name for this process (:func:`qmri_labels.physics.use_model`).
    """
    if isinstance(model, str):
        return get_model(model).name, None
    if isinstance(model, Mapping):
        if "class" not in model:
            raise ValueError(f"a model given as a mapping needs a 'class' ('package.module:ClassName'), got "
                             f"keys {sorted(model)}")
        cls = _import_class(model["class"])
        options = {k: v for k, v in model.items() if k != "class"}
        try:
            model = cls(**options)
        except TypeError as exc:
            raise ValueError(f"cannot build {model['class']} with {options}: {exc}") from None
    if not isinstance(model, SignalModel):
        raise ValueError(f"model must be a registered name, a SignalModel instance or {{class: ...}}, "
                         f"got {type(model).__name__}")
    registered = get_model(model.name) if model.name in available_models() else None
    if registered is not None and type(registered) is type(model) and registered.config == model.config:
        return model.name, None  # a shipped model passed as an instance
    name = use_model(model)
    cls = type(model)
    record = {"name": name, "class": class_path(model), "config": to_jsonable(model.config),
              "parameters": list(model.param_names), "protocol": {"name": model.protocol_name,
                                                                  "unit": model.protocol_unit},
              # a class defined in a notebook or script (__main__) cannot be imported back
              "importable": cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__,
              "registered": "for this process by qmri_labels.physics.use_model, not under the package's registry"}
    return name, record


#: spellings of a unit that mean the same
_UNIT_SPELLINGS = {"s/mm2": "s/mm^2", "s mm^-2": "s/mm^2", "s/mm²": "s/mm^2", "msec": "ms", "millisecond": "ms",
                   "milliseconds": "ms"}


def _unit(text: str) -> str:
    text = str(text).strip()
    return _UNIT_SPELLINGS.get(text.lower(), text)


def parse_protocol(protocol, model) -> list[float]:
    """A protocol in the model's own units, as a list of floats.

    ``protocol`` is a sequence of numbers, optionally ending in a unit (``[10, 20, 40, "ms"]``,
    what ``--protocol 10 20 40 ms`` gives), or ``{"values": [...], "unit": "ms"}``. A unit
    other than the model's is refused (no conversion is guessed), as is a unit-less protocol
    whose values cannot be the model's (negative, not finite).
    """
    model = get_model(model)
    unit = None
    if isinstance(protocol, Mapping):
        unknown = set(protocol) - {"values", "unit"}
        if unknown or "values" not in protocol:
            raise ValueError(f"a protocol mapping has 'values' and optionally 'unit', got {sorted(protocol)}")
        values, unit = list(protocol["values"]), protocol.get("unit")
    else:
        values = [protocol] if isinstance(protocol, (int, float, str)) else list(protocol)
        if values and isinstance(values[-1], str):
            try:
                float(values[-1])
            except ValueError:
                unit = values.pop()
    if unit is not None and _unit(unit) != _unit(model.protocol_unit):
        raise ValueError(f"model {model.name!r} takes its protocol ({model.protocol_name}) in "
                         f"{model.protocol_unit}, not {unit}; give the values in {model.protocol_unit}")
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"protocol values must be numbers (in {model.protocol_unit}), got {values!r}") from None
    return [float(v) for v in model.validate_protocol(numbers)]


@dataclass
class PreparedStudy:
    """A study resolved and checked, not yet run.

    Attributes
    ----------
    kind : str
        The study kind (selects the workflow).
    config : dict
        The configuration after the one merge over the workflow's defaults.
    workflow : Workflow
        The study kind's entry of :data:`qmri_labels.workflows.registry.WORKFLOWS`.
    name : str
        The configuration's name (for the default results folder).
    model : dict or None
        What the manifest records about a model defined outside the package.
    written_config : dict
        What ``config.yaml`` holds: ``config``, with an importable outside model named by its class.
    """

    kind: str
    config: dict
    workflow: Workflow
    name: str
    model: dict | None = None
    written_config: dict = field(default_factory=dict)


#: ``model`` values that select a study kind of their own (voxel models use the label comparison)
MODEL_KINDS = {"qsm": "qsm_labels"}


def prepare_study(name_or_config: str | Mapping | os.PathLike | None = None, *, model=None,
                  overrides: Sequence[tuple[str, Any, str]] = ()) -> PreparedStudy:
    """Resolve a study: its configuration, the overrides, the one merge, the workflow's check.

    Parameters
    ----------
    name_or_config : str, path, mapping or None
        A named configuration (``studies/<name>.yaml``), a YAML/JSON file, or a configuration
        mapping. ``None``: the model's study kind's named configuration, or ``default``.
    model : str, SignalModel, mapping or None
        The signal model (see :func:`resolve_model`); ``"qsm"`` selects the QSM label study.
    overrides : sequence of (key, value, source)
        Configuration entries to set (dotted or unique nested keys); ``source`` names the flag
        or keyword in an error.

    Returns
    -------
    PreparedStudy
    """
    model_kind = None
    if isinstance(model, str) and model.lower() in MODEL_KINDS:
        model_kind = MODEL_KINDS[model.lower()]
    elif model is not None:
        model_kind = "ivim_labels"
    if isinstance(name_or_config, Mapping):
        config, name = copy.deepcopy(dict(name_or_config)), str(name_or_config.get("name", "study"))
    elif name_or_config is not None:
        config, name = load_config(os.fspath(name_or_config))
    elif model_kind not in (None, "ivim_labels"):
        config, name = (load_config(model_kind) if model_kind in available_configs()
                        else ({"kind": model_kind}, model_kind))
    elif model is not None and not isinstance(model, str) or (isinstance(model, str) and model.lower() != "ivim"):
        # another voxel model: the label comparison with that model's own defaults
        config, name = {"kind": "ivim_labels"}, "labels"
    elif DEFAULT_CONFIG in available_configs():
        config, name = load_config(DEFAULT_CONFIG)
    else:
        config, name = {"kind": "ivim_labels"}, "ivim_labels"
    kind = config.get("kind", "ivim_labels")
    if model_kind is not None and kind != model_kind and not (model_kind == "ivim_labels" and kind == "mismatch"):
        raise ValueError(f"model {model if isinstance(model, str) else type(model).__name__} selects study kind "
                         f"{model_kind!r}, but the configuration {name!r} is of kind {kind!r}")
    workflow = get_workflow(kind)
    defaults = copy.deepcopy(dict(workflow.defaults))
    if model is not None and kind == "ivim_labels":
        config["model"] = model.lower() if isinstance(model, str) else model
    for key, value, source in overrides:
        if key == "protocol" and kind == "ivim_labels":
            config["protocol"] = value  # in the model's units: read with the model, below
            continue
        set_key(config, locate_key(defaults, key, kind, source), value)
    record = None
    if kind == "ivim_labels":
        given = config.get("model", defaults.get("model"))
        written_model = given
        name_of_model, record = resolve_model(given)
        config["model"] = name_of_model
        if record is not None:
            if isinstance(given, Mapping):
                written_model = dict(given)
            elif record["importable"]:
                written_model = {"class": record["class"]}
            else:
                written_model = name_of_model
        if name == "labels":
            name = f"{name_of_model}_labels"
        config = _model_settings(config, defaults, name_of_model)
        if record is not None and "workers" not in config:
            # spawned worker processes would not know a model made available in this one
            config["workers"] = 1
    try:
        resolved = workflow.merge(config)
    except ValueError as exc:
        raise ValueError(f"configuration {name!r} (kind {kind!r}): {exc}") from None
    resolved["kind"] = kind
    written = to_jsonable(resolved)
    workflow.check(resolved)  # a bad value fails here, before anything is written
    if record is not None:
        written["model"] = to_jsonable(written_model)
    return PreparedStudy(kind, resolved, workflow, name, record, written)


def _prior_mapping(prior, model: str):
    """A prior given as ``{parameter: (low, high)}`` as the uniform prior's full mapping."""
    if not isinstance(prior, Mapping) or "kind" in prior or "ranges" in prior:
        return prior
    if not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in prior.values()):
        raise ValueError(f"prior must map every parameter to (low, high), or be a prior's full mapping; "
                         f"got {dict(prior)!r}")
    return UniformPrior(model=model, ranges={k: tuple(v) for k, v in prior.items()}).to_dict()


def _model_settings(config: dict, defaults: Mapping, model: str) -> dict:
    """The label study's settings that depend on its model, in the model's terms.

    ``protocol`` (in the model's units, a trailing unit checked) becomes the workflow's protocol
    entry; a prior of ranges becomes a uniform prior; a model other than the workflow's default
    takes its own protocol of the literature, SNR, prior and study sizes
    (:attr:`~qmri_labels.physics.SignalModel.default_study_sizes`) where the configuration gives none.
    """
    config = dict(config)
    signal_model = get_model(model)
    key = "protocol" if "protocol" in defaults else "bvalues"
    if key != "protocol" and "protocol" in config:
        given = parse_protocol(config.pop("protocol"), signal_model)
        if config.get(key) is not None and [float(b) for b in config[key]] != given:
            raise ValueError(f"protocol {given} and {key} {config[key]} disagree: give one")
        config[key] = given
    elif config.get(key) is not None:
        config[key] = parse_protocol(config[key], signal_model)
    if config.get("prior") is not None:
        config["prior"] = _prior_mapping(config["prior"], model)
    if model != defaults.get("model"):
        if config.get(key) is None:
            if not signal_model.default_protocol:
                raise ValueError(f"model {model!r} has no default protocol: give its {signal_model.protocol_name} "
                                 f"({signal_model.protocol_unit}) as protocol")
            config[key] = list(signal_model.default_protocol)
        if "snr" not in config and signal_model.default_snr is not None:
            config["snr"] = float(signal_model.default_snr)
        if "title" not in config:
            labels = ", ".join(config.get("labels") or defaults.get("labels") or ())
            hybrid = " and hybrid" if config.get("alpha", defaults.get("alpha")) else ""
            config["title"] = f"Training labels for the {model} model: {labels}{hybrid}"
        if config.get("prior") is None:
            # a model defined outside the package has no default prior: say which ranges are missing
            config["prior"] = UniformPrior(model=model).to_dict()
        for entry, value in signal_model.default_study_sizes.items():
            given = config.get(entry)
            if isinstance(value, Mapping) and (given is None or isinstance(given, Mapping)):
                config[entry] = {**copy.deepcopy(dict(value)), **(given or {})}  # nested entries given keep theirs
            else:
                config.setdefault(entry, copy.deepcopy(value))
    return config


def default_out(name: str) -> Path:
    """``runs/<name>-<timestamp>`` (with a counter if that folder exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{name}-{stamp}"
    k = 1
    while out.exists():
        k += 1
        out = Path("runs") / f"{name}-{stamp}-{k}"
    return out


def _write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def execute_study(study: PreparedStudy, out: str | os.PathLike | None = None, *, quiet: bool = True,
                  argv: Sequence[str] | None = None, threads="auto") -> tuple[Path, dict, float]:
    """Write ``config.yaml``, run the workflow, complete ``manifest.json``.

    Parameters
    ----------
    study : PreparedStudy
    out : path or None
        Results folder; ``None``: ``runs/<name>-<timestamp>``.
    quiet : bool
        Only warnings (no progress).
    argv : sequence of str or None
        The command line recorded in the manifest (``None``: a Python call).
    threads : int or "auto"
        CPU threads the study may use in all: the torch threads of this process (MLE labels,
        evaluation) and, for studies that train in worker processes, workers times the
        ``num_threads`` of each job. ``"auto"``: the cores other processes leave free now
        (:func:`qmri_labels.threads.resolve_threads`). A study's results do not depend on it
        (each training job runs with the configuration's ``num_threads``).

    Returns
    -------
    (out, workflow result, wall seconds)
    """
    config = study.config
    used = resolve_threads(threads)
    if threads != "auto" and "workers" in config and str(config.get("device", "cpu")) == "cpu":
        per_job = max(1, int(config.get("num_threads") or 1))
        if config["workers"] == "auto":
            config = {**config, "workers": max(1, used // per_job)}
        elif int(config["workers"]) * per_job > used:
            raise ValueError(f"workers {config['workers']} x num_threads {per_job} would use more than the "
                             f"{used} CPU threads of threads={used}: lower workers or raise threads")
    out = Path(out) if out is not None else default_out(study.name)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "config.yaml", yaml.safe_dump(study.written_config, sort_keys=False))
    logging.getLogger("qmri_labels").info("study %r (kind %s) -> %s", study.name, study.kind, out)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    with torch_threads(used):
        result = study.workflow.run(study.workflow.check(config), out, quiet=quiet) or {}
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
    manifest.setdefault("kind", study.kind)
    if study.model is not None:
        manifest["model"] = study.model
    manifest.setdefault("versions", package_versions())
    if "device" not in manifest:
        manifest["device"] = device_info()
    command = (["python", "-m", "qmri_labels.study", *argv] if argv is not None
               else ["qmri_labels.run_study"])
    manifest["threads"] = {"requested": threads, "used": used}
    manifest["command"] = {"argv": command, "config_name": study.name, "started": started, "wall_seconds": wall,
                           "host": platform.node(), "cwd": os.getcwd()}
    _write(manifest_path, json.dumps(to_jsonable(manifest), indent=2, sort_keys=True) + "\n")
    return out, result, wall


def run_study(name_or_config: str | Mapping | os.PathLike | None = "default", *, out: str | os.PathLike | None = None,
              quiet: bool = True, model=None, protocol=None, prior=None, labels=None, threads="auto",
              **overrides) -> StudyResult:
    """Run a study and return its results folder read back (:func:`load_results`).

    Parameters
    ----------
    name_or_config : str, path, mapping or None
        A named configuration (``python -m qmri_labels.study --list``), a YAML/JSON file or a
        configuration mapping. With ``model`` given and the name left at ``"default"``, the
        label comparison with that model's defaults (protocol, SNR and prior of the model).
    out : path or None
        Results folder; ``None``: ``runs/<name>-<timestamp>``.
    quiet : bool
        Only warnings (no progress).
    model : str, SignalModel or mapping, optional
        A registered model name, an instance of a :class:`~qmri_labels.physics.SignalModel`
        subclass defined anywhere (a notebook cell), or ``{"class": "pkg.module:Class", ...}``.
    protocol : sequence or mapping, optional
        The acquisition protocol in the model's own units (b-values in s/mm^2, echo times in
        ms, ...); a trailing unit (``[10, 20, "ms"]``) is checked against the model's.
    prior : mapping, optional
        ``{parameter: (low, high)}`` for every model parameter (a uniform prior), or a prior's
        full mapping (``{"kind": ..., ...}``).
    labels : sequence of str, optional
        The labels trained besides the hybrids (``training.labels.STUDY_LABELS``).
    threads : int or "auto"
        CPU threads the study may use in all (:func:`execute_study`); results do not depend on it.
    **overrides
        Any other configuration key (``n_train=2000``, ``alpha=[0.5]``, ``repeats=20``: a key
        of one nested mapping is found there; ``grid__snr=[10, 30]`` for a dotted path).

    Returns
    -------
    StudyResult
    """
    if name_or_config == DEFAULT_CONFIG and model is not None:
        name_or_config = None
    items: list[tuple[str, Any, str]] = []
    if protocol is not None:
        items.append(("protocol", protocol, "protocol="))
    if prior is not None:
        items.append(("prior", prior, "prior="))
    if labels is not None:
        items.append(("labels", list(labels), "labels="))
    for key, value in overrides.items():
        items.append((key.replace("__", "."), value, f"{key}="))
    study = prepare_study(name_or_config, model=model, overrides=items)
    out, _, _ = execute_study(study, out, quiet=quiet, threads=threads)
    return load_results(out)
