"""Parameter maps from a user's own scans: ``qmri-fit`` / ``python -m qmri_labels.fit``.

Diffusion (IVIM or mono-exponential)::

    qmri-fit --dwi sub-01_dwi.nii.gz --bval sub-01_dwi.bval [--bvec sub-01_dwi.bvec] \\
        [--mask brain.nii.gz] [--model ivim|monoexp] [--estimator mle|NAME|PATH] \\
        [--sigma VALUE|auto] [--uncertainty] [--device cpu|cuda] --out derivatives/qmri_labels/sub-01

A cohort, split into shards for the array jobs of a cluster scheduler (see
:mod:`qmri_labels.cli.fit_cohort`)::

    qmri-fit --cohort BIDS_FOLDER_OR_LIST --shard I/N [diffusion options] --out derivatives/qmri_labels

QSM (dipole inversion of a local field map in ppm)::

    qmri-fit --model qsm --field sub-01_field.nii.gz --mask brain.nii.gz \\
        [--estimator tkd|tikhonov|tv|NAME|PATH] [--bfr METHOD] [--b0-dir 0,0,1] [--mat] \\
        [--uncertainty] --out chi/

``qmri-fit --list-models`` lists the shipped networks (their model, protocol, SNR, training
label and prior, held-out figures); ``--version`` prints the toolkit's version.

``--threads N|auto`` sets the torch CPU threads (default ``auto``: the cores other processes
leave free when the command starts, :mod:`qmri_labels.threads`; the manifest records both).

The command is a thin layer: diffusion maps come from :func:`qmri_labels.maps.fit_volume`
(via :func:`qmri_labels.cli.fit_dwi.map_scan`), QSM from :mod:`qmri_labels.cli.fit_qsm`; the
noise level from :mod:`qmri_labels.fitting.noise`; file names and sidecars from
:mod:`qmri_labels.maps.derivatives`; the quick-look figure from :mod:`qmri_labels.maps.qc`.

What it writes (into ``--out``, a BIDS-derivative folder that appears only when complete):

* ``<prefix>_model-<model>_param-<name>_dwimap.nii.gz`` per parameter (IVIM: ``S0``, ``f``,
  ``D``, ``Dstar``; mono-exponential: ``S0``, ``D``), or ``<prefix>_Chimap.nii.gz`` (QSM),
  float32 with the input's affine; S0 in the input's intensity units, f a fraction, D and D*
  in mm^2/s, chi in ppm; 0 outside the mask, NaN inside where not estimated;
* a JSON sidecar beside every map (model, parameter, units, estimator, noise, software
  version, SHA-256 of every input) and ``dataset_description.json``;
* ``<prefix>_model-<model>_desc-status_dseg.nii.gz``: a uint8 code per voxel
  (:data:`qmri_labels.maps.STATUS_CODES`); ``<prefix>_desc-sigma_noisemap.nii.gz`` when the
  noise level was estimated per voxel (MP-PCA);
* with ``--uncertainty``, the map's name with the ``desc-sd`` entity beside each map, with a
  sidecar saying what it is. Diffusion: ``<prefix>_model-<model>_param-<name>_desc-sd_dwimap.nii.gz``,
  the standard deviation of the estimate in the parameter's units (MLE: the Wald standard
  error from the Fisher information at the estimate, NaN for a parameter on a bound or not
  identifiable; a network: its own SD, refused for a network that reports none), the sidecar
  counting the NaN reasons. QSM: ``<prefix>_desc-sd_Chimap.nii.gz``, the SD of chi (ppm) over
  the members of a U-Net ensemble (a bundle of ``QSMEstimator(n_members=M)``, M >= 2), 0
  outside the mask, written only with ``--sd-kind label`` (the members' disagreement is not
  calibrated against the true chi); refused for a single U-Net and for the conventional
  inversions (tkd, tikhonov, tv), which report none;
* ``manifest.json``: command, inputs (checksums, shapes, affines), estimator, noise level and
  how it was obtained, versions, device, timings, voxel counts, the SHA-256 of every output
  (``output_sha256``); ``<prefix>_qc.png``.

Noise level (``--sigma``): ``VALUE`` in the image's units, or ``auto``
(:func:`qmri_labels.fitting.noise.estimate_noise`): the spread of volumes that repeat each
other (b = 0 volumes, b at or below ``--b0-threshold``; at b > 0 only volumes of one b-value
and one direction within 5 degrees, which needs ``--bvec``), else the background outside
``--mask`` (Rayleigh median), else Marchenko-Pastur PCA of the series itself, which gives a
per-voxel noise map that the MLE uses voxel by voxel. No b = 0 volume is needed: the MLE fits
S0 itself.

Directions (``--directions all|average``, default ``auto``): the isotropic models are fitted
to every volume or to each b-value shell's geometric mean (each averaged measurement Rician
with ``sigma / sqrt(N)``); ``auto`` averages when a shell with b > 0 holds several volumes.
A protocol that cannot identify the model (fewer b-value shells than parameters, with scanner
jitter such as 995/1000/1005 one shell; no b between 0 and 200 s/mm^2 for IVIM; b-values in
ms/um^2) is refused with exit status 1 unless ``--force``; the manifest records both.

Bad input ends the command with a message on stderr and exit status 1, and leaves nothing
behind. Progress and information go to the ``qmri_labels`` logger (stderr); ``--quiet`` keeps
warnings only, ``--verbose`` adds debug messages.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from qmri_labels import __version__
from qmri_labels.cli import fit_cohort, fit_dwi, fit_qsm
from qmri_labels.cli.common import (InputError, add_threads_argument, check_device, check_out_holds_no_input,
                                    threads_record, write_manifest)
from qmri_labels.fileio import atomic_dir
from qmri_labels.log import add_verbosity_flags, configure_cli_logging
from qmri_labels.threads import resolve_threads, torch_threads

logger = logging.getLogger("qmri_labels")


class ListModels(argparse.Action):
    """``--list-models``: print the shipped networks and exit (no other option needed)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from qmri_labels.estimators.shipped import format_models, list_models

        try:
            text = format_models(list_models())
        except ValueError as exc:
            parser.exit(1, f"qmri_labels.fit: error: {exc}\n")
        print(text)
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmri-fit",
        description="Parameter maps (IVIM, mono-exponential, QSM) from NIfTI data with the MLE fitter, "
                    "a conventional QSM inversion or a trained network.",
    )
    fit_dwi.add_arguments(parser)
    fit_qsm.add_arguments(parser)
    fit_cohort.add_arguments(parser)
    parser.add_argument("--mask", type=Path, help="3-D mask on the same grid (non-zero = fit); required for QSM")
    parser.add_argument("--model", choices=fit_dwi.DWI_MODELS + ("qsm",), default=None,
                        help="signal model (default: ivim, or the network's model; qsm with --field)")
    parser.add_argument("--estimator", default=None,
                        help="diffusion: 'mle' (default), the name of a shipped network (--list-models), or a "
                             "bundle folder; QSM: 'tkd' (default), 'tikhonov', 'tv', a network name or folder")
    parser.add_argument("--uncertainty", action="store_true",
                        help="also write the standard deviation of every map beside it (the map's name with "
                             "desc-sd): diffusion, the MLE's Fisher standard error at the estimate (NaN at a bound "
                             "or where not identifiable) or a network's own SD where it reports one; QSM, the SD "
                             "of chi over the members of a U-Net ensemble (a bundle of QSMEstimator(n_members>=2)), "
                             "with --sd-kind label only")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    add_threads_argument(parser, "the fit (torch intra-op threads)")
    parser.add_argument("--chunk-size", type=int, default=20000,
                        help="voxels estimated at a time (bounds memory; default 20000)")
    parser.add_argument("--prefix", default=None,
                        help="file name prefix of the maps (default: the input's name without "
                             "'.nii.gz' and a trailing '_dwi' or '_field')")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (must not exist); with --cohort the folder of every scan's folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder; with --cohort, map every scan of the shard again "
                             "even where a verified result exists")
    add_verbosity_flags(parser)
    parser.add_argument("--list-models", action=ListModels,
                        help="list the shipped networks (model, protocol, SNR, label, training prior, held-out "
                             "figures) and exit; any of their names goes to --estimator")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def check_mode(args) -> str:
    """``"dwi"`` or ``"qsm"`` from the given inputs; contradictory options are refused."""
    if args.field is not None and args.dwi is not None:
        raise InputError("give either --dwi (diffusion) or --field (QSM), not both")
    if args.field is not None or args.model == "qsm":
        if args.field is None:
            raise InputError("--model qsm needs --field FIELD.nii.gz")
        if args.model not in (None, "qsm"):
            raise InputError(f"--field is a QSM input, but --model is {args.model!r}")
        if args.mask is None:
            raise InputError("QSM needs --mask MASK.nii.gz (the region where the local field is defined)")
        for flag, value in (("--bval", args.bval), ("--bvec", args.bvec), ("--sigma", args.sigma),
                            ("--directions", None if args.directions == "auto" else args.directions),
                            ("--force", args.force or None)):
            if value is not None:
                raise InputError(f"{flag} is a diffusion option; it does not apply to --model qsm")
        return "qsm"
    for option, unset in fit_qsm.QSM_ONLY_OPTIONS.items():
        if getattr(args, option) != unset:
            raise InputError(f"--{option.replace('_', '-')} is a QSM option; it applies with --field ... --model qsm only")
    if args.dwi is None:
        raise InputError("nothing to fit: give --dwi DWI.nii.gz --bval DWI.bval (diffusion), "
                         "--cohort FOLDER_OR_LIST (many diffusion scans) or "
                         "--field FIELD.nii.gz --mask MASK.nii.gz --model qsm")
    if args.bval is None:
        raise InputError("--dwi needs --bval (the b-values, one per volume)")
    return "dwi"


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 success, 1 bad input or, with --cohort, a scan
    that failed; 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_cli_logging(quiet=args.quiet, verbose=args.verbose)
    command = ["qmri-fit"] + list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    args.threads_used = resolve_threads(args.threads)
    with torch_threads(args.threads_used):
        return _run(args, command, started)


def _run(args, command: list[str], started: float) -> int:
    try:
        if args.chunk_size < 1:
            raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
        if args.sd_kind != "truth" and not args.uncertainty:
            raise InputError(f"--sd-kind {args.sd_kind} says which SD maps to write; it applies with --uncertainty")
        if args.cohort is not None or args.shard is not None:
            fit_cohort.check_arguments(args)
            return fit_cohort.run_cohort(args, check_device(args.device), command)
        mode = check_mode(args)
        device = check_device(args.device)
        estimator_path = Path(args.estimator) if args.estimator else None
        check_out_holds_no_input(args.out, [args.dwi, args.bval, args.bvec, args.mask, args.field, estimator_path])
        out = Path(args.out)
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise InputError(f"--out {args.out}: exists and is not a folder")
            if not args.overwrite:
                raise InputError(f"--out {args.out}: the output folder exists; choose another or pass --overwrite")
        ancestor = out.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise InputError(f"--out {args.out}: cannot be created, {ancestor} is not a folder")
        run = fit_dwi.run_dwi if mode == "dwi" else fit_qsm.run_qsm
        # the folder is assembled in a hidden sibling and renamed into place only when complete
        with atomic_dir(out, overwrite=args.overwrite) as folder:
            manifest = run(args, folder, device)
            manifest["command"] = command
            manifest["threads"] = threads_record(args)
            manifest["timings_s"]["total"] = round(time.perf_counter() - started, 3)
            write_manifest(folder, manifest)
    except (ValueError, OSError) as exc:
        print(f"qmri_labels.fit: error: {exc}", file=sys.stderr)
        return 1
    _log_summary(manifest, args.out)
    return 0


def _log_summary(manifest: dict, out: Path) -> None:
    counts = manifest.get("voxels", {})
    logger.info("wrote %d files to %s", len(manifest["outputs"]), out)
    if counts:
        skipped = ", ".join(f"{k}: {v}" for k, v in counts.get("skipped", {}).items() if v) or "none"
        logger.info("voxels in mask: %s, estimated: %s, skipped: %s", counts.get("in_mask"), counts.get("estimated"),
                    skipped)
    if "threads" in manifest:
        logger.info("torch threads: %d (requested %s)", manifest["threads"]["used"], manifest["threads"]["requested"])
    logger.info("time: %.1f s", manifest["timings_s"]["total"])


if __name__ == "__main__":
    sys.exit(main())
