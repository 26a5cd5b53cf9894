"""What the QSM studies and the shipped model's training share: phantom sets (masked local fields
or what a background-field removal leaves), the baselines (TKD, Tikhonov, TV, COSMOS) with their
lambdas tuned on training phantoms, scoring every method side by side, and the studies' outputs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np

from qmri_labels.analysis.image_metrics import image_metrics, nrmse
from qmri_labels.data.qsm import QSMPhantomSet, QSMPhantomSpec
from qmri_labels.estimators import QSMEstimator
from qmri_labels.fileio import atomic_write_bytes, write_json
from qmri_labels.fitting.bfr import bfr_record, remove_background_per_orientation
from qmri_labels.fitting.qsm_inversion import (
    TIKHONOV_DEFAULT_LAMBDA,
    TV_DEFAULT_LAMBDA,
    cosmos,
    tikhonov,
    tkd,
    tv,
)
from qmri_labels.provenance import device_info, package_versions

#: defaults shared by the QSM study kinds (CPU size); each kind adds its own
STUDY_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "phantom": {"shape": [32, 32, 32], "noise_sigma": 0.005, "n_orientations": 5, "max_angle_deg": 30.0},
    "n_train": 8,
    "n_val": 2,
    "n_test": 3,
    "training": {"preset": "graf", "unet": {"levels": 3, "init_channels": 8}, "inputs": ["field", "tkd"],
                 "patch_size": None, "batch_size": 2, "max_epochs": 20, "samples_per_epoch": 8,
                 "lr": 1e-3, "weight_decay": 0.01, "max_time_s": None, "device": None},
    "tikhonov_lambdas": [0.005, 0.01, 0.02, 0.05, 0.1],
    "tv_lambdas": [1e-4, 3e-4, 1e-3],
    "tkd_threshold": 0.19,
}
#: sub-mappings of the config checked by their consumer (QSMPhantomSpec, QSMEstimator), not against DEFAULTS
FREE_FORM_KEYS = ("phantom", "training")


def write_table(path: Path, df) -> None:
    """``df`` as CSV at ``path`` (atomically)."""
    atomic_write_bytes(path, df.to_csv(index=False).encode())


def save_png(fig, path: Path) -> None:
    """``fig`` as PNG at ``path`` (atomically)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def make_phantom_sets(config: Mapping, bfr: str | None = None) -> tuple[QSMPhantomSet, QSMPhantomSet, QSMPhantomSet]:
    """Train / validation / test phantom sets from one config (seeds ``seed``, +1, +2).

    With ``bfr`` (a method of :mod:`qmri_labels.fitting.bfr`) every set holds the local fields
    that the method leaves from the phantoms' total fields, on its eroded masks
    (:func:`bfr_phantom_set`); the heads and the noise are those of the same seeds.
    """
    spec = QSMPhantomSpec.from_dict({**config["phantom"], "n": int(config["n_train"]), "seed": int(config["seed"])})
    specs = (spec, spec.replace(n=int(config["n_val"]), seed=int(config["seed"]) + 1),
             spec.replace(n=int(config["n_test"]), seed=int(config["seed"]) + 2))
    if bfr is None:
        return tuple(s.generate() for s in specs)
    return tuple(bfr_phantom_set(s, bfr) for s in specs)


def bfr_phantom_set(spec: QSMPhantomSpec, method: str, **options) -> QSMPhantomSet:
    """The phantoms of ``spec`` with their TOTAL field, background removed by ``method``.

    Same seed, same heads, same noise as ``spec``; the fields become the method's local fields,
    and chi and the mask are restricted to its eroded mask (what an evaluation after BFR scores).

    Parameters
    ----------
    spec : QSMPhantomSpec
    method : str
        A method of :mod:`qmri_labels.fitting.bfr`.
    **options
        The method's options.

    Returns
    -------
    QSMPhantomSet
        Recording the processing as its ``bfr`` (method and every option).
    """
    record = bfr_record(method, **options)
    total = spec.replace(field_kind="total").generate()
    fields, mask = remove_background_per_orientation(method, total.fields, total.mask, total.voxel_size,
                                                     total.orientations, **options)
    return QSMPhantomSet(spec=total.spec, chi=(total.chi * mask).astype(np.float32), mask=mask, fields=fields,
                         orientations=total.orientations, bfr=record)


def _phantom_metrics(estimates: np.ndarray, data: QSMPhantomSet, keys=None) -> dict[str, list[float]]:
    """Each metric's value on each phantom, ``{metric: [value per phantom]}``."""
    if keys == ("nrmse",):
        rows = [{"nrmse": nrmse(e, c, m)} for e, c, m in zip(estimates, data.chi, data.mask)]
    else:
        rows = [image_metrics(e, c, m) for e, c, m in zip(estimates, data.chi, data.mask)]
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def _mean_metrics(estimates: np.ndarray, data: QSMPhantomSet, keys=None) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in _phantom_metrics(estimates, data, keys).items()}


def _invert(method: str, data: QSMPhantomSet, lam: float, **options) -> np.ndarray:
    b0 = data.orientations[0]
    if method == "tikhonov":
        return tikhonov(data.field, data.voxel_size, b0, lam=float(lam), mask=data.mask, **options)
    if method == "tv":
        return tv(data.field, data.mask, data.voxel_size, b0, lam=float(lam), **options)
    raise ValueError(f"method must be 'tikhonov' or 'tv', got {method!r}")


def tune_lambda(method: str, data: QSMPhantomSet, lambdas, n_phantoms: int | None = 4,
                **options) -> tuple[float, list[float]]:
    """The regularisation weight of ``method`` with the lowest mean NRMSE.

    Tune on TRAINING phantoms (never the test ones): a baseline tuned on the test set would be
    favoured unfairly, one left untuned would be handicapped.

    Parameters
    ----------
    method : {"tikhonov", "tv"}
    data : QSMPhantomSet
        Training phantoms.
    lambdas : float or sequence of float
    n_phantoms : int or None
        Tune on the first phantoms only (None: all).
    **options
        Options of the inversion (e.g. ``max_iter`` of TV).

    Returns
    -------
    best : float
    scores : list of float
        Mean NRMSE per lambda (NaN when there was one lambda to choose from).
    """
    lambdas = [float(v) for v in (lambdas if not np.isscalar(lambdas) else [lambdas])]
    if not lambdas:
        raise ValueError("lambdas must hold at least one value")
    if method not in ("tikhonov", "tv"):
        raise ValueError(f"method must be 'tikhonov' or 'tv', got {method!r}")
    if len(lambdas) == 1:
        return lambdas[0], [float("nan")]
    subset = data if n_phantoms is None or n_phantoms >= len(data) else _subset(data, int(n_phantoms))
    scores = [_mean_metrics(_invert(method, subset, lam, **options), subset, keys=("nrmse",))["nrmse"]
              for lam in lambdas]
    return lambdas[int(np.argmin(scores))], scores


def _subset(data: QSMPhantomSet, n: int) -> QSMPhantomSet:
    return QSMPhantomSet(spec=data.spec.replace(n=n), chi=data.chi[:n], mask=data.mask[:n], fields=data.fields[:n],
                         orientations=data.orientations, bfr=data.bfr)


def evaluate_methods(networks: Mapping[str, QSMEstimator], test: QSMPhantomSet, tune_on: QSMPhantomSet | None = None,
                     *, tkd_threshold: float = 0.19, tikhonov_lambdas=(TIKHONOV_DEFAULT_LAMBDA,),
                     tv_lambdas=(TV_DEFAULT_LAMBDA,), include_cosmos: bool = True,
                     include_tv: bool = True, per_phantom: bool = False) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Metrics (mean over test phantoms) of each network and of TKD, Tikhonov, TV and COSMOS.

    Parameters
    ----------
    networks : mapping of name -> QSMEstimator
    test : QSMPhantomSet
    tune_on : QSMPhantomSet or None
        Phantoms the lambdas of Tikhonov and TV are tuned on (pass TRAINING phantoms; lowest
        mean NRMSE, :func:`tune_lambda`); None: the first of each list is used.
    tkd_threshold : float
    tikhonov_lambdas, tv_lambdas : sequence of float
    include_cosmos : bool
        COSMOS too, where the phantoms have three orientations or more.
    include_tv : bool
    per_phantom : bool
        Each row also holds ``"per_phantom": {metric: [value per test phantom]}`` (to tell a
        margin from the spread between phantoms).

    Returns
    -------
    rows : list of dict
        ``{"method", "nrmse", ...}`` per method (``"lambda"`` for the tuned baselines).
    estimates : dict of method -> ndarray
    """
    b0 = test.orientations[0]
    estimates: dict[str, np.ndarray] = {}
    lambdas: dict[str, float] = {}
    estimates["tkd"] = tkd(test.field, test.voxel_size, b0, tkd_threshold, mask=test.mask)
    tuned = tune_on is not None
    lam = tune_lambda("tikhonov", tune_on, tikhonov_lambdas)[0] if tuned else float(list(tikhonov_lambdas)[0])
    lambdas["tikhonov"] = lam
    estimates["tikhonov"] = _invert("tikhonov", test, lam)
    if include_tv:
        lam = tune_lambda("tv", tune_on, tv_lambdas)[0] if tuned else float(list(tv_lambdas)[0])
        lambdas["tv"] = lam
        estimates["tv"] = _invert("tv", test, lam)
    if include_cosmos and test.fields.shape[1] >= 3:
        estimates["cosmos"] = cosmos(test.fields, test.orientations, test.voxel_size, mask=test.mask)
    for name, net in networks.items():
        estimates[name] = net.predict(test.field, test.mask)
    rows = []
    for name, est in estimates.items():
        values = _phantom_metrics(est, test)
        row = {"method": name, **{k: float(np.mean(v)) for k, v in values.items()}}
        if name in lambdas:
            row["lambda"] = lambdas[name]
        if per_phantom:
            row["per_phantom"] = values
        rows.append(row)
    return rows, estimates


def study_estimator(config: Mapping, seed: int, **overrides) -> QSMEstimator:
    """The unfitted network of a study.

    Parameters
    ----------
    config : mapping
        The study's configuration (its ``training`` entries).
    seed : int
    **overrides
        QSMEstimator keywords over ``training`` (``unet`` entries are merged key by key).

    Returns
    -------
    QSMEstimator
    """
    t = dict(config["training"])
    unet = dict(t.pop("unet", {}) or {})
    unet.update(overrides.pop("unet", {}))
    params = {**t, **overrides}
    params["inputs"] = tuple(params.get("inputs", ("field", "tkd")))
    return QSMEstimator(unet=unet, seed=seed, progress=False, **params)


def slices_figure(test: QSMPhantomSet, estimates: Mapping[str, np.ndarray], index: int = 0, n_slices: int = 3):
    """Slices of one test phantom: the truth, each method's estimate and its difference to the truth.

    Parameters
    ----------
    test : QSMPhantomSet
    estimates : mapping of method -> ndarray (N, X, Y, Z)
    index : int
        The phantom shown.
    n_slices : int
        Axial slices, spread over the middle 40 % of the volume.

    Returns
    -------
    matplotlib.figure.Figure
    """
    # pyplot is imported when a figure is drawn, after the backend is chosen
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chi = test.chi[index]
    zs = np.linspace(chi.shape[2] * 0.3, chi.shape[2] * 0.7, n_slices).astype(int)
    names = list(estimates)
    vmax = float(np.abs(chi).max()) or 1.0
    fig, axes = plt.subplots(n_slices * 2, len(names) + 1, figsize=(1.8 * (len(names) + 1), 3.4 * n_slices))
    axes = np.atleast_2d(axes)
    for r, z in enumerate(zs):
        axes[2 * r, 0].imshow(chi[:, :, z].T, cmap="gray", vmin=-vmax, vmax=vmax, origin="lower")
        axes[2 * r, 0].set_title(f"true chi z={z}", fontsize=7)
        axes[2 * r + 1, 0].axis("off")
        for c, name in enumerate(names, start=1):
            est = estimates[name][index]
            axes[2 * r, c].imshow(est[:, :, z].T, cmap="gray", vmin=-vmax, vmax=vmax, origin="lower")
            axes[2 * r, c].set_title(name, fontsize=7)
            axes[2 * r + 1, c].imshow((est - chi)[:, :, z].T, cmap="RdBu_r", vmin=-vmax / 2, vmax=vmax / 2, origin="lower")
            axes[2 * r + 1, c].set_title(f"{name} - true", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def show(quiet: bool, *args):
    """Print ``args`` unless ``quiet`` (the QSM commands' tables go to stdout)."""
    if not quiet:
        print(*args, flush=True)


def write_manifest(config, out, data, timings, extra=None) -> dict:
    """Write a QSM study's ``manifest.json``.

    Parameters
    ----------
    config : mapping
    out : Path
    data : mapping of name -> QSMPhantomSet
        Their fingerprints are recorded.
    timings : mapping of step -> seconds
    extra : mapping or None
        More entries.

    Returns
    -------
    dict
        The manifest written.
    """
    man = {
        "config": config,
        "seed": int(config["seed"]),
        "fingerprints": {k: d.fingerprint for k, d in data.items()},
        "versions": package_versions(),
        "device": device_info(config["training"].get("device") or "cpu"),
        "timings_s": timings,
    }
    if extra:
        man.update(extra)
    write_json(out / "manifest.json", man)
    return man


def field_label(data: QSMPhantomSet) -> str:
    """What the fields of a table's phantoms are (an unmasked field is always said so)."""
    return {"local": "masked local fields", "total": "TOTAL fields (background not removed)",
            "local_unmasked": "UNMASKED local fields (field outside the brain mask given; no real map has it)"}[
        data.spec.field_kind]
