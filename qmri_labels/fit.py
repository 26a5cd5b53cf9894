"""Parameter maps from a user's own scans: ``python -m qmri_labels.fit``.

Diffusion (IVIM or mono-exponential)::

    python -m qmri_labels.fit --dwi sub-01_dwi.nii.gz --bval sub-01_dwi.bval \\
        [--bvec sub-01_dwi.bvec] [--mask brain.nii.gz] [--model ivim|monoexp] \\
        [--estimator mle|NAME|PATH] [--sigma VALUE|auto] [--device cpu|cuda] --out maps/

QSM (dipole inversion of a local field map in ppm)::

    python -m qmri_labels.fit --model qsm --field sub-01_field.nii.gz --mask brain.nii.gz \\
        [--estimator tkd|tikhonov|NAME|PATH] [--b0-dir 0,0,1] [--mat] --out chi/

What it writes (into ``--out``, which appears only when everything succeeded):

* ``<prefix>_<param>.nii.gz``: one float32 map per model parameter (IVIM: ``S0``, ``f``,
  ``D``, ``Dstar``; mono-exponential: ``S0``, ``D``; QSM: ``chi``) with the input's affine
  and header geometry. Units: S0 in the input's intensity units, f a fraction, D and D* in
  mm^2/s, chi in ppm. Voxels outside the mask are 0; voxels inside the mask that could not be
  estimated are NaN.
* ``<prefix>_status.nii.gz`` (diffusion): uint8 code per voxel, see :data:`STATUS_CODES`.
* ``manifest.json``: the command, the inputs' SHA-256 checksums, shapes and affines, the
  estimator (and, for a network, its bundle), the noise level and how it was obtained,
  package versions, device, timings, and how many voxels were fitted or skipped and why.
* ``<prefix>_qc.png``: the middle slice of every map.
* ``<prefix>_chi.mat`` with ``--mat`` (QSM).

Signals are normalised per voxel by the mean of the voxel's b = 0 samples before fitting (the
fitters and the shipped networks work on ``S(b) / S(0)``), and S0 is scaled back afterwards.

Noise level (``--sigma``)
-------------------------
``VALUE``: the noise standard deviation in the image's intensity units (one value for the
whole image). ``auto``: estimated from the data (:func:`estimate_sigma`):

* with two or more b = 0 volumes, from the spread of the repeated b = 0 samples of each voxel:
  ``sigma^2 = median_v(s_v^2) * (K - 1) / median(chi^2_{K-1})``, where ``s_v^2`` is the
  unbiased variance of voxel v's K b = 0 samples; the median makes it robust to outliers such
  as motion, the factor makes it unbiased for Gaussian noise. Only voxels whose mean b = 0
  signal exceeds 3 sigma are used (iterated twice), where Rician noise is close to Gaussian;
* with one b = 0 volume and a mask, from the background (outside the mask, non-zero voxels of
  the b = 0 volume), whose magnitude is Rayleigh distributed: ``sigma = median / sqrt(2 ln 2)``.

Without ``--sigma`` the Rician fit uses ``auto``; the Gaussian (least-squares) fit does not
depend on sigma and estimates it per voxel from the residual. Networks do not use sigma.

Bad input ends the command with a message on stderr and exit status 1, and leaves nothing
behind: the output is assembled in a hidden temporary folder next to ``--out`` and renamed
when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qmri_labels.data.io import (
    NiftiVolume,
    check_same_grid,
    load_nifti,
    nifti_stem,
    read_bvals,
    read_bvecs,
    save_nifti,
    sha256_file,
    write_json,
    write_mat,
)

#: codes of ``<prefix>_status.nii.gz``
STATUS_CODES = {
    0: "outside the mask",
    1: "fitted with every measurement",
    2: "fitted without its NaN/Inf or negative samples",
    3: "skipped: no usable b = 0 sample",
    4: "skipped: b = 0 signal is zero",
    5: "skipped: too few usable measurements for the model",
    6: "skipped: a network needs every measurement",
    7: "skipped: the estimate is invalid (fit failed or NaN)",
}
_SKIP_KEYS = {
    3: "no_usable_b0_sample",
    4: "zero_b0_signal",
    5: "too_few_usable_measurements",
    6: "missing_measurements_for_network",
    7: "invalid_estimate",
}

DWI_MODELS = ("ivim", "monoexp")
QSM_ESTIMATORS = ("tkd", "tikhonov")


class InputError(ValueError):
    """Bad input: reported on stderr without a traceback."""


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qmri_labels.fit",
        description="Parameter maps (IVIM, mono-exponential, QSM) from NIfTI data with the MLE fitter, "
                    "a conventional QSM inversion or a trained network.",
    )
    dwi = parser.add_argument_group("diffusion")
    dwi.add_argument("--dwi", type=Path, help="4-D diffusion-weighted NIfTI (x, y, z, volumes)")
    dwi.add_argument("--bval", type=Path, help="b-values in s/mm^2 (FSL/BIDS .bval: one row)")
    dwi.add_argument("--bvec", type=Path, help="gradient directions (.bvec, 3 rows); checked, not used by "
                                               "isotropic models")
    dwi.add_argument("--sigma", default=None,
                     help="noise SD in image units, or 'auto' to estimate it from the data (default: auto "
                          "for the Rician fit; the Gaussian fit does not need it)")
    dwi.add_argument("--noise", choices=("rician", "gaussian"), default="rician",
                     help="noise model of the MLE fit (default rician: magnitude images)")
    dwi.add_argument("--b0-threshold", type=float, default=0.0,
                     help="b-values <= this count as b = 0 (s/mm^2, default 0)")
    qsm = parser.add_argument_group("QSM")
    qsm.add_argument("--field", type=Path, help="3-D local field map in ppm (background field removed)")
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
    parser.add_argument("--mask", type=Path, help="3-D mask on the same grid (non-zero = fit); required for QSM")
    parser.add_argument("--model", choices=DWI_MODELS + ("qsm",), default=None,
                        help="signal model (default: ivim, or the network's model; qsm with --field)")
    parser.add_argument("--estimator", default=None,
                        help="diffusion: 'mle' (default), the name of a network in models/, or a bundle "
                             "folder; QSM: 'tkd' (default), 'tikhonov', a network name or folder")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--chunk-size", type=int, default=20000,
                        help="voxels estimated at a time (bounds memory; default 20000)")
    parser.add_argument("--prefix", default=None,
                        help="file name prefix of the maps (default: the input's name without "
                             "'.nii.gz' and a trailing '_dwi' or '_field')")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 success, 1 bad input, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = ["python", "-m", "qmri_labels.fit"] + list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    staging = None
    try:
        mode = _check_mode(args)
        device = _check_device(args.device)
        if args.chunk_size < 1:
            raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
        _check_out_holds_no_input(args)
        staging = _Staging(args.out, args.overwrite)
        if mode == "dwi":
            manifest = run_dwi(args, staging.path, device)
        else:
            manifest = run_qsm(args, staging.path, device)
        manifest["command"] = command
        manifest["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        write_json(staging.path / "manifest.json", manifest)
        staging.commit()
    except (InputError, ValueError, OSError) as exc:
        if staging is not None:
            staging.discard()
        print(f"qmri_labels.fit: error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        if staging is not None:
            staging.discard()
        raise
    if not args.quiet:
        _print_summary(manifest, args.out)
    return 0


def _check_mode(args) -> str:
    if args.field is not None and args.dwi is not None:
        raise InputError("give either --dwi (diffusion) or --field (QSM), not both")
    if args.field is not None or args.model == "qsm":
        if args.field is None:
            raise InputError("--model qsm needs --field FIELD.nii.gz")
        if args.model not in (None, "qsm"):
            raise InputError(f"--field is a QSM input, but --model is {args.model!r}")
        if args.mask is None:
            raise InputError("QSM needs --mask MASK.nii.gz (the region where the local field is defined)")
        for flag, value in (("--bval", args.bval), ("--bvec", args.bvec), ("--sigma", args.sigma)):
            if value is not None:
                raise InputError(f"{flag} is a diffusion option; it does not apply to --model qsm")
        return "qsm"
    if args.dwi is None:
        raise InputError("nothing to fit: give --dwi DWI.nii.gz --bval DWI.bval (diffusion) or "
                         "--field FIELD.nii.gz --mask MASK.nii.gz --model qsm")
    if args.bval is None:
        raise InputError("--dwi needs --bval (the b-values, one per volume)")
    return "dwi"


def _check_out_holds_no_input(args) -> None:
    """--overwrite replaces the whole output folder: refuse when an input lives inside it."""
    out = Path(args.out).resolve()
    if not out.is_dir():
        return
    candidates = [args.dwi, args.bval, args.bvec, args.mask, args.field]
    if args.estimator and Path(args.estimator).exists():
        candidates.append(Path(args.estimator))
    for path in candidates:
        if path is not None and Path(path).resolve().is_relative_to(out):
            raise InputError(f"--out {args.out}: holds the input {path}; writing the results there would "
                             "replace it. Choose another output folder")


def _check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"--device {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: use cpu or cuda")
    return device


class _Staging:
    """The output folder under construction: a hidden temporary folder next to ``out``.

    ``commit`` renames it to ``out`` (replacing an existing folder only with ``overwrite``);
    ``discard`` removes it. So a failed run leaves nothing, and a reader never sees a half
    written result under ``out``.
    """

    def __init__(self, out: Path, overwrite: bool):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        if self.out.exists() or self.out.is_symlink():
            if not self.out.is_dir():
                raise InputError(f"--out {out}: exists and is not a folder")
            if not overwrite:
                raise InputError(f"--out {out}: the output folder exists; choose another or pass --overwrite")
        ancestor = self.out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise InputError(f"--out {out}: cannot be created, {ancestor} is not a folder")
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=ancestor))
        except OSError as exc:
            raise InputError(f"--out {out}: cannot write in {ancestor} ({exc.strerror or exc})") from None

    def commit(self) -> None:
        # mkdtemp/mkstemp create private (0700/0600) entries; give the results the usual
        # permissions of the user's umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)
        for entry in self.path.iterdir():
            if entry.is_file():
                os.chmod(entry, 0o666 & ~umask)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
                os.replace(self.out, old / "previous")
                try:
                    os.replace(self.path, self.out)
                except OSError:
                    os.replace(old / "previous", self.out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.path, self.out)
        except OSError as exc:
            raise InputError(f"--out {self.out}: cannot be written ({exc.strerror or exc})") from None

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _print_summary(manifest: dict, out: Path) -> None:
    counts = manifest.get("voxels", {})
    print(f"wrote {len(manifest['outputs'])} files to {out}")
    if counts:
        skipped = ", ".join(f"{k}: {v}" for k, v in counts.get("skipped", {}).items() if v) or "none"
        print(f"voxels in mask: {counts.get('in_mask')}, estimated: {counts.get('estimated')}, skipped: {skipped}")
    print(f"time: {manifest['timings_s']['total']:.1f} s")


# ----------------------------------------------------------------------------- diffusion

def run_dwi(args, out_dir: Path, device) -> dict:
    """Fit a diffusion model voxel by voxel; writes the maps into ``out_dir`` and returns the manifest."""
    from qmri_labels.physics import get_model

    timings = {}
    t0 = time.perf_counter()
    dwi = load_nifti(args.dwi)
    if dwi.ndim == 3:
        raise InputError(f"{args.dwi}: is a 3-D image (shape {dwi.shape}); --dwi needs a 4-D image "
                         "(x, y, z, one volume per b-value)")
    if dwi.ndim != 4:
        raise InputError(f"{args.dwi}: has {dwi.ndim} dimensions (shape {dwi.shape}); --dwi needs a 4-D image")
    n_volumes = dwi.shape[3]
    bvals = read_bvals(args.bval)
    if bvals.size != n_volumes:
        raise InputError(f"{args.bval}: {bvals.size} b-values, but {args.dwi.name} has {n_volumes} volumes")
    bvecs_note = None
    if args.bvec is not None:
        read_bvecs(args.bvec, n_volumes)
        bvecs_note = "read and checked; not used (isotropic model)"
    b0 = bvals <= args.b0_threshold
    if not b0.any():
        raise InputError(f"{args.bval}: no b = 0 volume (smallest b-value {bvals.min():g} s/mm^2); the maps are "
                         "normalised by the b = 0 signal. If your b = 0 volumes are stored with a small "
                         "b-value, raise --b0-threshold")
    mask_volume, mask = _read_mask(args.mask, dwi)

    estimator = _resolve_dwi_estimator(args, bvals)
    model = get_model(estimator.model_name)
    n_distinct = np.unique(bvals).size
    if n_distinct < model.n_params:
        raise InputError(f"{args.bval}: {n_distinct} distinct b-values; the {model.name} model has "
                         f"{model.n_params} parameters {model.param_names} and needs at least that many")

    sigma_info = _resolve_sigma(args.sigma, dwi, bvals, b0, mask, mask_volume is not None, estimator)
    timings["read_inputs"] = round(time.perf_counter() - t0, 3)

    t1 = time.perf_counter()
    maps, status, sample_counts = fit_volume(
        dwi, bvals, mask, estimator, b0=b0, sigma=sigma_info.get("value"), chunk_size=args.chunk_size,
        device=device, progress=not args.quiet,
    )
    timings["fit"] = round(time.perf_counter() - t1, 3)

    t2 = time.perf_counter()
    prefix = _prefix(args.prefix, args.dwi, ("_dwi",))
    outputs = {}
    for i, name in enumerate(model.param_names):
        file_name = f"{prefix}_{name}.nii.gz"
        unit = model.units[name] if name != "S0" else "input intensity units"
        save_nifti(out_dir / file_name, maps[..., i], dwi.affine, dwi.header,
                   description=f"qmri_labels {model.name} {name} [{unit}]")
        outputs[file_name] = f"{name} map ({unit}), float32; 0 outside the mask, NaN where not estimated"
    status_name = f"{prefix}_status.nii.gz"
    save_nifti(out_dir / status_name, status, dwi.affine, dwi.header, description="qmri_labels fit status",
               dtype=np.uint8)
    outputs[status_name] = "uint8 status code per voxel: " + "; ".join(f"{k} {v}" for k, v in STATUS_CODES.items())
    qc_name = f"{prefix}_qc.png"
    labels = [f"{n} [{model.units[n]}]" if n != "S0" else "S0" for n in model.param_names]
    write_qc_figure(out_dir / qc_name, {label: maps[..., i] for i, label in enumerate(labels)},
                    title=f"{args.dwi.name}: {model.name} by {estimator.description}", voxel_size=dwi.voxel_size)
    outputs[qc_name] = "QC figure: the middle axial slice of every map"
    outputs["manifest.json"] = "this file"
    timings["write"] = round(time.perf_counter() - t2, 3)

    in_mask = int(mask.sum())
    skipped = {key: int((status == code).sum()) for code, key in _SKIP_KEYS.items()}
    manifest = {
        "tool": "qmri_labels.fit",
        "kind": "diffusion",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {
            "dwi": _describe_file(dwi),
            "bval": {"path": str(args.bval), "sha256": sha256_file(args.bval), "values": bvals.tolist()},
            "bvec": None if args.bvec is None else {"path": str(args.bvec), "sha256": sha256_file(args.bvec),
                                                     "note": bvecs_note},
            "mask": None if mask_volume is None else _describe_file(mask_volume),
        },
        "model": {"name": model.name, "parameters": list(model.param_names), "units": model.units},
        "b0_threshold": args.b0_threshold,
        "estimator": estimator.manifest(),
        "noise": {"model": args.noise if estimator.kind == "mle" else None, **sigma_info},
        "normalisation": "signals divided by the mean of each voxel's b = 0 samples; S0 scaled back",
        "voxels": {
            "total": int(np.prod(dwi.shape[:3])),
            "in_mask": in_mask,
            "estimated": int(((status == 1) | (status == 2)).sum()),
            "estimated_without_some_samples": int((status == 2).sum()),
            "skipped": skipped,
            "samples_nonfinite": sample_counts["nonfinite"],
            "samples_negative": sample_counts["negative"],
        },
        "status_codes": {str(k): v for k, v in STATUS_CODES.items()},
        "device": _device_name(device),
        "chunk_size": args.chunk_size,
        "versions": _versions(),
        "timings_s": timings,
        "outputs": outputs,
    }
    return manifest


def _read_mask(path: Path | None, reference: NiftiVolume) -> tuple[NiftiVolume | None, np.ndarray]:
    if path is None:
        return None, np.ones(reference.shape[:3], dtype=bool)
    volume = load_nifti(path)
    if volume.ndim == 4 and volume.shape[3] == 1:
        pass
    elif volume.ndim != 3:
        raise InputError(f"{path}: the mask must be 3-D, got shape {volume.shape}")
    check_same_grid(reference, volume)
    values = volume.read().reshape(volume.shape[:3])
    mask = np.isfinite(values) & (values != 0)
    if not mask.any():
        raise InputError(f"{path}: the mask is empty (no non-zero voxel)")
    return volume, mask


def _prefix(given: str | None, path: Path, strip: tuple[str, ...]) -> str:
    if given is not None:
        if not given or "/" in given or given.startswith("."):
            raise InputError(f"--prefix {given!r}: must be a plain file-name prefix")
        return given
    stem = nifti_stem(path)
    for suffix in strip:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
    return stem or "qmri"


def _describe_file(volume: NiftiVolume) -> dict:
    return {
        "path": str(volume.path),
        "sha256": sha256_file(volume.path),
        "shape": list(volume.shape),
        "voxel_size_mm": list(volume.voxel_size),
        "affine": volume.affine.round(6).tolist(),
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _versions() -> dict:
    import nibabel
    import scipy
    import torch

    import qmri_labels

    return {
        "qmri_labels": qmri_labels.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "nibabel": nibabel.__version__,
        "platform": platform.platform(),
    }


# -- noise level

def _resolve_sigma(value, dwi, bvals, b0, mask, has_mask, estimator) -> dict:
    if estimator.kind == "network":
        return {"source": "not used (network estimator)", "given": value, "value": None}
    if value is None and estimator.noise == "gaussian":
        return {"source": "not needed by the Gaussian (least-squares) fit; the fitter estimates it per voxel "
                          "from the residual", "value": None}
    if value is None or str(value).lower() == "auto":
        estimate = estimate_sigma(dwi, b0, mask if has_mask else None)
        return {"source": "auto" if value is not None else "auto (default for the Rician fit)", **estimate}
    try:
        sigma = float(value)
    except ValueError:
        raise InputError(f"--sigma {value!r}: give a positive number (image intensity units) or 'auto'") from None
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"--sigma {value!r}: must be finite and > 0")
    return {"source": "given", "value": sigma}


def estimate_sigma(dwi: NiftiVolume, b0: np.ndarray, mask: np.ndarray | None) -> dict:
    """Noise standard deviation of a diffusion series, in the image's intensity units.

    Parameters
    ----------
    dwi : NiftiVolume, 4-D
    b0 : bool array (n_volumes,), the b = 0 volumes
    mask : bool array (x, y, z) or None

    Returns
    -------
    dict with ``value`` (sigma), ``method`` (a sentence) and ``n_voxels`` (how many voxels
    the estimate rests on).

    Notes
    -----
    *Two or more b = 0 volumes* (K of them): for each voxel the unbiased variance ``s_v^2`` of
    its K b = 0 samples; for Gaussian noise ``(K - 1) s_v^2 / sigma^2`` follows chi^2 with
    K - 1 degrees of freedom, so ``sigma^2 = median(s_v^2) (K - 1) / median(chi^2_{K-1})``.
    The median ignores voxels hit by motion or artefacts. Magnitude (Rician) noise is close to
    Gaussian where the signal exceeds about 3 sigma, so after a first estimate over the mask
    (or over every voxel without a mask) the estimate is repeated twice over the voxels whose
    mean b = 0 signal exceeds 3 sigma.

    *One b = 0 volume and a mask*: the background (outside the mask, non-zero, finite voxels
    of the b = 0 volume) holds pure noise, whose magnitude is Rayleigh distributed with median
    ``sigma * sqrt(2 ln 2)``. Ghosts or signal outside the mask make this an overestimate.
    """
    from scipy.stats import chi2

    idx = np.flatnonzero(b0)
    raw, slope, inter = dwi._raw()
    try:
        stack = np.asarray(raw[..., idx], dtype=np.float32) * np.float32(slope) + np.float32(inter)
    except Exception as exc:
        raise InputError(f"{dwi.path}: cannot read the b = 0 volumes ({type(exc).__name__}: {exc})") from None
    finite = np.all(np.isfinite(stack), axis=-1) & np.all(stack >= 0, axis=-1)
    if idx.size >= 2:
        k = idx.size
        variance = stack.var(axis=-1, ddof=1)
        mean = stack.mean(axis=-1)
        correction = (k - 1) / chi2.median(k - 1)
        candidates = finite & (mask if mask is not None else (mean > 0))
        if candidates.sum() < 10:
            raise InputError("--sigma auto: fewer than 10 voxels with finite b = 0 samples; give --sigma VALUE")
        sigma = math.sqrt(float(np.median(variance[candidates])) * correction)
        used = candidates
        for _ in range(2):
            bright = candidates & (mean > 3 * sigma)
            if bright.sum() < 10:
                break
            used = bright
            sigma = math.sqrt(float(np.median(variance[used])) * correction)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise InputError("--sigma auto: the repeated b = 0 volumes are identical, so the noise level cannot "
                             "be estimated from them; give --sigma VALUE")
        return {"value": sigma, "n_voxels": int(used.sum()),
                "method": f"spread of {k} repeated b = 0 volumes: sqrt(median voxel variance x (K-1) / "
                          "median chi2(K-1)) over voxels with mean b = 0 signal > 3 sigma"}
    if mask is None:
        raise InputError("--sigma auto needs two or more b = 0 volumes, or a --mask so that the background of "
                         "the single b = 0 volume can be used; otherwise give --sigma VALUE")
    background = stack[..., 0][finite & ~mask & (stack[..., 0] > 0)]
    if background.size < 10:
        raise InputError("--sigma auto: the data have one b = 0 volume and fewer than 10 non-zero background "
                         "voxels outside the mask; give --sigma VALUE")
    sigma = float(np.median(background)) / math.sqrt(2 * math.log(2))
    return {"value": sigma, "n_voxels": int(background.size),
            "method": "background of the single b = 0 volume (outside the mask, non-zero): Rayleigh median / "
                      "sqrt(2 ln 2)"}


# -- estimators

@dataclass
class _DwiEstimator:
    """What the voxel loop needs from an estimator, MLE or network."""

    kind: str  # "mle" or "network"
    model_name: str
    description: str
    noise: str = "rician"
    network: object = None
    bundle: Path | None = None
    order: np.ndarray | None = None  # data columns in the network's protocol order
    info: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        out = {"kind": self.kind, "description": self.description, **self.info}
        if self.bundle is not None:
            out["bundle"] = str(self.bundle)
        return out


def _resolve_dwi_estimator(args, bvals: np.ndarray) -> _DwiEstimator:
    name = args.estimator or "mle"
    if name == "mle":
        model = args.model or "ivim"
        from qmri_labels.fitting import fit_mle  # noqa: F401  (fail early if the fitter is missing)

        return _DwiEstimator("mle", model, f"MLE ({args.noise} likelihood)", noise=args.noise,
                             info={"name": "mle", "noise": args.noise})
    if name in QSM_ESTIMATORS:
        raise InputError(f"--estimator {name} is a QSM inversion; diffusion data take 'mle' or a network")
    bundle = _find_bundle(name)
    network = _load_network(bundle)
    net_model = getattr(network, "model_name", None)
    if args.model is not None and net_model is not None and net_model != args.model:
        raise InputError(f"network {bundle} fits the {net_model} model, but --model is {args.model}")
    protocol = np.asarray(network.protocol, dtype=np.float64).ravel()
    order = _match_protocol(protocol, bvals, bundle, args.bval)
    return _DwiEstimator("network", net_model or args.model or "ivim", f"network {bundle.name}",
                         network=network, bundle=bundle, order=order,
                         info={"name": name, "bundle_sha256": _bundle_checksum(bundle),
                               "protocol": protocol.tolist()})


def _find_bundle(name: str) -> Path:
    from qmri_labels.paths import models_dir

    candidate = Path(name)
    if candidate.exists():
        if not candidate.is_dir():
            raise InputError(f"--estimator {name}: a network bundle is a folder (weights + manifest.json)")
        return candidate
    if "/" not in name and os.sep not in name:
        shipped = models_dir() / name
        if shipped.is_dir():
            return shipped
        available = sorted(p.name for p in models_dir().glob("*") if (p / "manifest.json").exists()) \
            if models_dir().is_dir() else []
        raise InputError(f"--estimator {name}: not 'mle', not a folder, and not a network in {models_dir()} "
                         f"(available: {', '.join(available) or 'none'})")
    raise InputError(f"--estimator {name}: folder not found")


def _bundle_kind(bundle: Path) -> str | None:
    """The ``kind`` in a bundle's manifest (None when the manifest is unreadable: the loader then
    reports the damage)."""
    from qmri_labels.bundle import read_manifest

    try:
        return read_manifest(bundle).get("kind")
    except ValueError:
        return None


def _load_bundle(bundle: Path, loader, kind: str, what: str, **options):
    found = _bundle_kind(bundle)
    if found is not None and found != kind:
        raise InputError(f"--estimator {bundle}: is a model bundle of kind {found!r}, not a {what}")
    try:
        return loader(bundle, **options)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError, json.JSONDecodeError) as exc:
        raise InputError(f"--estimator {bundle}: corrupt or tampered model bundle ({exc})") from None


def _load_network(bundle: Path):
    try:
        from qmri_labels.estimators import ESTIMATOR_KIND, NetworkEstimator
    except ImportError as exc:
        raise InputError(f"network estimators are not available in this installation ({exc})") from None
    return _load_bundle(bundle, NetworkEstimator.load, ESTIMATOR_KIND, "voxel-wise (diffusion) network")


def _bundle_checksum(bundle: Path) -> str | None:
    manifest = bundle / "manifest.json"
    return sha256_file(manifest) if manifest.exists() else None


def _match_protocol(protocol: np.ndarray, bvals: np.ndarray, bundle: Path, bval_path: Path) -> np.ndarray:
    """Column order that puts the data's volumes into the network's protocol order."""
    def fmt(b):
        return "[" + ", ".join(f"{v:g}" for v in b) + "]"

    mismatch = InputError(
        f"network {bundle.name} was trained for the protocol b = {fmt(protocol)} s/mm^2 ({protocol.size} values); "
        f"{bval_path.name} has b = {fmt(bvals)} ({bvals.size} values). Use --estimator mle, or train a network "
        f"for this protocol (see docs/guide.md)")
    if protocol.size != bvals.size:
        raise mismatch
    tol = 1e-3 * max(1.0, float(np.abs(protocol).max()))
    if np.all(np.abs(protocol - bvals) <= tol):
        return np.arange(bvals.size)
    order_data = np.argsort(bvals, kind="stable")
    order_net = np.argsort(protocol, kind="stable")
    if np.all(np.abs(np.sort(protocol) - bvals[order_data]) <= tol):
        order = np.empty_like(order_net)
        order[order_net] = order_data
        return order
    raise mismatch


# -- the voxel loop

def fit_volume(dwi: NiftiVolume, bvals: np.ndarray, mask: np.ndarray, estimator: _DwiEstimator, *,
               b0: np.ndarray, sigma: float | None, chunk_size: int, device, progress: bool):
    """Estimate the parameters of every voxel in ``mask``, ``chunk_size`` voxels at a time.

    Returns
    -------
    maps : float32 (x, y, z, P); 0 outside the mask, NaN where not estimated
    status : uint8 (x, y, z), codes of :data:`STATUS_CODES`
    sample_counts : dict with the numbers of NaN/Inf and negative samples in the mask
    """
    from tqdm.auto import tqdm

    from qmri_labels.physics import get_model

    model = get_model(estimator.model_name)
    n_params = model.n_params
    s0_index = model.index("S0") if "S0" in model.param_names else None
    maps = np.zeros(mask.shape + (n_params,), dtype=np.float32)
    status = np.zeros(mask.shape, dtype=np.uint8)
    coords = np.nonzero(mask)
    n_voxels = coords[0].size
    counts = {"nonfinite": 0, "negative": 0}
    bar = tqdm(total=n_voxels, unit="voxel", desc=f"{model.name} {estimator.kind}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for start in range(0, n_voxels, chunk_size):
        chunk = tuple(c[start:start + chunk_size] for c in coords)
        signals = dwi.voxels(chunk)
        params, codes = _fit_chunk(signals, bvals, b0, estimator, model, s0_index, sigma, device, counts)
        maps[chunk] = params
        status[chunk] = codes
        bar.update(signals.shape[0])
    bar.close()
    return maps, status, counts


def _fit_chunk(signals, bvals, b0, estimator, model, s0_index, sigma, device, counts):
    n, _ = signals.shape
    nonfinite = ~np.isfinite(signals)
    negative = np.zeros_like(nonfinite)
    np.less(signals, 0, out=negative, where=~nonfinite)
    counts["nonfinite"] += int(nonfinite.sum())
    counts["negative"] += int(negative.sum())
    # a magnitude (Rician) sample cannot be negative; a real-valued (Gaussian) one can
    unusable = nonfinite | (negative if estimator.noise == "rician" else False)
    clean = np.where(unusable, np.float32(0), signals)

    params = np.full((n, model.n_params), np.nan, dtype=np.float32)
    codes = np.zeros(n, dtype=np.uint8)
    usable_b0 = (~unusable[:, b0]).sum(-1)
    # the reference level of a voxel is the mean of its usable b = 0 samples
    reference = np.where(usable_b0 > 0, clean[:, b0].sum(-1) / np.maximum(usable_b0, 1), np.nan)
    codes[usable_b0 == 0] = 3
    codes[(usable_b0 > 0) & ~(reference > 0)] = 4
    todo = codes == 0

    # voxels with the same pattern of unusable samples are fitted together on the usable b-values;
    # the complete voxels (usually nearly all) form one group without sorting them
    groups = []
    complete_rows = np.flatnonzero(todo & ~unusable.any(-1))
    if complete_rows.size:
        groups.append((complete_rows, np.zeros(unusable.shape[1], dtype=bool)))
    gap_rows = np.flatnonzero(todo & unusable.any(-1))
    if gap_rows.size:
        patterns, inverse = np.unique(unusable[gap_rows], axis=0, return_inverse=True)
        inverse = inverse.ravel()
        groups += [(gap_rows[inverse == p], pattern) for p, pattern in enumerate(patterns)]
    for rows, pattern in groups:
        keep = ~pattern
        complete = bool(keep.all())
        if estimator.kind == "network" and not complete:
            codes[rows] = 6
            continue
        if np.unique(bvals[keep]).size < model.n_params or not (keep & b0).any():
            codes[rows] = 5
            continue
        normalised = clean[np.ix_(rows, np.flatnonzero(keep))] / reference[rows, None]
        normalised = normalised.astype(np.float32)
        voxel_sigma = None if sigma is None else (sigma / reference[rows]).astype(np.float32)
        estimate, valid = _estimate(estimator, normalised, bvals[keep], voxel_sigma, device)
        if s0_index is not None:
            estimate[:, s0_index] *= reference[rows].astype(np.float32)
        valid &= np.all(np.isfinite(estimate), axis=-1)
        estimate[~valid] = np.nan
        params[rows] = estimate
        codes[rows] = np.where(valid, 1 if complete else 2, 7)
    return params, codes


def _estimate(estimator: _DwiEstimator, signals: np.ndarray, bvals: np.ndarray, sigma, device):
    """Parameters (n, P) float32 and validity flags of normalised signals."""
    if estimator.kind == "mle":
        from qmri_labels.fitting import fit_mle

        fit = fit_mle(signals, bvals, model=estimator.model_name, noise=estimator.noise, sigma=sigma,
                      device=device, progress=False)
        params = np.asarray(fit.params, dtype=np.float32).copy()
        valid = np.asarray(fit.valid, dtype=bool).copy()
        return params, valid
    ordered = signals[:, estimator.order]
    params = np.asarray(estimator.network.predict(ordered, device=str(device)), dtype=np.float32).copy()
    return params, np.ones(params.shape[0], dtype=bool)


# ----------------------------------------------------------------------------- QSM

def run_qsm(args, out_dir: Path, device) -> dict:
    """Dipole inversion of a local field map; writes chi (ppm) into ``out_dir``; returns the manifest."""
    timings = {}
    t0 = time.perf_counter()
    field_volume = load_nifti(args.field)
    if field_volume.ndim == 4 and field_volume.shape[3] == 1:
        pass
    elif field_volume.ndim != 3:
        raise InputError(f"{args.field}: the field map must be 3-D, got shape {field_volume.shape}")
    field_map = field_volume.read().reshape(field_volume.shape[:3])
    mask_volume, mask = _read_mask(args.mask, field_volume)
    nonfinite = mask & ~np.isfinite(field_map)
    n_nonfinite = int(nonfinite.sum())
    mask = mask & ~nonfinite
    if not mask.any():
        raise InputError(f"{args.field}: no finite field value inside the mask")
    field_map = np.where(mask, field_map, 0).astype(np.float32)
    voxel_size = field_volume.voxel_size
    if not all(v > 0 and math.isfinite(v) for v in voxel_size):
        raise InputError(f"{args.field}: voxel size {voxel_size} from the header is not positive")
    b0_dir, b0_source = _parse_b0_dir(args.b0_dir, field_volume.affine)
    timings["read_inputs"] = round(time.perf_counter() - t0, 3)

    t1 = time.perf_counter()
    name = args.estimator or "tkd"
    if name != "tkd" and args.tkd_threshold is not None:
        raise InputError("--tkd-threshold applies to --estimator tkd only")
    if name != "tikhonov" and args.tikhonov_lambda is not None:
        raise InputError("--tikhonov-lambda applies to --estimator tikhonov only")
    if name in QSM_ESTIMATORS and args.patch_size is not None:
        raise InputError("--patch-size applies to QSM networks only")
    chi, info = _invert_field(name, field_map, mask, voxel_size, b0_dir, device, tkd_threshold=args.tkd_threshold,
                              tikhonov_lambda=args.tikhonov_lambda, patch_size=args.patch_size)
    chi = np.where(mask, chi, 0).astype(np.float32)
    timings["inversion"] = round(time.perf_counter() - t1, 3)

    t2 = time.perf_counter()
    prefix = _prefix(args.prefix, args.field, ("_field", "_localfield", "_Chimap"))
    outputs = {}
    chi_name = f"{prefix}_chi.nii.gz"
    save_nifti(out_dir / chi_name, chi, field_volume.affine, field_volume.header,
               description=f"qmri_labels chi [ppm] {name}")
    outputs[chi_name] = "susceptibility chi (ppm), float32; 0 outside the mask"
    if args.mat:
        mat_name = f"{prefix}_chi.mat"
        write_mat(out_dir / mat_name, {"chi": chi, "mask": mask.astype(np.uint8), "voxel_size": np.array(voxel_size),
                                       "b0_dir": np.array(b0_dir), "affine": field_volume.affine})
        outputs[mat_name] = "MATLAB file: chi (ppm), mask, voxel_size (mm), b0_dir, affine"
    qc_name = f"{prefix}_qc.png"
    write_qc_figure(out_dir / qc_name, {"field (ppm)": field_map, "chi (ppm)": chi},
                    title=f"{args.field.name}: QSM by {name}", orthogonal=True, voxel_size=voxel_size)
    outputs[qc_name] = "QC figure: field and chi, three orthogonal middle slices"
    outputs["manifest.json"] = "this file"
    timings["write"] = round(time.perf_counter() - t2, 3)

    return {
        "tool": "qmri_labels.fit",
        "kind": "qsm",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"field": _describe_file(field_volume), "mask": _describe_file(mask_volume)},
        "model": {"name": "qsm", "parameters": ["chi"], "units": {"chi": "ppm"}},
        "b0_dir": list(b0_dir),
        "b0_dir_source": b0_source,
        "voxel_size_mm": list(voxel_size),
        "estimator": info,
        "voxels": {"total": int(np.prod(field_volume.shape[:3])), "in_mask": int(mask.sum()) + n_nonfinite,
                   "estimated": int(mask.sum()), "skipped": {"nonfinite_field": n_nonfinite}},
        "device": _device_name(device),
        "versions": _versions(),
        "timings_s": timings,
        "outputs": outputs,
    }


def _parse_b0_dir(text: str, affine: np.ndarray) -> tuple[tuple[float, float, float], str]:
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


def _invert_field(name, field_map, mask, voxel_size, b0_dir, device, tkd_threshold=None, tikhonov_lambda=None,
                  patch_size=None):
    """chi (ppm) inside ``mask`` and a description of the estimator for the manifest."""
    if name in QSM_ESTIMATORS:
        try:
            from qmri_labels.fitting import qsm_inversion
        except ImportError as exc:
            raise InputError(f"QSM inversions are not available in this installation ({exc})") from None
        import torch

        if name == "tkd":
            options = {"threshold": 0.19 if tkd_threshold is None else tkd_threshold}
        else:
            options = {"lam": qsm_inversion.TIKHONOV_DEFAULT_LAMBDA if tikhonov_lambda is None else tikhonov_lambda}
        function = getattr(qsm_inversion, name)
        field_t = torch.as_tensor(field_map, dtype=torch.float32, device=device)
        mask_t = torch.as_tensor(mask, device=device)
        chi = function(field_t, voxel_size=voxel_size, b0_dir=b0_dir, mask=mask_t, **options)
        chi = chi.detach().cpu().numpy().astype(np.float32)
        return chi, {"kind": "conventional", "name": name, "options": options,
                     "description": f"{name} dipole inversion (qmri_labels.fitting.qsm_inversion.{name})"}
    if name == "mle":
        raise InputError("--estimator mle is for diffusion data; QSM takes tkd, tikhonov or a network")
    bundle = _find_bundle(name)
    try:
        from qmri_labels.training.qsm import QSMEstimator
    except ImportError as exc:
        raise InputError(f"QSM networks are not available in this installation ({exc})") from None
    network = _load_bundle(bundle, QSMEstimator.load, "qsm_unet", "QSM U-Net", device=str(device))
    notes = []
    trained_voxel = tuple(float(v) for v in network.voxel_size_)
    if not np.allclose(trained_voxel, voxel_size, rtol=0.05):
        # networks generalise poorly across resolutions (Oh et al. 2021): run, but say so
        notes.append(f"the network was trained at voxel size {trained_voxel} mm; these data have {voxel_size} mm")
        print(f"qmri_labels.fit: warning: {notes[-1]}", file=sys.stderr)
    try:
        chi = network.predict(field_map * mask, mask=mask, voxel_size=voxel_size, b0_dir=b0_dir,
                              patch_size=patch_size, device=str(device))
    except ValueError as exc:
        raise InputError(f"--estimator {bundle}: {exc}") from None
    return np.asarray(chi, dtype=np.float32), {
        "kind": "network", "name": name, "bundle": str(bundle), "bundle_sha256": _bundle_checksum(bundle),
        "trained_voxel_size_mm": list(trained_voxel), "patch_size": patch_size, "notes": notes}


# ----------------------------------------------------------------------------- QC figure

def write_qc_figure(path: Path, maps: dict, title: str = "", orthogonal: bool = False,
                    voxel_size=(1.0, 1.0, 1.0)) -> Path:
    """PNG with the middle axial slice of each map (or three orthogonal slices), headless.

    Pixels are drawn with the voxels' aspect ratio; colour limits are the 1st and 99th
    percentiles of the finite, non-zero values.
    """
    import io as _io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qmri_labels.data.io import atomic_write_bytes

    names = list(maps)
    rows = 3 if orthogonal else 1
    fig = Figure(figsize=(3.0 * len(names), 2.9 * rows + 0.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, len(names), squeeze=False))
    for j, name in enumerate(names):
        volume = np.asarray(maps[name], dtype=np.float32)
        finite = volume[np.isfinite(volume) & (volume != 0)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1.0
        cx, cy, cz = (s // 2 for s in volume.shape[:3])
        vx, vy, vz = (float(v) for v in voxel_size)
        slices = [(volume[:, :, cz], vy / vx)]
        if orthogonal:
            slices += [(volume[:, cy, :], vz / vx), (volume[cx, :, :], vz / vy)]
        for i, (section, aspect) in enumerate(slices):
            ax = axes[i, j]
            image = ax.imshow(section.T, origin="lower", cmap="gray" if name.lower().startswith(("s0", "field"))
                              else "viridis", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


if __name__ == "__main__":
    sys.exit(main())
