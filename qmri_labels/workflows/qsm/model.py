"""The shipped QSM network: its training (:func:`train_model`) and the scoring of bundles
(:func:`evaluate_model`), with their command ``python -m qmri_labels.workflows.qsm``.

:func:`train_model` trains and evaluates the shipped network (:data:`SHIPPED_MODEL`, trained on
masked local fields; ``python -m qmri_labels.workflows.qsm train-model --out
qsm_unet_field-tv_residual_lrelu16 --minutes 36``), or with ``--bfr METHOD`` the same network on
the local fields that a background-field removal method leaves, or with ``--members M`` a deep
ensemble of M such networks (SD maps with the fit command's ``--uncertainty``);
:func:`evaluate_model` (``evaluate-model --model BUNDLE [BUNDLE ...] --bfr vsharp lbv pdf
resharp``) scores bundles side by side with TKD, Tikhonov and tuned TV on masked local fields
and after each BFR method.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from qmri_labels.analysis.stats import bonferroni
from qmri_labels.data.qsm import QSMPhantomSet, QSMPhantomSpec
from qmri_labels.estimators import QSMEstimator
from qmri_labels.estimators.bundle import read_manifest
from qmri_labels.fitting.bfr import BFR_METHODS
from qmri_labels.fitting.qsm_inversion import TV_DEFAULT_LAMBDA
from qmri_labels.nets.ensemble import check_n_members
from qmri_labels.training.qsm import check_input_kind
from qmri_labels.threads import torch_threads
from qmri_labels.workflows.common import check_count, merge_config, paired_test
from qmri_labels.workflows.qsm.common import (
    FREE_FORM_KEYS,
    bfr_phantom_set,
    evaluate_methods,
    make_phantom_sets,
    show,
    tune_lambda,
)

#: name of the shipped QSM network: inputs (field + TV estimate), residual on the TV channel,
#: leaky-ReLU activation, 16 initial channels; trained on masked local fields
SHIPPED_MODEL = "qsm_unet_field-tv_residual_lrelu16"

MODEL_CONFIG: dict[str, Any] = {
    "seed": 2024,
    "phantom": {"shape": [64, 64, 64], "noise_sigma": 0.005, "n_orientations": 1, "field_kind": "local"},
    "n_train": 16,
    "n_val": 2,
    "n_test": 4,
    "training": {"preset": "graf", "unet": {"init_channels": 16}, "inputs": ["field", "tv"], "label": "gt",
                 "patch_size": 32, "batch_size": 2, "samples_per_epoch": 24, "max_epochs": 1000,
                 "lr": 1e-3, "weight_decay": 0.01, "device": None},
    "tikhonov_lambdas": [0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
    "tv_lambdas": [2e-4, 4e-4, 8e-4],
    "tkd_threshold": 0.19,
}



def _command_path(path: Path) -> str:
    """``path`` as a recorded command names it: a relative path as given, an absolute one by its
    last component (a folder where the command is rerun), so that no manifest names a folder of
    the machine it was made on (``/tmp/...``)."""
    path = Path(path)
    return shlex.quote(str(Path(path.name) if path.is_absolute() else path))


def _input_text(kind: str) -> str:
    if kind.startswith("bfr:"):
        return f"local field after {kind[4:]} background-field removal (on its eroded mask)"
    return {"local": "local field", "local_unmasked": "UNMASKED local field", "total": "TOTAL field"}[kind]


def train_model(out: Path, minutes: float = 30.0, config: Mapping | None = None, quiet: bool = False,
                resume: bool = False, bfr: str | None = None, threads: int | None = None, members: int = 1,
                n_train: int | None = None) -> dict:
    """Train the shipped U-Net (:data:`SHIPPED_MODEL`) and write it as a bundle at ``out``.

    The phantoms hold masked local fields (``field_kind="local"``), or with ``bfr`` (a method
    of :mod:`qmri_labels.fitting.bfr`, default options) the local fields that the method leaves
    from the phantoms' total fields, with the masks eroded by it and chi restricted to them
    (:func:`make_phantom_sets`): a network for users who remove the background that way. The
    TV weight of the TV input channel is tuned on the training phantoms, processed the same way
    (:func:`tune_lambda`). The best model (validation loss) is checkpointed into ``out`` after
    every improvement; at the end the held-out metrics of the network, TKD, Tikhonov and TV
    (lambdas tuned on the training phantoms) on the held-out phantoms, processed the same way,
    are added to its manifest (with each phantom's values), with ``input_kind`` (what the
    network was trained on: ``"local"`` or ``"bfr:<method>"``; see
    :func:`qmri_labels.training.qsm.check_input_kind`) and the command that reruns it.
    ``resume`` continues from the bundle at ``out`` (same data, same configuration) for
    another ``minutes``. ``threads``: torch CPU threads (None: torch's default).

    ``n_train`` overrides the config's number of training heads (more heads, less overfitting;
    the validation and held-out heads do not change).

    ``members=M > 1`` trains a deep ensemble (``QSMEstimator(n_members=M)``, member ``k``
    seeded with ``seed + k``), each member for up to ``minutes`` (about M times the time in
    all), written once at the end (no checkpoint after each epoch, no ``resume``); the fit
    command's ``--uncertainty`` then writes the SD of chi over the members.

    Parameters
    ----------
    out : Path
        The bundle folder.
    minutes : float
        Training time (per member).
    config : mapping or None
        Entries over :data:`MODEL_CONFIG`.
    quiet : bool
    resume : bool
    bfr : str or None
    threads : int or None
    members : int
    n_train : int or None

    Returns
    -------
    dict
        ``heldout_metrics`` (rows of every method) and ``out``.
    """
    members = check_n_members(members)
    if resume and members > 1:
        raise ValueError("resume continues a single network's checkpoint; an ensemble (members > 1) is written "
                         "once at the end of its training: train it again instead")
    config = merge_config(MODEL_CONFIG, config, FREE_FORM_KEYS)
    if n_train is not None:
        config["n_train"] = check_count(n_train, "n_train", 1, "training heads")
    out = Path(out)
    with torch_threads(threads):
        train, val, test = make_phantom_sets(config, bfr)
        t = dict(config["training"])
        label = t.pop("label")
        inputs = tuple(t.pop("inputs"))
        tv_lambda, tv_scores = TV_DEFAULT_LAMBDA, []
        if "tv" in inputs:
            tv_lambda, tv_scores = tune_lambda("tv", train, config["tv_lambdas"])
            show(quiet, f"[train-model] TV lambda {tv_lambda:g} (training NRMSE per lambda {tv_scores})")
        est = QSMEstimator(label=label, unet=t.pop("unet"), inputs=inputs, seed=int(config["seed"]),
                           tv_lambda=tv_lambda, max_time_s=float(minutes) * 60.0,
                           checkpoint_path=out if members == 1 else None, progress=False, n_members=members, **t)
        previous_history: list = []
        if resume:
            done = QSMEstimator.load(out)
            if done.train_fingerprint_ != train.fingerprint:
                raise ValueError(f"cannot resume {out}: it was trained on other data")
            est.network_, est.normalisation_ = done.network_, done.normalisation_
            est.warm_start = True
            previous_history = list(done.manifest_.get("previous_history", [])) + list(done.history_)
            # a resumed run must not replace the bundle with a worse model
            scores = [r["val_loss"] for r in done.history_ if "val_loss" in r]
            est.previous_best_score_ = min(scores) if scores else float("inf")
        est.fit(train, validation=val)
        if resume:
            est.warm_start = False
        rows, _ = evaluate_methods({"unet": est}, test, train, tkd_threshold=float(config["tkd_threshold"]),
                                   tikhonov_lambdas=config["tikhonov_lambdas"], tv_lambdas=config["tv_lambdas"],
                                   include_cosmos=False, per_phantom=True)
        command = f"python -m qmri_labels.workflows.qsm train-model --out {_command_path(out)} --minutes {minutes:g}"
        command += (f" --bfr {bfr}" if bfr else "") + (f" --threads {int(threads)}" if threads else "")
        command += f" --members {members}" if members > 1 else ""
        command += f" --n-train {int(n_train)}" if n_train is not None else ""
        extra = {
            "workflow": "qmri_labels.workflows.qsm.model.train_model",
            "command": command,
            "model_config": config,
            "input_kind": est.input_kind_,
            "tv_lambda_tuning": {"lambdas": list(config["tv_lambdas"]), "train_nrmse": tv_scores},
            "test_fingerprint": test.fingerprint,
            "test_spec": test.spec_record(),
            "heldout_metrics": rows,
            "heldout_input": f"{_input_text(est.input_kind_)} of {len(test)} held-out phantoms (seed {test.spec.seed})",
            "fit_time_s": est.fit_time_s_,
            "previous_history": previous_history,
        }
        est.save(out, extra)
        if not quiet:
            print(_rows_text(rows), flush=True)
        return {"heldout_metrics": rows, "out": str(out)}


def phantoms_of(record: Mapping, kind: str, n: int | None = None) -> QSMPhantomSet:
    """The phantoms of a manifest's spec record holding the input ``kind``.

    Parameters
    ----------
    record : mapping
        A bundle manifest's ``test_spec`` or ``train_spec`` (its own ``bfr`` ignored).
    kind : str
        ``"local"`` (masked local fields) or ``"bfr:<method>"`` (the method's default options).
    n : int or None
        Number of phantoms (None: the record's; the first ``n`` of a seed are always the same).

    Returns
    -------
    QSMPhantomSet
    """
    spec = QSMPhantomSpec.from_dict({k: v for k, v in record.items() if k != "bfr"})
    if n is not None:
        spec = spec.replace(n=int(n))
    if kind == "local":
        return spec.replace(field_kind="local").generate()
    if kind.startswith("bfr:"):
        return bfr_phantom_set(spec, kind[4:])
    raise ValueError(f"cannot evaluate on input kind {kind!r}: 'local' or 'bfr:<method>'")


def _same_phantoms(record: Mapping) -> dict:
    """A spec record without what the input kind changes, nor the number of heads (to compare two
    bundles' phantoms: with the same seed, the first heads of a larger set are those of a smaller
    one, so bundles trained on 16 and on 128 heads are tuned and scored on the same ones)."""
    return {k: v for k, v in record.items() if k not in ("bfr", "field_kind", "n")}


def _rows_text(rows, keys=("nrmse", "xsim", "hfen", "ssim")) -> str:
    table = pd.DataFrame([{"method": r["method"], **{k: r[k] for k in keys}, "lambda": r.get("lambda")}
                          for r in rows])
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


#: what "better" means for each metric that :func:`compare_with_baselines` tests
METRIC_DIRECTIONS = {"nrmse": "lower", "hfen": "lower", "xsim": "higher", "ssim": "higher"}


def compare_with_baselines(by_kind: Mapping[str, list], networks, baselines=("tkd", "tikhonov", "tv"),
                           metrics=("nrmse", "xsim"), alpha: float = 0.05) -> list[dict]:
    """Paired tests of each network against each baseline, phantom by phantom.

    ``by_kind`` maps an input kind to the rows of :func:`evaluate_methods` (``per_phantom=True``).
    The phantoms are the pairing unit: a network "beats" a baseline in a metric only when it is
    better on average AND the paired t-test of the per-phantom differences is significant after
    Bonferroni over every comparison of the call (networks x baselines x metrics x input kinds).
    A mean that is better by less than the phantom-to-phantom noise of the difference is a tie.

    Parameters
    ----------
    by_kind : mapping of input kind -> rows
    networks : sequence of str
        Method names of the networks.
    baselines : sequence of str
    metrics : sequence of str
        Keys of :data:`METRIC_DIRECTIONS`.
    alpha : float
        Significance level after the correction.

    Returns
    -------
    list of dict
        One row per comparison: ``input``, ``network``, ``baseline``, ``metric``, ``better``
        (``"lower"``/``"higher"``), ``n``, ``network_mean``, ``baseline_mean``, ``mean_diff``
        (network minus baseline), ``ci_low``/``ci_high`` (uncorrected 95 % t-interval of it),
        ``wins`` (phantoms where the network is better), ``t``, ``p_value``, ``p_adjusted``,
        ``verdict`` (``"network"``, ``"baseline"`` or ``"tie"``).
    """
    unknown = sorted(set(metrics) - set(METRIC_DIRECTIONS))
    if unknown:
        raise ValueError(f"no direction for metrics {unknown}: choose from {sorted(METRIC_DIRECTIONS)}")
    rows = []
    for kind, kind_rows in by_kind.items():
        table = {r["method"]: r for r in kind_rows}
        for net in networks:
            for base in baselines:
                if net not in table or base not in table:
                    raise ValueError(f"{kind}: no rows for {net!r} or {base!r} to compare")
                for metric in metrics:
                    a = np.asarray(table[net]["per_phantom"][metric], dtype=np.float64)
                    b = np.asarray(table[base]["per_phantom"][metric], dtype=np.float64)
                    sign = -1.0 if METRIC_DIRECTIONS[metric] == "lower" else 1.0
                    test = paired_test(a, b, net, base)
                    rows.append({"input": kind, "network": net, "baseline": base, "metric": metric,
                                 "better": METRIC_DIRECTIONS[metric], "n": int(test["n"]),
                                 "network_mean": float(a.mean()), "baseline_mean": float(b.mean()),
                                 "mean_diff": float(test["mean_diff"]), "ci_low": float(test["ci_low"]),
                                 "ci_high": float(test["ci_high"]), "wins": int(np.sum(sign * (a - b) > 0)),
                                 "t": float(test["t"]), "p_value": float(test["p_value"])})
    adjusted = bonferroni([r["p_value"] for r in rows]) if rows else []
    for row, p_adj in zip(rows, adjusted):
        sign = -1.0 if row["better"] == "lower" else 1.0
        significant = bool(np.isfinite(p_adj) and p_adj < alpha)
        row["p_adjusted"] = float(p_adj)
        row["verdict"] = ("network" if sign * row["mean_diff"] > 0 else "baseline") if significant else "tie"
    return rows


def _comparisons_text(rows) -> str:
    keys = ("input", "network", "baseline", "metric", "network_mean", "baseline_mean", "wins", "n", "p_adjusted",
            "verdict")
    return pd.DataFrame([{k: r[k] for k in keys} for r in rows]).to_string(index=False,
                                                                          float_format=lambda v: f"{v:.4g}")


def evaluate_model(paths, bfr_methods=("vsharp",), quiet: bool = False, n_tune: int = 2,
                   threads: int | None = None, n_test: int | None = None) -> dict:
    """Score QSM bundles written by :func:`train_model` on masked local fields and after BFR.

    The bundles' held-out phantoms (their ``test_spec``; several bundles must share them) are
    scored on their masked local fields and, for each method of ``bfr_methods``, on the local
    fields that the method leaves from their total fields, on its eroded masks: every network,
    TKD, Tikhonov and TV side by side on the same phantoms, the lambdas tuned on the first
    ``n_tune`` TRAINING phantoms processed the same way. Networks are run on every input kind
    (``check_input_kind(..., force=True)``: this evaluation is what tells how a network holds
    up on the inputs it was not trained on).

    Each bundle's manifest gets its rows (its network as ``"unet"``, with each phantom's
    values): ``heldout_metrics`` on its own input kind (masked local fields for a network
    trained on them, the BFR method's fields for one trained on those),
    ``heldout_metrics_after_bfr`` (one list per method) and, for a network trained after BFR,
    ``heldout_metrics_local_fields``. ``n_test`` scores that many held-out phantoms of the same
    spec instead of its ``n`` (the first ``n`` are the same heads with the same noise): four
    phantoms cannot tell a margin from the spread between heads. Every network is compared with
    TKD, Tikhonov and TV phantom by phantom in NRMSE and XSIM (:func:`compare_with_baselines`:
    paired t-tests, Bonferroni over all of them); each manifest gets its network's rows as
    ``heldout_comparisons``.

    Parameters
    ----------
    paths : path or sequence of paths
        Bundle folders.
    bfr_methods : sequence of str
    quiet : bool
    n_tune : int
    threads : int or None
        Torch CPU threads (None: torch's default).
    n_test : int or None

    Returns
    -------
    dict
        ``{input kind: rows of every method}``.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("evaluate_model needs at least one bundle")
    if n_test is not None:
        n_test = check_count(n_test, "n_test", 2, "a paired test needs two phantoms")
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"bundles with the same folder name cannot be told apart in one table: {names}")
    with torch_threads(threads):
        estimators = {name: QSMEstimator.load(path) for name, path in zip(names, paths)}
        first = estimators[names[0]].manifest_
        config = first["model_config"]
        for name, est in estimators.items():
            m = est.manifest_
            for key in ("test_spec", "train_spec"):
                if _same_phantoms(m[key]) != _same_phantoms(first[key]):
                    raise ValueError(f"{name} and {names[0]} have other {key} phantoms; evaluate them separately")
            for key in ("tkd_threshold", "tikhonov_lambdas", "tv_lambdas"):
                if m["model_config"][key] != config[key]:
                    raise ValueError(f"{name} and {names[0]} tune the baselines differently ({key}); evaluate them "
                                     "separately")
        kinds = ["local"] + [f"bfr:{m}" for m in bfr_methods]
        kinds += sorted({est.input_kind_ for est in estimators.values()
                         if est.input_kind_.startswith("bfr:")} - set(kinds))
        by_kind = {}
        for kind in kinds:
            for est in estimators.values():
                check_input_kind(est.manifest_, kind, force=True)
            test = phantoms_of(first["test_spec"], kind, n=n_test)
            tune = phantoms_of(first["train_spec"], kind, n=n_tune)
            rows, _ = evaluate_methods(estimators, test, tune, tkd_threshold=float(config["tkd_threshold"]),
                                       tikhonov_lambdas=config["tikhonov_lambdas"], tv_lambdas=config["tv_lambdas"],
                                       include_cosmos=False, per_phantom=True)
            by_kind[kind] = rows
            show(quiet, f"[evaluate-model] {_input_text(kind)}, {len(test)} held-out phantoms:\n{_rows_text(rows)}")
        comparisons = compare_with_baselines(by_kind, names)
        show(quiet, "[evaluate-model] each network against each baseline, phantom by phantom (paired t-tests, "
                      f"Bonferroni over {len(comparisons)}):\n{_comparisons_text(comparisons)}")
        n_heldout = len(test)
        command = ("python -m qmri_labels.workflows.qsm evaluate-model "
                   f"--model {' '.join(_command_path(p) for p in paths)} --bfr {' '.join(bfr_methods)}"
                   + (f" --n-test {int(n_test)}" if n_test is not None else "")
                   + (f" --threads {int(threads)}" if threads else ""))
        for name, path in zip(names, paths):
            est = estimators[name]
            own = {kind: [dict(r, method="unet") if r["method"] == name else r for r in rows
                          if r["method"] == name or r["method"] not in estimators] for kind, rows in by_kind.items()}
            keep = {k: v for k, v in read_manifest(path).items()
                    if k not in ("format", "format_version", "weights", "created")}
            kind = est.input_kind_ if est.input_kind_ in own else "local"
            keep["heldout_metrics"] = own[kind]
            keep["heldout_input"] = (f"{_input_text(kind)} of {n_heldout} held-out phantoms "
                                     f"(seed {first['test_spec']['seed']})")
            keep["heldout_comparisons"] = [{k: v for k, v in r.items() if k != "network"} for r in comparisons
                                           if r["network"] == name]
            keep["heldout_metrics_tuned_on"] = f"first {int(n_tune)} training phantoms"
            keep["heldout_metrics_after_bfr"] = {**keep.get("heldout_metrics_after_bfr", {}),
                                                 **{k[4:]: v for k, v in own.items() if k.startswith("bfr:")}}
            if kind != "local":
                keep["heldout_metrics_local_fields"] = own["local"]
            keep["evaluate_command"] = command
            est.save(path, keep)
        return by_kind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmri_labels.workflows.qsm",
                                     description=f"Train the shipped QSM U-Net (models/{SHIPPED_MODEL}).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-model", help="train and evaluate the shipped QSM U-Net")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--bfr", choices=sorted(BFR_METHODS), default=None,
                   help="train on the local fields this background-field removal leaves from the phantoms' total "
                        "fields (eroded masks); default: masked true local fields")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue training the bundle at --out")
    p.add_argument("--members", type=int, default=1,
                   help="train a deep ensemble of this many U-Nets (seeds seed, seed + 1, ...; --minutes each) "
                        "whose spread the fit command writes as an SD map with --uncertainty (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--n-train", type=int, default=None,
                   help=f"training heads (default {MODEL_CONFIG['n_train']}); validation and held-out heads unchanged")
    e = sub.add_parser("evaluate-model", help="score QSM bundles on masked local fields and after background-field "
                                              "removal, side by side with TKD, Tikhonov and tuned TV")
    e.add_argument("--model", type=Path, nargs="+", required=True,
                   help="one or more bundle folders (sharing their held-out phantoms); their manifests get the rows")
    e.add_argument("--bfr", nargs="+", default=["vsharp"], choices=sorted(BFR_METHODS),
                   help="BFR methods (qmri_labels.fitting.bfr)")
    e.add_argument("--n-test", type=int, default=None,
                   help="score this many held-out phantoms of the bundles' test spec (default: its n; the first n "
                        "are the same): more phantoms tell a margin from the spread between heads")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "train-model":
        train_model(args.out, args.minutes, quiet=args.quiet, resume=args.resume, bfr=args.bfr, threads=args.threads,
                    members=args.members, n_train=args.n_train)
    else:
        evaluate_model(args.model, tuple(args.bfr), quiet=args.quiet, threads=args.threads, n_test=args.n_test)
    return 0
