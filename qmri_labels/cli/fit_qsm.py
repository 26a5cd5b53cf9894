"""The fit command's QSM part: dipole inversion of a local field map (ppm) into chi (ppm).

Conventional inversions come from :mod:`qmri_labels.fitting.qsm_inversion` (``tkd``,
``tikhonov``, ``tv``); networks are QSM U-Net bundles read with ``QSMEstimator.load`` and run
with ``predict``, both through their public names only. The input is a *local* field
(background field removed, zero outside the mask), or a *total* field with ``--bfr METHOD``,
which removes the background first (:mod:`qmri_labels.fitting.bfr`). A network trained on
another kind of input than it is given is refused unless ``--allow-input-mismatch``.

With ``--uncertainty --sd-kind label`` a U-Net ensemble (``QSMEstimator(n_members=M)``, M >= 2)
also gives the SD of chi over its members, written beside the chi map as
``<prefix>_desc-sd_Chimap.nii.gz``. That SD is the members' disagreement, not an error bar
against the true chi, so it is written only when asked for by that name (``--uncertainty``
alone is refused, saying so); a single U-Net and the conventional inversions report no SD and
are refused.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from qmri_labels.cli.common import (
    InputError,
    describe_file,
    environment,
    output_prefix,
    positive_voxel_size,
    read_mask,
)
from qmri_labels.data.io import load_nifti, sha256_file, write_mat
from qmri_labels.estimators import QSMEstimator, estimator_kind, manifest_kind, read_manifest
from qmri_labels.estimators.base import SDNotCalibrated
from qmri_labels.estimators.shipped import find_bundle
from qmri_labels.fitting import bfr, qsm_inversion
from qmri_labels.maps.derivatives import chi_map_name, chi_sd_map_name, write_dataset_description, write_map
from qmri_labels.maps.qc import write_qc_figure
from qmri_labels.training.qsm import check_input_kind

logger = logging.getLogger("qmri_labels")

QSM_ESTIMATORS = ("tkd", "tikhonov", "tv")
#: what ``--uncertainty`` needs for QSM (said by every refusal)
SD_ESTIMATORS = ("a QSM U-Net ensemble: a bundle trained with QSMEstimator(n_members=M), M >= 2 (e.g. "
                 "python -m qmri_labels.workflows.qsm train-model --members 5)")
#: background-field-removal methods of ``--bfr`` (qmri_labels.fitting.bfr)
BFR_CHOICES = ("sharp", "vsharp", "resharp", "pdf", "lbv")


def add_arguments(parser) -> None:
    qsm = parser.add_argument_group("QSM")
    qsm.add_argument("--field", type=Path,
                     help="3-D field map in ppm: a local field (background removed), or a total field with --bfr")
    qsm.add_argument("--bfr", choices=BFR_CHOICES, default=None,
                     help="--field is a TOTAL field: remove the background field with this method first "
                          "(qmri_labels.fitting.bfr defaults; the mask is eroded as the method requires)")
    qsm.add_argument("--allow-input-mismatch", action="store_true",
                     help="QSM network: run even if it was trained on another kind of field than it is given "
                          "(e.g. masked local fields vs fields after --bfr); the manifest records it")
    qsm.add_argument("--b0-dir", default="0,0,1",
                     help="main field direction in the image's voxel axes, e.g. 0,0,1; or 'affine' for "
                          "the scanner's z axis expressed through the image affine (default 0,0,1)")
    qsm.add_argument("--mat", action="store_true", help="also write the chi map as a MATLAB .mat file")
    qsm.add_argument("--patch-size", type=int, default=None,
                     help="QSM network: predict overlapping cubes of this side instead of the whole volume "
                          "(less memory; a multiple of the U-Net's size multiple)")
    qsm.add_argument("--tkd-threshold", type=float, default=None,
                     help="TKD: |D| below which the kernel inverse is truncated (default 0.19)")
    qsm.add_argument("--tikhonov-lambda", type=float, default=None,
                     help="Tikhonov: weight of the gradient regulariser (default: the toolkit's tuned value)")
    qsm.add_argument("--tv-lambda", type=float, default=None,
                     help="TV: weight of the total-variation term (default: the toolkit's value tuned on "
                          "training phantoms, qmri_labels.fitting.qsm_inversion.TV_DEFAULT_LAMBDA)")


#: the QSM-only options and the value each has when not given (refused with diffusion data)
QSM_ONLY_OPTIONS = {"bfr": None, "allow_input_mismatch": False, "mat": False, "patch_size": None,
                    "tkd_threshold": None, "tikhonov_lambda": None, "tv_lambda": None}


def prepare_local_field(args, field_map: np.ndarray, mask: np.ndarray, voxel_size, b0_dir, device
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The local field the inversion works on, its mask, and a record for the manifest.

    Without ``--bfr`` the input is taken as a local field; with it, the background field is
    removed by that method (its documented defaults), which also erodes the mask.
    """
    if args.bfr is None:
        return field_map, mask, {"input_kind": "local", "background_field_removal": "none (the input is a local field)"}
    total = torch.as_tensor(field_map, dtype=torch.float32, device=device)
    local, eroded = bfr.remove_background(args.bfr, total, torch.as_tensor(mask, device=device), voxel_size, b0_dir)
    eroded = eroded.cpu().numpy().astype(bool)
    if not eroded.any():
        raise InputError(f"--bfr {args.bfr}: the eroded mask is empty (the mask is too small for the method's "
                         "kernel radius)")
    local = np.where(eroded, local.cpu().numpy(), 0).astype(np.float32)
    return local, eroded, {"input_kind": f"bfr:{args.bfr}",
                           "background_field_removal": {"method": args.bfr, "options": dict(bfr.DEFAULTS[args.bfr]),
                                                        "voxels_in_mask": int(mask.sum()),
                                                        "voxels_after_erosion": int(eroded.sum())}}


def run_qsm(args, out_dir: Path, device) -> dict:
    """Dipole inversion of a local field map; writes chi (ppm) into ``out_dir``; returns the manifest."""
    timings = {}
    t0 = time.perf_counter()
    field_volume = load_nifti(args.field)
    if not (field_volume.ndim == 3 or (field_volume.ndim == 4 and field_volume.shape[3] == 1)):
        raise InputError(f"{args.field}: the field map must be 3-D, got shape {field_volume.shape}")
    field_map = field_volume.read().reshape(field_volume.shape[:3])
    mask_volume, mask = read_mask(args.mask, field_volume)
    nonfinite = mask & ~np.isfinite(field_map)
    n_nonfinite = int(nonfinite.sum())
    mask = mask & ~nonfinite
    if not mask.any():
        raise InputError(f"{args.field}: no finite field value inside the mask")
    field_map = np.where(mask, field_map, 0).astype(np.float32)
    voxel_size = positive_voxel_size(field_volume, args.field)
    b0_dir, b0_source = parse_b0_dir(args.b0_dir, field_volume.affine)
    input_mask = mask
    field_map, mask, field_info = prepare_local_field(args, field_map, mask, voxel_size, b0_dir, device)
    timings["read_inputs"] = round(time.perf_counter() - t0, 3)

    t1 = time.perf_counter()
    name = args.estimator or "tkd"
    if name != "tkd" and args.tkd_threshold is not None:
        raise InputError("--tkd-threshold applies to --estimator tkd only")
    if name != "tikhonov" and args.tikhonov_lambda is not None:
        raise InputError("--tikhonov-lambda applies to --estimator tikhonov only")
    if name != "tv" and args.tv_lambda is not None:
        raise InputError("--tv-lambda applies to --estimator tv only")
    if name in QSM_ESTIMATORS and args.patch_size is not None:
        raise InputError("--patch-size applies to QSM networks only")
    if name in QSM_ESTIMATORS and args.allow_input_mismatch:
        raise InputError("--allow-input-mismatch applies to QSM networks only")
    chi, sd, info = invert_field(name, field_map, mask, voxel_size, b0_dir, device, tkd_threshold=args.tkd_threshold,
                                 tikhonov_lambda=args.tikhonov_lambda, tv_lambda=args.tv_lambda,
                                 patch_size=args.patch_size, input_kind=field_info["input_kind"],
                                 allow_input_mismatch=args.allow_input_mismatch, uncertainty=args.uncertainty,
                                 sd_kind=args.sd_kind)
    chi = np.where(mask, chi, 0).astype(np.float32)
    sd = None if sd is None else np.where(mask, sd, 0).astype(np.float32)
    timings["inversion"] = round(time.perf_counter() - t1, 3)

    t2 = time.perf_counter()
    prefix = output_prefix(args.prefix, args.field, ("_field", "_localfield", "_Chimap"))
    outputs = {}
    checksums = {"field": sha256_file(args.field), "mask": sha256_file(args.mask)}
    written = write_map(out_dir, chi_map_name(prefix), chi, field_volume.affine, field_volume.header,
                        {"Model": "qsm", "Parameter": "chi", "Units": "ppm", "Estimator": info,
                         "B0Direction": list(b0_dir), "InputChecksums": checksums,
                         "InputKind": field_info["input_kind"],
                         "Description": "susceptibility chi; 0 outside the mask"
                                        + (" (the mask eroded by background-field removal)" if args.bfr else "")},
                        description=f"qmri_labels chi [ppm] {name}")
    outputs[written[0]] = "susceptibility chi (ppm), float32; 0 outside the mask"
    outputs[written[1]] = f"sidecar of {written[0]}"
    uncertainty = None
    if sd is not None:
        uncertainty = {"method": sd_method(info["n_members"]), "n_members": info["n_members"],
                       "sd_kind": args.sd_kind, "map": chi_sd_map_name(prefix)}
        written = write_map(out_dir, chi_sd_map_name(prefix), sd, field_volume.affine, field_volume.header,
                            {"Model": "qsm", "Parameter": "chi", "Statistic": "standard deviation", "Units": "ppm",
                             "Method": uncertainty["method"], "SDKind": args.sd_kind, "Estimator": info,
                             "B0Direction": list(b0_dir),
                             "InputChecksums": checksums, "InputKind": field_info["input_kind"],
                             "Description": "standard deviation of the chi estimate over the ensemble's members; "
                                            "0 outside the mask"},
                            description=f"qmri_labels sd(chi) [ppm] {name}")
        outputs[written[0]] = (f"standard deviation of chi (ppm) over the {info['n_members']} members of the "
                               "U-Net ensemble, float32; 0 outside the mask")
        outputs[written[1]] = f"sidecar of {written[0]}"
    if args.mat:
        mat_name = f"{prefix}_chi.mat"
        mat = {"chi": chi, "mask": mask.astype(np.uint8), "voxel_size": np.array(voxel_size),
               "b0_dir": np.array(b0_dir), "affine": field_volume.affine}
        if sd is not None:
            mat["chi_sd"] = sd
        write_mat(out_dir / mat_name, mat)
        outputs[mat_name] = ("MATLAB file: chi (ppm), " + ("chi_sd (ppm), " if sd is not None else "")
                             + "mask, voxel_size (mm), b0_dir, affine")
    qc_name = f"{prefix}_qc.png"
    field_title = f"local field after {args.bfr} (ppm)" if args.bfr else "field (ppm)"
    panels = {field_title: field_map, "chi (ppm)": chi}
    if sd is not None:
        panels["sd of chi (ppm)"] = sd
    write_qc_figure(out_dir / qc_name, panels, title=f"{args.field.name}: QSM by {name}", orthogonal=True,
                    voxel_size=voxel_size)
    outputs[qc_name] = "QC figure: field, chi" + (" and its SD" if sd is not None else "") + \
        ", three orthogonal middle slices"
    write_dataset_description(out_dir, "Quantitative susceptibility maps")
    outputs["dataset_description.json"] = "BIDS derivative dataset description"
    outputs["manifest.json"] = "this file"
    timings["write"] = round(time.perf_counter() - t2, 3)

    return {
        "tool": "qmri_labels.fit",
        "kind": "qsm",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"field": describe_file(field_volume), "mask": describe_file(mask_volume)},
        "model": {"name": "qsm", "parameters": ["chi"], "units": {"chi": "ppm"}},
        "field": field_info,
        "b0_dir": list(b0_dir),
        "b0_dir_source": b0_source,
        "voxel_size_mm": list(voxel_size),
        "estimator": info,
        "uncertainty": uncertainty,
        "voxels": {"total": int(np.prod(field_volume.shape[:3])), "in_mask": int(input_mask.sum()) + n_nonfinite,
                   "estimated": int(mask.sum()),
                   "skipped": {"nonfinite_field": n_nonfinite,
                               "eroded_by_bfr": int(input_mask.sum()) - int(mask.sum())}},
        **environment(device),
        "timings_s": timings,
        "outputs": outputs,
    }


def parse_b0_dir(text: str, affine: np.ndarray) -> tuple[tuple[float, float, float], str]:
    """A unit main-field direction in voxel axes from ``--b0-dir`` (three numbers or 'affine')."""
    if text.strip().lower() == "affine":
        axes = affine[:3, :3]
        norms = np.linalg.norm(axes, axis=0)
        if np.any(norms == 0):
            raise InputError("--b0-dir affine: the image affine is singular")
        direction = (axes / norms).T @ np.array([0.0, 0.0, 1.0])
        source = "scanner z axis through the image affine"
    else:
        try:
            direction = np.array([float(v) for v in text.split(",")])
        except ValueError:
            raise InputError(f"--b0-dir {text!r}: give three numbers, e.g. 0,0,1, or 'affine'") from None
        if direction.shape != (3,) or not np.all(np.isfinite(direction)):
            raise InputError(f"--b0-dir {text!r}: give three numbers, e.g. 0,0,1, or 'affine'")
        source = "given (image voxel axes)"
    norm = float(np.linalg.norm(direction))
    if norm == 0:
        raise InputError(f"--b0-dir {text!r}: the direction has zero length")
    return tuple(float(v) for v in direction / norm), source


def sd_method(n_members: int) -> str:
    """What a QSM SD map is (its sidecar's ``Method``)."""
    return (f"standard deviation (ddof 0) of chi over the {n_members} members of a deep ensemble of U-Nets, each "
            "trained from another seed: the members' disagreement (epistemic), not the noise in the field; NOT "
            "calibrated against the true chi, written only because it was asked for by name (--sd-kind label)")


def invert_field(name, field_map, mask, voxel_size, b0_dir, device, tkd_threshold=None, tikhonov_lambda=None,
                 tv_lambda=None, patch_size=None, input_kind="local", allow_input_mismatch=False, uncertainty=False,
                 sd_kind="truth"):
    """chi (ppm) inside ``mask``, its SD or None, and a description of the estimator for the manifest.

    ``input_kind`` says what ``field_map`` is (``"local"`` or ``"bfr:<method>"``); a network
    trained on another kind is refused unless ``allow_input_mismatch``. With ``uncertainty``
    the SD of chi over the members of a U-Net ensemble is returned too (anything else, which
    reports none, is refused); without it the SD is None.
    """
    if name in QSM_ESTIMATORS:
        if uncertainty:
            raise InputError(f"--uncertainty: the {name} inversion reports no standard deviation; QSM SD maps come "
                             f"from {SD_ESTIMATORS}, given as --estimator PATH")
        if name == "tkd":
            options = {"threshold": 0.19 if tkd_threshold is None else tkd_threshold}
        elif name == "tikhonov":
            options = {"lam": qsm_inversion.TIKHONOV_DEFAULT_LAMBDA if tikhonov_lambda is None else tikhonov_lambda}
        else:
            options = {"lam": qsm_inversion.TV_DEFAULT_LAMBDA if tv_lambda is None else tv_lambda}
        for option, value in options.items():
            if not (np.isfinite(value) and value > 0):
                raise InputError(f"--estimator {name}: {option} must be a positive number, got {value}")
        function = getattr(qsm_inversion, name)
        field_t = torch.as_tensor(field_map, dtype=torch.float32, device=device)
        mask_t = torch.as_tensor(mask, device=device)
        chi = function(field_t, voxel_size=voxel_size, b0_dir=b0_dir, mask=mask_t, **options)
        chi = chi.detach().cpu().numpy().astype(np.float32)
        return chi, None, {"kind": "conventional", "name": name, "options": options,
                           "description": f"{name} dipole inversion (qmri_labels.fitting.qsm_inversion.{name})"}
    if name == "mle":
        raise InputError("--estimator mle is for diffusion data; QSM takes tkd, tikhonov or a network")

    try:
        bundle = find_bundle(name)
    except ValueError as exc:
        raise InputError(f"--{exc}") from None
    network = _load_qsm_network(bundle, QSMEstimator, device)
    notes = []
    try:
        trained_kind = check_input_kind(network.manifest_, input_kind, force=allow_input_mismatch)
    except ValueError as exc:
        raise InputError(f"--estimator {bundle}: {exc} (--allow-input-mismatch runs it anyway)") from None
    if trained_kind != input_kind:
        notes.append(f"input mismatch allowed: trained on {trained_kind!r} fields, given {input_kind!r}")
        logger.warning("qmri_labels.fit: warning: %s", notes[-1])
    trained_voxel = tuple(float(v) for v in network.voxel_size_)
    if not np.allclose(trained_voxel, voxel_size, rtol=0.05):
        # networks generalise poorly across resolutions (Oh et al. 2021): run, but say so
        notes.append(f"the network was trained at voxel size {trained_voxel} mm; these data have {voxel_size} mm")
        logger.warning("qmri_labels.fit: warning: %s", notes[-1])
    if uncertainty and not network.reports_sd:
        raise InputError(f"--uncertainty: the QSM network {bundle} is a single U-Net and reports no standard "
                         f"deviation; SD maps of chi need {SD_ESTIMATORS}")
    try:
        result = network.predict(field_map * mask, mask=mask, voxel_size=voxel_size, b0_dir=b0_dir,
                                 patch_size=patch_size, device=str(device), return_sd=bool(uncertainty),
                                 sd_kind=sd_kind)
    except SDNotCalibrated as exc:
        raise InputError(f"--uncertainty: {exc}") from None
    except ValueError as exc:
        raise InputError(f"--estimator {bundle}: {exc}") from None
    chi, sd = result if uncertainty else (result, None)
    return np.asarray(chi, dtype=np.float32), None if sd is None else np.asarray(sd, dtype=np.float32), {
        "kind": "network", "name": name, "bundle": str(bundle), "bundle_sha256": sha256_file(bundle / "manifest.json")
        if (bundle / "manifest.json").exists() else None, "n_members": network.n_fitted_members,
        "trained_voxel_size_mm": list(trained_voxel), "trained_input_kind": trained_kind, "given_input_kind": input_kind,
        "patch_size": patch_size, "notes": notes}


def _load_qsm_network(bundle: Path, estimator_class, device):
    try:
        manifest = read_manifest(bundle)
    except ValueError:
        manifest = {}
    kind = manifest.get("kind")
    if kind is not None and manifest_kind(manifest) != estimator_kind(estimator_class):
        raise InputError(f"--estimator {bundle}: is a model bundle of kind {kind!r}, not a QSM U-Net")
    try:
        return estimator_class.load(bundle, device=str(device))
    except (ValueError, KeyError, TypeError, OSError, RuntimeError, json.JSONDecodeError) as exc:
        raise InputError(f"--estimator {bundle}: corrupt or tampered model bundle ({exc})") from None
