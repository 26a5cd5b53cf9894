"""Input checks and manifest pieces shared by the fit command's diffusion and QSM parts."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from qmri_labels.data.io import NiftiVolume, check_same_grid, load_nifti, nifti_stem, sha256_file
from qmri_labels.fileio import write_json
from qmri_labels.maps.cohort import CHECKSUM_KEY, output_checksums
from qmri_labels.provenance import device_info, package_versions


class InputError(ValueError):
    """Bad input: reported on stderr without a traceback."""


def threads_argument(text: str):
    """``--threads``: a positive integer or ``auto``."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a positive integer or 'auto', got {text!r}")
    return value


def add_threads_argument(parser, what: str) -> None:
    parser.add_argument("--threads", type=threads_argument, default="auto", metavar="N|auto",
                        help=f"CPU threads for {what} (default auto: the cores that other processes leave free "
                             "now, so that a busy node is not oversubscribed; the number used is in the manifest)")


def threads_record(args) -> dict:
    """The manifest's ``threads`` entry: what was asked and what was used."""
    return {"requested": args.threads, "used": args.threads_used}


def check_device(name: str):
    import torch  # here, so that parsing the command line (--help) does not import torch

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


def read_mask(path: Path | None, reference: NiftiVolume) -> tuple[NiftiVolume | None, np.ndarray]:
    """The mask volume and its boolean array on ``reference``'s grid (every voxel without a path)."""
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


def output_prefix(given: str | None, path: Path, strip: tuple[str, ...]) -> str:
    """``--prefix`` or the input's name without ``.nii(.gz)`` and a trailing suffix like ``_dwi``."""
    if given is not None:
        if not given or "/" in given or given.startswith("."):
            raise InputError(f"--prefix {given!r}: must be a plain file-name prefix")
        return given
    stem = nifti_stem(path)
    for suffix in strip:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
    return stem or "qmri"


def describe_file(volume: NiftiVolume) -> dict:
    return {
        "path": str(volume.path),
        "sha256": sha256_file(volume.path),
        "shape": list(volume.shape),
        "voxel_size_mm": list(volume.voxel_size),
        "affine": volume.affine.round(6).tolist(),
    }


def environment(device) -> dict:
    """Device, determinism flags and package versions for a manifest (one definition: qmri_labels.provenance)."""
    return {"device": device_info(device), "versions": package_versions(extra=("scipy", "nibabel"))}


def check_out_holds_no_input(out: Path, inputs) -> None:
    """--overwrite replaces the whole output folder: refuse when an input lives inside it."""
    out = Path(out).resolve()
    if not out.is_dir():
        return
    for path in inputs:
        if path is not None and Path(path).exists() and Path(path).resolve().is_relative_to(out):
            raise InputError(f"--out {out}: holds the input {path}; writing the results there would "
                             "replace it. Choose another output folder")


def positive_voxel_size(volume: NiftiVolume, what: Path) -> tuple[float, float, float]:
    voxel_size = volume.voxel_size
    if not all(v > 0 and math.isfinite(v) for v in voxel_size):
        raise InputError(f"{what}: voxel size {voxel_size} from the header is not positive")
    return voxel_size


def write_manifest(folder: Path, manifest: dict) -> Path:
    """``manifest.json`` with the SHA-256 of every other output listed in ``manifest["outputs"]``
    (``output_sha256``: what :func:`qmri_labels.maps.cohort.outputs_verified` checks before a rerun skips it)."""
    manifest[CHECKSUM_KEY] = output_checksums(folder, [n for n in manifest["outputs"] if n != "manifest.json"])
    return write_json(Path(folder) / "manifest.json", manifest)
