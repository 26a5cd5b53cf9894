"""QSM speed and memory: phantom generation, TKD and whole-volume U-Net inference.

Each case runs in a fresh Python process so that its peak memory is its own:

* ``phantom``  -- :func:`qmri_labels.data.qsm.make_phantom` of a ``size``^3 volume plus
                  its field (:func:`forward_field`).
* ``tkd``      -- :func:`qmri_labels.fitting.qsm_inversion.tkd` of a ``size``^3 field.
* ``tv``       -- :func:`qmri_labels.fitting.qsm_inversion.tv` of a ``size``^3 masked field.
* ``unet``     -- whole-volume inference of the shipped U-Net
                  (``models/qsm_unet_field-tv_residual_lrelu16``: ``graf`` preset, 16 initial
                  channels, inputs field + TV; a randomly initialised network of the same
                  architecture if the bundle is absent) through :meth:`QSMEstimator.predict`,
                  which includes computing its TV input channel.

Peak memory is the process's maximum resident set size minus the resident size before the
case (CPU), or ``torch.cuda.max_memory_allocated`` (GPU). Targets from the issue: U-Net
<= 30 s on CPU and <= 0.5 s on a GPU for 160^3.

Usage::

    python benchmarks/qsm_inference.py                # 160^3 on CPU (and CUDA if available)
    python benchmarks/qsm_inference.py --size 96 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    # current resident set size from /proc (Linux); ru_maxrss gives the peak
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(case: str, size: int, device: str, repeats: int, threads: int | None) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from qmri_labels.data.qsm import make_phantom
    from qmri_labels.fitting.qsm_inversion import tkd, tv
    from qmri_labels.physics.qsm import forward_field

    shape = (size, size, size)
    chi, mask = make_phantom(shape, seed=0) if case != "phantom" else (None, None)
    field = forward_field(chi) * mask if case != "phantom" else None  # a masked local field
    est = None
    if case == "unet":
        from qmri_labels.estimators import QSMEstimator

        bundle = REPO / "qmri_labels" / "models" / "qsm_unet_field-tv_residual_lrelu16"
        if (bundle / "manifest.json").is_file():
            est = QSMEstimator.load(bundle, device=device)
            source = str(bundle.relative_to(REPO))
        else:
            from qmri_labels.nets.unet3d import UNet3D, unet3d_preset
            from qmri_labels.training.qsm import QSMNormalisation

            est = QSMEstimator(device=device, inputs=("field", "tv"))
            est.network_ = UNet3D(unet3d_preset("graf", in_channels=2)).eval()
            est.normalisation_ = QSMNormalisation(0.03, 0.05)
            est.voxel_size_, est.b0_dir_ = (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)
            source = "random init (no shipped bundle)"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()

    def once():
        if case == "phantom":
            c, _ = make_phantom(shape, seed=1)
            return forward_field(c)
        if case == "tv":
            return tv(torch.as_tensor(field, device=device), torch.as_tensor(mask, device=device))
        if case == "tkd":
            if cuda:
                out = tkd(torch.as_tensor(field, device=device), threshold=0.19)
                torch.cuda.synchronize()
                return out
            return tkd(field, threshold=0.19, mask=mask)
        out = est.predict(field, mask, device=device)
        if cuda:
            torch.cuda.synchronize()
        return out

    if cuda:  # warm-up: CUDA context, cuDNN algorithm choice
        once()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    result = {"case": case, "size": size, "device": device, "threads": torch.get_num_threads(),
              "seconds_min": min(times), "seconds_median": float(np.median(times)), "repeats": repeats}
    if cuda:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["peak_rss_mb"] = _peak_mb()
        result["peak_extra_mb"] = _peak_mb() - base_rss
    if est is not None:
        result["network"] = source
        result["n_parameters"] = est.network_.n_parameters()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", action="append", help="cpu, cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cases", nargs="+", default=["phantom", "tkd", "tv", "unet"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.case:  # child process
        print(json.dumps(run_case(args.case, args.size, args.device[0], args.repeats, args.threads)))
        return 0
    devices = args.device
    if not devices:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for case in args.cases:
            if case == "phantom" and device != "cpu":
                continue
            cmd = [sys.executable, __file__, "--case", case, "--size", str(args.size), "--device", device,
                   "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                print(f"{case} on {device} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            mem = res.get("peak_gpu_mb", res.get("peak_extra_mb"))
            extra = f"  [{res['network']}]" if "network" in res else ""
            print(f"{case:8s} {device:5s} {args.size}^3: {res['seconds_min']:8.3f} s (min of {args.repeats}), "
                  f"peak {'GPU' if 'peak_gpu_mb' in res else 'extra RSS'} {mem:8.1f} MB{extra}", flush=True)
    by = {(r["case"], r["device"]): r for r in results}
    for device in devices:
        if ("unet", device) in by and ("tkd", device) in by:
            ratio = by[("unet", device)]["seconds_min"] / by[("tkd", device)]["seconds_min"]
            target = 30.0 if device == "cpu" else 0.5
            t = by[("unet", device)]["seconds_min"]
            print(f"U-Net / TKD time ratio on {device}: {ratio:.1f}x; U-Net {t:.2f} s vs target {target} s "
                  f"({'met' if t <= target else 'NOT met'})")
    if args.json:
        from qmri_labels.fileio import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
