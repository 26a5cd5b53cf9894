"""Fit the same volume idle and beside busy processes, with torch's default thread count and with
``threads="auto"``, and print the slow-down each suffers.

    python benchmarks/threads.py [--voxels 30000] [--busy N] [--estimator mle] [--repeats 3]

torch starts one thread per core. With other processes keeping cores busy, those threads wait
on each other at every parallel region; ``threads="auto"`` (:mod:`qmri_labels.threads`) counts
the busy cores and uses only the free ones. The busy processes are plain Python loops, one per
busy core (``--busy``, default: all usable cores but one). Every run fits the same simulated
IVIM signals (Epstein's b-values, SNR 30, S0 = 1000) with :func:`qmri_labels.fit_volume`; the
time is the median of ``--repeats`` runs. The ratios are against the idle run with torch's
default in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from qmri_labels import fit_volume
from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.threads import busy_cores, resolve_threads, usable_cores


def timed_fit(signals, estimator: str, threads, repeats: int) -> tuple[float, int]:
    """(median seconds, threads used) of ``repeats`` fits."""
    used = resolve_threads(threads)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit_volume(signals, protocol=EPSTEIN_BVALUES, estimator=estimator, sigma=1000.0 / 30.0, threads=used)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), used


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=30000)
    parser.add_argument("--busy", type=int, default=None, help="busy processes (default: usable cores - 1)")
    parser.add_argument("--estimator", default="mle", help="'mle' or a shipped network's name")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cores = usable_cores()
    n_busy = max(1, cores - 1) if args.busy is None else args.busy
    default_threads = torch.get_num_threads()
    signals = (DatasetSpec(n=args.voxels, snr=30, seed=0).generate().signals * 1000.0).astype(np.float32)
    for threads in sorted({1, default_threads}):  # warm-up: thread pools and first-call costs untimed
        fit_volume(signals, protocol=EPSTEIN_BVALUES, estimator=args.estimator, sigma=1000.0 / 30.0, threads=threads)

    print(f"{args.voxels} voxels, estimator {args.estimator}, {cores} usable cores, torch default "
          f"{default_threads} threads, median of {args.repeats}")
    print(f"other processes before the idle runs: {busy_cores(0.5):.2f} busy cores")
    rows = {}
    rows["idle, torch default"] = timed_fit(signals, args.estimator, default_threads, args.repeats)
    rows["idle, auto"] = timed_fit(signals, args.estimator, "auto", args.repeats)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_busy)]
    try:
        time.sleep(1.0)
        print(f"with {n_busy} busy process(es): {busy_cores(0.5):.2f} busy cores")
        rows[f"{n_busy} busy, torch default"] = timed_fit(signals, args.estimator, default_threads, args.repeats)
        rows[f"{n_busy} busy, auto"] = timed_fit(signals, args.estimator, "auto", args.repeats)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()

    baseline = rows["idle, torch default"][0]
    print(f"{'run':28s} {'threads':>7s} {'seconds':>8s} {'vs idle default':>15s}")
    for name, (seconds, used) in rows.items():
        print(f"{name:28s} {used:7d} {seconds:8.2f} {seconds / baseline:14.2f}x")
    busy_default, busy_auto = rows[f"{n_busy} busy, torch default"][0], rows[f"{n_busy} busy, auto"][0]
    print(f"beside busy processes, auto is {busy_default / busy_auto:.1f}x faster than torch's default")


if __name__ == "__main__":
    main()
