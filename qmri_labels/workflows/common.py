"""Helpers shared by the study workflows: configuration merging, per-sample errors on the
normalised parameter scale, paired tests, tables, run manifests and messages."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from qmri_labels.analysis.report import markdown_table
from qmri_labels.analysis.stats import bonferroni, paired_comparisons
from qmri_labels.fileio import deep_merge, write_text
from qmri_labels.provenance import device_info, package_versions
from qmri_labels.training.reproducibility import record_determinism


#: keys any study configuration may carry besides its workflow's ``DEFAULTS``
META_KEYS = ("kind", "name", "description", "title")


def merge_config(defaults: Mapping, config: Mapping | None, free: tuple[str, ...] = ()) -> dict:
    """``config`` merged over ``defaults`` by :func:`qmri_labels.fileio.deep_merge` (the one
    merge), strictly: an unknown key at any level is a ``ValueError`` naming it and the known
    ones, except under the dotted paths in ``free`` (sub-mappings their consumer validates,
    e.g. a workflow's ``FREE_FORM_KEYS``) and where the default is ``None`` or empty."""
    return deep_merge(defaults, dict(config or {}), strict=True, free=free, allow=META_KEYS)


def check_count(value, name: str, minimum: int = 1, why: str | None = None) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= ``minimum``
    (a bool is not a count; 3.0 is 3). ``why`` says what the count is, in the error."""
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        whole = False
    if not whole or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}" + (f" ({why})" if why else "") + f", got {value!r}")
    return int(value)


def parameter_indices(dataset, parameters) -> list[int]:
    names = list(dataset.param_names)
    if parameters is None:
        return list(range(len(names)))
    missing = [p for p in parameters if p not in names]
    if missing:
        raise ValueError(f"parameters {missing} are not parameters of model {dataset.spec.model!r} {names}")
    return [names.index(p) for p in parameters]


def normalised_errors(pred: np.ndarray, dataset, parameters=None) -> tuple[np.ndarray, list[str]]:
    """Errors ``(pred - true) / prior range`` (N, P') of the chosen parameters, and their names.

    The range is the test dataset's prior support, so every network tested on one dataset is
    scored on one scale (the same normalisation the training losses use).
    """
    idx = parameter_indices(dataset, parameters)
    support = dataset.prior_support
    scale = (support[1] - support[0])[idx]
    scale = np.where(scale > 0, scale, 1.0)
    err = (np.asarray(pred, np.float64)[:, idx] - dataset.theta_true.astype(np.float64)[:, idx]) / scale
    return err, [dataset.param_names[i] for i in idx]


def per_sample_l2(pred: np.ndarray, dataset, parameters=None) -> np.ndarray:
    """Per-sample squared normalised error, averaged over the chosen parameters (N,).

    NaN predictions (e.g. a failed fit) give NaN, which the paired tests leave out.
    """
    err, _ = normalised_errors(pred, dataset, parameters)
    return np.mean(err**2, axis=1)


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return write_text(path, frame.to_csv(index=False, float_format="%.9g"))


def markdown(frame: pd.DataFrame, index: bool = False) -> str:
    if index:
        frame = frame.reset_index()
    return markdown_table(frame)


def run_manifest(kind: str, config: Mapping, started: float, t0: float, **more) -> dict:
    """Manifest of a workflow run: config, versions, device, determinism flags, timing.

    ``started`` is the wall-clock start (``time.time()``), ``t0`` the ``time.perf_counter()`` one.
    """
    return {"kind": kind, "config": dict(config), "versions": package_versions(), "device": device_info("cpu"),
            "determinism": record_determinism(), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_seconds": time.perf_counter() - t0, **more}


def say(quiet: bool, message: str) -> None:
    """A workflow's progress message, to the ``qmri_labels`` logger (INFO) unless ``quiet``;
    the study command shows INFO messages on stderr (``--quiet``: warnings only)."""
    if not quiet:
        logging.getLogger("qmri_labels").info(message)


def paired_test(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> dict:
    """Paired t-test of ``a - b`` (H2's :func:`qmri_labels.analysis.stats.paired_comparisons`)."""
    row = paired_comparisons({name_a: a, name_b: b}, pairs=[(name_a, name_b)], correction="none").iloc[0]
    return {k: row[k] for k in ("n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "t", "p_value",
                                "wilcoxon_p", "cohen_dz")}


def add_correction(table: pd.DataFrame, alpha: float, correction: str) -> pd.DataFrame:
    table = table.copy()
    table["p_adjusted"] = bonferroni(table["p_value"].to_numpy(float), correction) if len(table) else []
    table["significant"] = table["p_adjusted"] < alpha
    table["correction"] = correction
    return table
