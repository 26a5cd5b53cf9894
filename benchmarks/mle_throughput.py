"""Throughput of the batched MLE fitter against a per-voxel scipy L-BFGS-B baseline.

Both fit the same Rician IVIM data (Epstein's 10 b-values, SNR 30) with the same likelihood and
bounds; the baseline runs on a few hundred voxels (it is slow), the batched fitter on many.
Every rate is measured in this one process, so the ratios hold on a loaded machine even where
the absolute voxels/s do not.

    python benchmarks/mle_throughput.py [--n 200000] [--n-baseline 300] [--threads N]

Prints voxels/s of four pairings and their ratios:

* matched: scipy from the same starting points as ``fit_mle`` (its segmented estimate and the
  model's extra starts, best NLL kept) at a matched tolerance, against ``fit_mle`` at its
  defaults; and the same with one start each (the segmented estimate);
* strict (the former baseline): scipy from the middle of the prior, one start, at ftol 1e-10 and
  gtol 1e-8, against ``fit_mle`` at its defaults.

The matched tolerance: ``fit_mle`` stops when the predicted NLL decrease falls below ``tol``
(1e-6, absolute); scipy's ``ftol`` is relative to ``max(|NLL|, 1)``, about 50 here, so
``ftol = tol / 50 = 2e-8``, and ``gtol = 1e-5`` (projected gradient; the predicted decrease
``g^2 / 2h`` at that gradient is below 1e-6 for the curvatures of this problem).

On a machine with CUDA also the GPU figure.

    python benchmarks/mle_throughput.py --memory 1000000

fits that many voxels once and prints the rise of the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import inspect
import resource
import time

import numpy as np
import torch

from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.reference import fit_voxel_lbfgsb
from qmri_labels.physics import get_model

BOUNDS = np.array([[0.0, 0.0, 0.0, 0.003], [2.0, 1.0, 0.005, 0.3]])
#: scipy tolerances matched to fit_mle's absolute tol 1e-6 (see the module docstring)
MATCHED = {"ftol": 2e-8, "gtol": 1e-5}
#: the former baseline's tolerances, much stricter than fit_mle's
STRICT = {"ftol": 1e-10, "gtol": 1e-8}
N_STARTS = inspect.signature(fit_mle).parameters["n_starts"].default


def time_batched(data, device, chunk_size=None, repeats=2, **options):
    fit_mle(data.signals[:2000], data.protocol, sigma=data.sigma[:2000], bounds=BOUNDS, device=device,
            **options)  # warm-up
    best = np.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fit = fit_mle(data.signals, data.protocol, sigma=data.sigma, bounds=BOUNDS, device=device,
                      chunk_size=chunk_size, **options)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(data) / best, fit


def fitter_starts(data, n, n_starts):
    """The starting points fit_mle uses for the first ``n`` voxels, (n, n_starts, 4), in the units
    of the data (the model's segmented estimate and its extra starts, inside BOUNDS)."""
    model = get_model("ivim")
    y = torch.as_tensor(data.signals[:n], dtype=torch.float64)
    b = torch.as_tensor(data.protocol, dtype=torch.float64)
    lo = torch.as_tensor(BOUNDS[0]).expand(n, 4)
    hi = torch.as_tensor(BOUNDS[1]).expand(n, 4)
    starts = model.starting_points(model.initial_estimate(y, b), lo, hi, n_starts).numpy()
    return np.clip(starts, BOUNDS[0], BOUNDS[1])


def time_baseline(data, n, starts, tolerances):
    """scipy per voxel from each start in ``starts`` (n, S, 4), the best NLL kept."""
    nll = np.empty(n)
    start = time.perf_counter()
    for i in range(n):
        nll[i] = min(fit_voxel_lbfgsb(data.signals[i], data.protocol, data.sigma[i], s, BOUNDS, **tolerances).fun
                     for s in starts[i])
    return n / (time.perf_counter() - start), nll


def peak_memory(n):
    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, noise="rician", n=n, seed=0).generate()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    fit_mle(data.signals, data.protocol, sigma=data.sigma, bounds=BOUNDS)
    seconds = time.perf_counter() - start
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"fit_mle on {n:,} voxels: {seconds:.1f} s, peak resident memory rose by {rise:,.0f} MB "
          f"(inputs held by the caller: {data.signals.nbytes / 2**20:,.0f} MB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="voxels for the batched fitter")
    parser.add_argument("--n-baseline", type=int, default=300, help="voxels for the scipy baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--chunk-size", type=int, default=None, help="fit_mle chunk size (default: automatic)")
    parser.add_argument("--memory", type=int, default=None, metavar="N",
                        help="only measure the peak-memory rise of one fit of N voxels")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        peak_memory(args.memory)
        return
    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, noise="rician", n=args.n, seed=0).generate()

    n = args.n_baseline
    # the former baseline: the middle of the prior, as a user without our initialisation would start
    middle = np.broadcast_to(np.array([1.0, 0.3, 1.5e-3, 0.08]), (n, 1, 4))
    starts = fitter_starts(data, n, N_STARTS)
    rows = {
        "scipy strict, 1 start (prior middle)": time_baseline(data, n, middle, STRICT),
        f"scipy matched, {N_STARTS} starts (fit_mle's)": time_baseline(data, n, starts, MATCHED),
        "scipy matched, 1 start (segmented)": time_baseline(data, n, starts[:, :1], MATCHED),
    }
    cpu_rate, fit = time_batched(data, "cpu", args.chunk_size)
    one_rate, fit_one = time_batched(data, "cpu", args.chunk_size, n_starts=1)
    print(f"CPU threads: {torch.get_num_threads()}, voxels: {args.n} (scipy: {n}), b-values: {len(EPSTEIN_BVALUES)}")
    for name, (rate, _) in rows.items():
        print(f"{name:40s}: {rate:10,.0f} voxels/s")
    print(f"{'fit_mle CPU, ' + str(N_STARTS) + ' starts (defaults)':40s}: {cpu_rate:10,.0f} voxels/s")
    print(f"{'fit_mle CPU, 1 start':40s}: {one_rate:10,.0f} voxels/s")
    pairs = [(f"fit_mle {N_STARTS} starts / scipy matched {N_STARTS} starts", cpu_rate,
              f"scipy matched, {N_STARTS} starts (fit_mle's)", fit),
             ("fit_mle 1 start / scipy matched 1 start", one_rate, "scipy matched, 1 start (segmented)", fit_one),
             (f"fit_mle {N_STARTS} starts / scipy strict 1 start (former)", cpu_rate,
              "scipy strict, 1 start (prior middle)", fit)]
    for label, rate, base, f in pairs:
        base_rate, base_nll = rows[base]
        quality = np.mean(f.nll[:n] <= base_nll + 1e-4)
        print(f"ratio {label:52s}: {rate / base_rate:8.1f}x; fit_mle NLL <= scipy + 1e-4 in {quality:.1%}")
    print(f"fit_mle converged: {fit.converged.mean():.4f}, stalled: {fit.stalled.mean():.4f}")
    base_rate = rows[f"scipy matched, {N_STARTS} starts (fit_mle's)"][0]
    if torch.cuda.is_available():
        gpu_rate, _ = time_batched(data, "cuda", args.chunk_size)
        name = torch.cuda.get_device_name()
        print(f"fit_mle GPU ({name}): {gpu_rate:12,.0f} voxels/s  ratio {gpu_rate / base_rate:8.1f}x")
    else:
        print("fit_mle GPU              : no CUDA device available")


if __name__ == "__main__":
    main()
