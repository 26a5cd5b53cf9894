"""Background-field removal: local-field error and time per volume, for every method.

One head phantom (:class:`qmri_labels.data.qsm.QSMPhantomSpec`, ``field_kind="total"``:
brain sources plus skull, air and sinus background) of ``size``^3 voxels; each method of
:mod:`qmri_labels.fitting.bfr` with its documented defaults removes the background. Printed per
method: the local-field NRMSE (%) against the true local field (the field of the brain sources),
both demeaned over the method's eroded mask (a BFR result is defined up to a constant), the
fraction of the brain mask kept, the seconds per volume, and that time as a ratio to one FFT
dipole convolution (:func:`forward_field`) of the same volume timed in the same process (the
ratio survives a shared or busy CPU; the seconds do not). "nothing" is the total field itself.

Usage::

    python benchmarks/bfr.py                   # 160^3, CPU (and CUDA if available)
    python benchmarks/bfr.py --size 64 --noise 0.005 --device cpu --threads 1
    python benchmarks/bfr.py --size 64 --noise 0 --source local   # the local field alone goes in
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(size: int, noise: float, device: str, seed: int = 0, methods=None, source: str = "total") -> list[dict]:
    import numpy as np
    import torch

    from qmri_labels.data.qsm import QSMPhantomSpec
    from qmri_labels.analysis.image_metrics import nrmse_demeaned
    from qmri_labels.fitting.bfr import BFR_METHODS
    from qmri_labels.physics.qsm import forward_field

    # source "local": the true local field alone goes in (no background), so what a method loses
    # is the part of the local field it cannot tell from a background field
    spec = QSMPhantomSpec(shape=(size, size, size), n=1, seed=seed, field_kind=source, noise_sigma=noise)
    total = spec.generate()
    true_local = spec.replace(field_kind="local", noise_sigma=0.0).generate().field[0]
    mask = total.mask[0]
    field = torch.as_tensor(total.field[0], device=device)
    mask_t = torch.as_tensor(mask, device=device)
    chi = torch.as_tensor(total.chi[0], device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    forward_field(chi)  # warm-up (FFT plans)
    sync()
    t0 = time.perf_counter()
    forward_field(chi)
    sync()
    fft_s = time.perf_counter() - t0
    rows = [{"method": "nothing", "nrmse": nrmse_demeaned(total.field[0], true_local, mask), "kept": 1.0,
             "seconds": 0.0, "time_vs_fft_conv": 0.0}]
    for name in methods or BFR_METHODS:
        sync()
        t0 = time.perf_counter()
        local, eroded = BFR_METHODS[name](field, mask_t)
        sync()
        seconds = time.perf_counter() - t0
        local, eroded = local.cpu().numpy(), eroded.cpu().numpy()
        rows.append({"method": name, "nrmse": nrmse_demeaned(local, true_local, eroded),
                     "kept": float(eroded.sum() / mask.sum()), "seconds": seconds, "time_vs_fft_conv": seconds / fft_s})
    for r in rows:
        r.update(size=size, device=device, noise_sigma=noise, fft_conv_seconds=fft_s, source=source)
    return rows


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
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        rows += run(args.size, args.noise, device, methods=args.methods, source=args.source)
    print(f"{'method':<9} {'device':<6} {'size':>5} {'NRMSE %':>8} {'kept':>5} {'s/volume':>9} {'x FFT conv':>10}")
    for r in rows:
        print(f"{r['method']:<9} {r['device']:<6} {r['size']:>5} {r['nrmse']:>8.1f} {r['kept']:>5.2f} "
              f"{r['seconds']:>9.2f} {r['time_vs_fft_conv']:>10.0f}")
    if args.json:
        from qmri_labels.fileio import write_json

        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
