"""The fit command's diffusion part: one DWI series in, one BIDS-derivative folder of maps out.

:func:`map_scan` does one scan (read, :func:`qmri_labels.maps.fit_volume`, write); the
command calls it once, its cohort mode (:mod:`.fit_cohort`, ``--cohort ... --shard I/N``) once
per scan of the shard, each scan into its own output folder.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from qmri_labels.cli.common import InputError, describe_file, environment, output_prefix, read_mask
from qmri_labels.data.io import sha256_file
from qmri_labels.maps import (DIRECTION_CHOICES, SD_REASON_CODES, STATUS_CODES, UncertaintyNotSupported, fit_volume,
                              load_dwi)
from qmri_labels.maps.derivatives import write_dataset_description, write_parameter_maps
from qmri_labels.maps.qc import write_qc_figure
from qmri_labels.physics import display_unit, get_model

logger = logging.getLogger("qmri_labels")

DWI_MODELS = ("ivim", "monoexp")


def add_arguments(parser) -> None:
    dwi = parser.add_argument_group("diffusion")
    dwi.add_argument("--dwi", type=Path, help="4-D diffusion-weighted NIfTI (x, y, z, volumes)")
    dwi.add_argument("--bval", type=Path, help="b-values in s/mm^2 (FSL/BIDS .bval: one row)")
    dwi.add_argument("--bvec", type=Path,
                     help="gradient directions (.bvec, 3 rows; nan allowed on b = 0 volumes): volumes repeat each "
                          "other for --sigma auto only at one b-value and direction (within 5 deg); without it, "
                          "only the b = 0 volumes count as repeats")
    dwi.add_argument("--directions", choices=DIRECTION_CHOICES, default="auto",
                     help="fit the isotropic model to every volume ('all') or to each b-value shell's geometric "
                          "mean ('average', the trace-weighted image; each averaged measurement Rician with "
                          "sigma/sqrt(N)). Default auto: average when a shell with b > 0 holds several volumes "
                          "(directions), since an isotropic fit of every direction takes anisotropy for noise")
    dwi.add_argument("--force", action="store_true",
                     help="fit even when the protocol cannot identify the model (too few b-value shells, no b "
                          "between 0 and 200 s/mm^2 for IVIM, b-values in ms/um^2); recorded in the manifest")
    dwi.add_argument("--sigma", default=None,
                     help="noise SD in image units, or 'auto' to estimate it from the data: repeated b = 0, "
                          "else the background outside --mask, else MP-PCA of the series (a noise map). "
                          "Default: auto for the Rician fit; the Gaussian fit does not need it")
    dwi.add_argument("--noise", choices=("rician", "gaussian"), default=None,
                     help="noise model of the MLE fit (default rician: magnitude images)")
    dwi.add_argument("--b0-threshold", type=float, default=0.0,
                     help="b-values <= this count as repeated b = 0 volumes for --sigma auto (s/mm^2, default 0)")
    dwi.add_argument("--sd-kind", choices=("truth", "label"), default="truth",
                     help="with --uncertainty: 'truth' (default), the SD of each estimate around the true value "
                          "(MLE: Wald SE; network: calibrated on held-out simulations; a network without that "
                          "calibration, such as the shipped ones, is refused); 'label', a network's raw SD: the "
                          "spread around its training label, not an error bar (the sidecars say so); QSM: an "
                          "ensemble's SD (its members' disagreement) is written only with 'label'")


def _sigma_argument(value):
    if value is None or str(value).lower() == "auto":
        return None if value is None else "auto"
    try:
        sigma = float(value)
    except ValueError:
        raise InputError(f"--sigma {value!r}: give a positive number (image intensity units) or 'auto'") from None
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"--sigma {value!r}: must be finite and > 0")
    return sigma


def map_scan(dwi_path: Path, bval_path: Path, out_dir: Path, *, bvec_path: Path | None = None,
             mask_path: Path | None = None, estimator: str | None = None, model: str | None = None,
             noise: str | None = None, sigma=None, b0_threshold: float = 0.0, chunk_size: int = 20000,
             device=None, prefix: str | None = None, progress: bool = False, uncertainty: bool = False,
             directions: str = "auto", force: bool = False, sd_kind: str = "truth", threads="auto") -> dict:
    """Map one DWI series into ``out_dir`` (which must exist); returns the manifest.

    With ``uncertainty`` a standard-deviation map is written beside each parameter map
    (:func:`qmri_labels.maps.fit_volume` ``uncertainty=True``), of the kind ``sd_kind``;
    ``directions``, ``force`` and ``threads`` are :func:`~qmri_labels.maps.fit_volume`'s.
    """
    timings = {}
    t0 = time.perf_counter()
    dwi, bvals, bvecs = load_dwi(dwi_path, bval_path, bvec_path, b0_threshold)
    mask_volume, mask = read_mask(mask_path, dwi)
    sigma_value = _sigma_argument(sigma)
    if estimator not in (None, "mle"):
        for flag, value in (("--sigma", sigma), ("--noise", noise)):
            if value is not None:
                raise InputError(f"{flag} applies to the MLE; a network does not use it")
    noise = noise or "rician"
    timings["read_inputs"] = round(time.perf_counter() - t0, 3)

    t1 = time.perf_counter()
    try:
        maps = fit_volume(dwi, mask if mask_volume is not None else None, protocol=bvals,
                          estimator=estimator or "mle", model=model, noise=noise, sigma=sigma_value,
                          b0_threshold=b0_threshold, chunk_size=chunk_size, device=device, progress=progress,
                          uncertainty=uncertainty, bvecs=bvecs, directions=directions, force=force,
                          sd_kind=sd_kind, threads=threads)
    except UncertaintyNotSupported as exc:
        raise InputError("--" + str(exc)) from None
    timings["fit"] = round(time.perf_counter() - t1, 3)

    t2 = time.perf_counter()
    prefix = output_prefix(prefix, dwi_path, ("_dwi",))
    checksums = {"dwi": sha256_file(dwi_path), "bval": sha256_file(bval_path),
                 "bvec": None if bvec_path is None else sha256_file(bvec_path),
                 "mask": None if mask_path is None else sha256_file(mask_path)}
    outputs = write_parameter_maps(out_dir, maps, prefix, dwi.affine, dwi.header, inputs=checksums,
                                   extra={"NoiseModel": noise if maps.estimator["kind"] == "mle" else None,
                                          "Directions": maps.protocol["directions"]["used"],
                                          "Forced": maps.protocol["identifiability"]["forced"]})
    qc_name = f"{prefix}_qc.png"
    labels = [f"{n} [{display_unit(maps.units[n])}]" if n != "S0" else "S0" for n in maps.param_names]
    write_qc_figure(out_dir / qc_name, {label: maps.params[..., i] for i, label in enumerate(labels)},
                    title=f"{Path(dwi_path).name}: {maps.model} by {maps.estimator.get('name')}",
                    voxel_size=dwi.voxel_size)
    outputs[qc_name] = "QC figure: the middle axial slice of every map"
    write_dataset_description(out_dir, "Diffusion model parameter maps")
    outputs["dataset_description.json"] = "BIDS derivative dataset description"
    outputs["manifest.json"] = "this file"
    timings["write"] = round(time.perf_counter() - t2, 3)

    signal_model = get_model(maps.model)
    return {
        "tool": "qmri_labels.fit",
        "kind": "diffusion",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {
            "dwi": describe_file(dwi),
            "bval": {"path": str(bval_path), "sha256": checksums["bval"], "values": bvals.tolist()},
            "bvec": None if bvec_path is None else {"path": str(bvec_path), "sha256": checksums["bvec"],
                                                     "note": "which volumes repeat each other (noise estimate) "
                                                             "and which shells hold several directions"},
            "mask": None if mask_volume is None else describe_file(mask_volume),
        },
        "model": {"name": maps.model, "parameters": list(maps.param_names), "units": signal_model.units},
        "b0_threshold": b0_threshold,
        "protocol": maps.protocol,
        "force": bool(force),
        "estimator": maps.estimator,
        "noise": {"model": noise if maps.estimator["kind"] == "mle" else None, **(maps.noise or {})},
        "normalisation": ("none: the MLE fits S0 in the image's units" if maps.estimator["kind"] == "mle" else
                          "the network's recorded preprocessing (estimator.preprocessing); S0 scaled back"),
        "voxels": maps.counts,
        "uncertainty": None if maps.sd is None else {
            "method": maps.sd_method,
            "sd_kind": maps.sd_kind,
            "sd_reasons": {name: maps.sd_reason_counts(name) for name in maps.param_names},
            "reason_codes": {str(k): v for k, v in SD_REASON_CODES.items()}},
        "status_codes": {str(k): v for k, v in STATUS_CODES.items()},
        **environment(device),
        "chunk_size": chunk_size,
        "timings_s": timings,
        "outputs": outputs,
    }


def run_dwi(args, out_dir: Path, device) -> dict:
    """The command's diffusion mode: :func:`map_scan` with the parsed arguments."""
    if args.estimator in ("tkd", "tikhonov"):
        raise InputError(f"--estimator {args.estimator} is a QSM inversion; diffusion data take 'mle' or a network")
    try:
        return map_scan(args.dwi, args.bval, out_dir, bvec_path=args.bvec, mask_path=args.mask,
                        estimator=args.estimator, model=args.model, noise=args.noise, sigma=args.sigma,
                        b0_threshold=args.b0_threshold, chunk_size=args.chunk_size, device=device, prefix=args.prefix,
                        progress=not args.quiet, uncertainty=args.uncertainty, directions=args.directions,
                        force=args.force, sd_kind=args.sd_kind, threads=args.threads_used)
    except InputError:
        raise
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc)) from None
