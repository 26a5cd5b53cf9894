"""Time the fit command on a simulated IVIM NIfTI volume, with MLE and with a shipped network.

    python benchmarks/fit_volume.py [--shape 100 100 100] [--snr 30] [--network ivim_epstein_snr30_mle]

Simulates a 4-D volume (Epstein's 10 b-values, the uniform Epstein prior, Rician noise,
S0 = 1000) with its .bval file in a temporary folder, then runs
``python -m qmri_labels.fit`` once with ``--estimator mle --sigma VALUE`` and once with the
shipped network (and, with ``--sigma-auto``, with the MP-PCA noise map), each in its own process, and prints wall time, voxels/s and the peak resident
memory of each run (``ru_maxrss`` of the child).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.data.io import save_nifti


def simulate(folder: Path, shape, snr: float, seed: int = 0):
    n = int(np.prod(shape))
    data = DatasetSpec(n=n, snr=snr, seed=seed).generate()
    s0 = 1000.0
    volume = (data.signals * s0).reshape(*shape, len(EPSTEIN_BVALUES))
    dwi = folder / "dwi.nii.gz"
    save_nifti(dwi, volume, np.diag([2.0, 2.0, 2.0, 1.0]))
    bval = folder / "dwi.bval"
    bval.write_text(" ".join(f"{b:g}" for b in EPSTEIN_BVALUES) + "\n")
    return dwi, bval, s0 / snr


def timed_run(argv):
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "qmri_labels.fit", *argv, "--quiet"], check=True)
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    return seconds, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[100, 100, 100])
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--network", default="ivim_epstein_snr30_mle")
    parser.add_argument("--sigma-auto", action="store_true",
                        help="also time the MLE with --sigma auto (one b = 0, no mask: the MP-PCA noise map)")
    args = parser.parse_args(argv)
    n = int(np.prod(args.shape))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dwi, bval, sigma = simulate(folder, args.shape, args.snr)
        print(f"volume {tuple(args.shape)} x {len(EPSTEIN_BVALUES)} ({n:,} voxels), Rician SNR {args.snr:g}")
        runs = {
            "mle": ["--estimator", "mle", "--sigma", f"{sigma:g}"],
            f"network {args.network}": ["--estimator", args.network],
        }
        if args.sigma_auto:
            runs["mle --sigma auto (MP-PCA)"] = ["--estimator", "mle", "--sigma", "auto"]
        for i, (name, extra) in enumerate(runs.items()):
            seconds, peak = timed_run(["--dwi", str(dwi), "--bval", str(bval), "--out", str(folder / f"out{i}"), *extra])
            print(f"{name:40s}: {seconds:7.1f} s  {n / seconds:10,.0f} voxels/s  peak RSS (largest child so far) {peak:,.0f} MB")


if __name__ == "__main__":
    main()
