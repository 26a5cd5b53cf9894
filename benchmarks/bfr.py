"""Background-field removal: local-field error and time per volume, for every method.

Head phantoms (:class:`qmri_labels.data.qsm.QSMPhantomSpec`, ``field_kind="total"``: brain
sources plus skull, air and sinus background): random shapes of ``size``^3 voxels of 1 mm
(``--family random_shapes``, the default) or anatomical heads (``--family anatomical``: a 192 mm
grid of ``--voxel`` mm voxels, ``--heads`` of them); each method of :mod:`qmri_labels.fitting.bfr`
with its documented defaults (which adapt to the voxel size) removes the background. Printed per
method: the local-field NRMSE (%) against the true local field (the field of the brain sources),
both demeaned, over the method's own eroded mask ("own") and over the mask common to all methods
("common", the intersection of their eroded masks), the fraction of the brain mask kept, the
seconds per volume, and that time as a ratio to one FFT dipole convolution
(:func:`forward_field`) of the same volume timed in the same process (the ratio survives a
shared or busy CPU; the seconds do not). "nothing" is the total field itself. With several heads
the rows are means over heads.

Usage::

    python benchmarks/bfr.py                   # 160^3, CPU (and CUDA if available)
    python benchmarks/bfr.py --size 64 --noise 0.005 --device cpu --threads 1
    python benchmarks/bfr.py --size 64 --noise 0 --source local   # the local field alone goes in
    python benchmarks/bfr.py --family anatomical --voxel 2 --heads 4 --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(size: int, noise: float, device: str, seed: int = 0, methods=None, source: str = "total",
        family: str = "random_shapes", voxel: float = 1.0) -> list[dict]:
    """Rows of one head (see the module docstring)."""
    import numpy as np
    import torch

    from qmri_labels.data.qsm import QSMPhantomSpec
    from qmri_labels.analysis.image_metrics import nrmse_demeaned
    from qmri_labels.fitting.bfr import BFR_METHODS
    from qmri_labels.physics.qsm import forward_field

    # source "local": the true local field alone goes in (no background), so what a method loses
    # is the part of the local field it cannot tell from a background field
    if family == "anatomical":
        size = int(round(192 / voxel))
    spec = QSMPhantomSpec(shape=(size, size, size), n=1, seed=seed, field_kind=source, noise_sigma=noise,
                          family=family, voxel_size=(voxel, voxel, voxel))
    total = spec.generate()
    true_local = spec.replace(field_kind="local", noise_sigma=0.0).generate().field[0]
    mask = total.mask[0]
    field = torch.as_tensor(total.field[0], device=device)
    mask_t = torch.as_tensor(mask, device=device)
    chi = torch.as_tensor(total.chi[0], device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    forward_field(chi, spec.voxel_size)  # warm-up (FFT plans)
    sync()
    t0 = time.perf_counter()
    forward_field(chi, spec.voxel_size)
    sync()
    fft_s = time.perf_counter() - t0
    results = {}
    for name in methods or BFR_METHODS:
        sync()
        t0 = time.perf_counter()
        local, eroded = BFR_METHODS[name](field, mask_t, spec.voxel_size)
        sync()
        results[name] = (local.cpu().numpy(), eroded.cpu().numpy(), time.perf_counter() - t0)
    common = np.logical_and.reduce([eroded for _, eroded, _ in results.values()] + [mask])
    rows = [{"method": "nothing", "nrmse": nrmse_demeaned(total.field[0], true_local, mask),
             "nrmse_common": nrmse_demeaned(total.field[0], true_local, common), "kept": 1.0,
             "seconds": 0.0, "time_vs_fft_conv": 0.0}]
    for name, (local, eroded, seconds) in results.items():
        rows.append({"method": name, "nrmse": nrmse_demeaned(local, true_local, eroded),
                     "nrmse_common": nrmse_demeaned(local, true_local, common),
                     "kept": float(eroded.sum() / mask.sum()), "seconds": seconds, "time_vs_fft_conv": seconds / fft_s})
    for r in rows:
        r.update(size=size, device=device, noise_sigma=noise, fft_conv_seconds=fft_s, source=source, family=family,
                 voxel_mm=voxel, seed=seed, common_kept=float(common.sum() / mask.sum()))
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, device): the mean of the numbers over heads."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["device"]), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0], heads=len(group))
        for key in ("nrmse", "nrmse_common", "kept", "seconds", "time_vs_fft_conv", "common_kept"):
            row[key] = sum(g[key] for g in group) / len(group)
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--noise", type=float, default=0.005, help="field noise (ppm) inside the mask")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both when CUDA is available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--source", choices=["total", "local"], default="total",
                        help="field given to the methods: the total field (default) or the true local field "
                             "alone, which measures how much of the local field a method removes as background")
    parser.add_argument("--family", choices=["random_shapes", "anatomical"], default="random_shapes")
    parser.add_argument("--voxel", type=float, default=None, help="voxel size in mm (anatomical heads; default 2)")
    parser.add_argument("--heads", type=int, default=1, help="heads (seeds 0..heads-1); rows are means over them")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (per head) here")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    voxel = args.voxel if args.voxel is not None else (2.0 if args.family == "anatomical" else 1.0)
    rows = []
    for device in devices:
        for seed in range(args.heads):
            rows += run(args.size, args.noise, device, seed=seed, methods=args.methods, source=args.source,
                        family=args.family, voxel=voxel)
    print(f"{args.family}, {voxel:g} mm voxels, {args.heads} head(s), source {args.source}, noise {args.noise} ppm")
    print(f"{'method':<9} {'device':<6} {'size':>5} {'NRMSE own %':>11} {'common %':>9} {'kept':>5} {'s/volume':>9} "
          f"{'x FFT conv':>10}")
    for r in mean_rows(rows):
        print(f"{r['method']:<9} {r['device']:<6} {r['size']:>5} {r['nrmse']:>11.1f} {r['nrmse_common']:>9.1f} "
              f"{r['kept']:>5.2f} {r['seconds']:>9.2f} {r['time_vs_fft_conv']:>10.0f}")
    if args.json:
        from qmri_labels.fileio import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
