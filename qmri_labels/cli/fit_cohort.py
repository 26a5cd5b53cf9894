"""The fit command's cohort mode: many DWI series, split into shards, resumable.

``qmri-fit --cohort FOLDER_OR_LIST --shard I/N --out derivatives/qmri_labels [fit options]``
maps every scan of shard ``I`` of ``N`` (0-based; :func:`qmri_labels.maps.cohort.select_shard`), one
after the other, each with :func:`.fit_dwi.map_scan` into its own folder
``<out>/<scan name>/`` (the scan name is its DWI path below the cohort folder or list file
without ``_dwi.nii.gz``, e.g. ``sub-01/ses-1/dwi/sub-01_ses-1``). ``N`` array jobs of a cluster
scheduler, each given its own ``I``, split the cohort without talking to each other.

* A scan whose folder holds a manifest whose output checksums verify, whose inputs are
  unchanged and whose fit settings are the same (:func:`qmri_labels.maps.cohort.outputs_verified`,
  :func:`settings`) is skipped, so a rerun resumes where a job stopped; ``--overwrite`` maps
  every scan of the shard again. A folder that is missing, incomplete, damaged, made from other
  inputs or with other settings is (re)mapped; it is replaced only when complete.
* A scan that fails is reported and the shard goes on; the command then exits with status 1.
* ``<out>/summary_shard-I-of-N.tsv`` (written atomically when the shard ends) has one line per
  scan of the shard: :data:`SUMMARY_COLUMNS`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from qmri_labels.cli import fit_dwi
from qmri_labels.cli.common import InputError, check_out_holds_no_input, threads_record, write_manifest
from qmri_labels.fileio import atomic_dir, write_text
from qmri_labels.maps.cohort import Scan, discover_scans, outputs_verified, parse_shard, select_shard

logger = logging.getLogger("qmri_labels")

#: columns of the per-shard summary table
SUMMARY_COLUMNS = ("scan", "status", "output", "voxels_in_mask", "voxels_estimated", "seconds", "message")
#: options of the single-scan mode that a cohort takes per scan (from the folder or list file)
PER_SCAN_OPTIONS = (("--dwi", "dwi"), ("--bval", "bval"), ("--bvec", "bvec"), ("--mask", "mask"),
                    ("--prefix", "prefix"), ("--field", "field"))


def add_arguments(parser) -> None:
    cohort = parser.add_argument_group("cohort (many scans)")
    cohort.add_argument("--cohort", type=Path, default=None,
                        help="a BIDS-like folder (every *_dwi.nii.gz with its .bval, .bvec where present) or a "
                             "text file with one 'DWI [MASK]' per line; maps each scan into OUT/<scan name>/")
    cohort.add_argument("--shard", default=None,
                        help="I/N: map only shard I (0-based) of N, e.g. $SLURM_ARRAY_TASK_ID/8 (default 0/1)")


def summary_name(index: int, count: int) -> str:
    return f"summary_shard-{index}-of-{count}.tsv"


def settings(args) -> dict:
    """The options that change a scan's maps (a verified result made with others is redone)."""
    return {"estimator": args.estimator or "mle", "model": args.model, "noise": args.noise,
            "sigma": None if args.sigma is None else str(args.sigma), "b0_threshold": float(args.b0_threshold),
            "uncertainty": bool(args.uncertainty), "directions": args.directions, "force": bool(args.force),
            # a label SD is other maps; the default (truth) leaves earlier results' settings as they were
            **({"sd_kind": args.sd_kind} if args.uncertainty and args.sd_kind != "truth" else {})}


def check_arguments(args) -> tuple[int, int]:
    """The shard ``(I, N)``; options that do not apply to a cohort are refused."""
    if args.cohort is None:
        raise InputError("--shard needs --cohort FOLDER_OR_LIST (the scans to split)")
    for flag, name in PER_SCAN_OPTIONS:
        if getattr(args, name) is not None:
            raise InputError(f"{flag} does not apply to --cohort: each scan's files come from the cohort folder "
                             "or list file (a list file may give a mask per scan)")
    if args.model == "qsm":
        raise InputError("--cohort maps diffusion series; QSM takes one --field at a time")
    if args.estimator in ("tkd", "tikhonov"):
        raise InputError(f"--estimator {args.estimator} is a QSM inversion; diffusion data take 'mle' or a network")
    try:
        return parse_shard("0/1" if args.shard is None else args.shard)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def run_cohort(args, device, command: list[str]) -> int:
    """Map shard ``--shard`` of ``--cohort`` into ``--out``; returns the exit status."""
    index, count = check_arguments(args)
    try:
        scans = discover_scans(args.cohort)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a folder")
    _check_nested(scans)
    mine = select_shard(scans, index, count)
    logger.info("cohort %s: %d scans; shard %d/%d maps %d of them", args.cohort, len(scans), index, count, len(mine))
    wanted = settings(args)
    rows = []
    for number, scan in enumerate(mine, start=1):
        logger.info("[%d/%d] %s", number, len(mine), scan.name)
        rows.append(_map_one(scan, out, args, device, command, wanted, f"{index}/{count}"))
    out.mkdir(parents=True, exist_ok=True)
    table = "\t".join(SUMMARY_COLUMNS) + "\n" + "".join(
        "\t".join(_cell(row.get(column)) for column in SUMMARY_COLUMNS) + "\n" for row in rows)
    write_text(out / summary_name(index, count), table)
    statuses = [row["status"] for row in rows]
    logger.info("shard %d/%d: %d mapped, %d skipped (verified), %d failed; summary %s", index, count,
                statuses.count("mapped"), statuses.count("skipped"), statuses.count("failed"),
                out / summary_name(index, count))
    return 1 if "failed" in statuses else 0


def _check_nested(scans) -> None:
    """A scan's folder inside another's would be lost when that one is replaced: refuse."""
    names = {scan.name for scan in scans}
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in names:
                raise InputError(f"cohort {'/'.join(parts[:depth])!r} and {name!r}: one scan's output folder would "
                                 "lie inside the other's; rename one of them")


def _remove_stale_staging(folder: Path) -> None:
    """Hidden staging folders that a killed job left for this scan (``fileio.atomic_dir``'s names).

    Only this scan's job writes them, so any that exist before it starts are stale.
    """
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.[a-z0-9_]{{8}}\.(tmp|old)$")
    if folder.parent.is_dir():
        for path in folder.parent.iterdir():
            if pattern.match(path.name) and path.is_dir() and not path.is_symlink():
                logger.info("%s: removing %s, left by an interrupted run", folder.name, path)
                shutil.rmtree(path, ignore_errors=True)


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\n", " ")


def _inputs(scan: Scan) -> dict:
    return {"dwi": scan.dwi, "bval": scan.bval, "bvec": scan.bvec, "mask": scan.mask}


def _recorded_settings(folder: Path):
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("cohort", {}).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def _map_one(scan: Scan, out: Path, args, device, command, wanted: dict, shard: str) -> dict:
    folder = out / scan.name
    row = {"scan": scan.name, "output": scan.name}
    started = time.perf_counter()
    _remove_stale_staging(folder)
    if not args.overwrite and folder.is_dir() and _recorded_settings(folder) == wanted \
            and outputs_verified(folder, _inputs(scan)):
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        counts = manifest.get("voxels", {})
        logger.info("%s: verified result in %s, skipped", scan.name, folder)
        return {**row, "status": "skipped", "voxels_in_mask": counts.get("in_mask"),
                "voxels_estimated": counts.get("estimated"), "seconds": 0.0,
                "message": "outputs verified against the manifest's checksums"}
    try:
        if folder.exists() and not (folder / "manifest.json").is_file():
            raise InputError(f"{folder} exists and holds no manifest.json of an earlier run; it is not replaced "
                             "(move it away)")
        check_out_holds_no_input(folder, _inputs(scan).values())
        with atomic_dir(folder, overwrite=True) as staging:
            manifest = fit_dwi.map_scan(scan.dwi, scan.bval, staging, bvec_path=scan.bvec, mask_path=scan.mask,
                                        estimator=args.estimator, model=args.model, noise=args.noise,
                                        sigma=args.sigma, b0_threshold=args.b0_threshold,
                                        chunk_size=args.chunk_size, device=device, progress=False,
                                        uncertainty=args.uncertainty, directions=args.directions,
                                        force=args.force, sd_kind=args.sd_kind, threads=args.threads_used)
            manifest["command"] = command
            manifest["threads"] = threads_record(args)
            manifest["cohort"] = {"source": str(args.cohort), "scan": scan.name, "shard": shard, "settings": wanted}
            manifest["timings_s"]["total"] = round(time.perf_counter() - started, 3)
            write_manifest(staging, manifest)
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc)
        logger.error("qmri_labels.fit: error: %s: %s", scan.name, message)
        return {**row, "status": "failed", "seconds": round(time.perf_counter() - started, 3), "message": message}
    counts = manifest["voxels"]
    return {**row, "status": "mapped", "voxels_in_mask": counts.get("in_mask"),
            "voxels_estimated": counts.get("estimated"), "seconds": round(time.perf_counter() - started, 3),
            "message": ""}

