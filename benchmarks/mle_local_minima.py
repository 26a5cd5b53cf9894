"""How often does fit_mle end in a worse local minimum than a multi-start reference?

Rician IVIM voxels (Epstein's 10 b-values, SNR 30 by default, Epstein's prior) are fitted by
``fit_mle`` and by the per-voxel scipy L-BFGS-B reference from many starts
(:func:`qmri_labels.fitting.reference.fit_multistart`: a 4 x 4 (f, D*) grid plus the true
parameters), both in the same box. A voxel *fails* when fit_mle's NLL exceeds the reference's by
more than ``--gap`` (default 0.1; the failures that prompted this check had gaps of 3.8 and 5.8).

    python benchmarks/mle_local_minima.py --n 10000 [--workers 2] [--cache ref.npz]

The scipy reference is slow (about 0.3-1 s per voxel and core); ``--cache`` keeps it for later
runs. ``--reference torch`` runs the same starts (and fit_mle's segmented estimate) in float64
with the fitter's own step, each to full convergence: fast enough for 100,000 voxels, and a
check of the choice of basin rather than of the solver.
Prints the failure rate of fit_mle at its defaults and, with ``--compare n_starts=5,probe_iter=2``,
of other settings too, with the throughput of each measured in this process (a ratio between
settings is meaningful under load; the absolute voxels/s is not).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np

from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.reference import fit_multistart

BOXES = {
    # the box of the report: f in [0, 1], D in [0, 0.005], D* in [0.003, 0.3], S0 in [0, 2]
    "epstein": np.array([[0.0, 0.0, 0.0, 0.003], [2.0, 1.0, 0.005, 0.3]]),
}


def _reference_one(args):
    signal, bvalues, sigma, bounds, truth = args
    theta, nll = fit_multistart(signal, bvalues, sigma, bounds, extra_starts=[truth])
    return nll, theta


def reference(data, bounds, workers):
    jobs = [(data.signals[i].astype(np.float64), np.asarray(data.protocol), float(data.sigma[i]), bounds,
             data.theta_true[i].astype(np.float64)) for i in range(len(data))]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            out = pool.map(_reference_one, jobs, chunksize=64)
    else:
        out = [_reference_one(job) for job in jobs]
    return np.array([o[0] for o in out]), np.stack([o[1] for o in out])


def torch_reference(data, bounds, chunk: int = 20000):
    """The same 18 starts as the scipy reference (the (f, D*) grid, the segmented estimate's
    scale and D, the truth) plus fit_mle's own segmented estimate, each iterated to full
    convergence (tol 1e-10, 500 iterations) in float64 with the fitter's Levenberg-Marquardt
    step; the best NLL per voxel. About 1000x faster than the scipy reference; it checks the
    choice of basin, not the solver (the scipy one checks both)."""
    import torch

    from qmri_labels.fitting.likelihood import full_nll, nll_and_grad_terms
    from qmri_labels.fitting.lm import LevenbergMarquardt
    from qmri_labels.fitting.reference import MULTISTART_GRID
    from qmri_labels.physics import get_model

    model = get_model("ivim")
    b = torch.as_tensor(np.asarray(data.protocol, dtype=np.float64))
    lo_all, hi_all = (torch.as_tensor(row, dtype=torch.float64) for row in bounds)
    solver = LevenbergMarquardt(model, b, nll_and_grad_terms("rician"), 1e-10)
    nll, theta = np.empty(len(data)), np.empty((len(data), 4))
    for start in range(0, len(data), chunk):
        sl = slice(start, min(start + chunk, len(data)))
        y = torch.as_tensor(data.signals[sl], dtype=torch.float64)
        sigma = torch.as_tensor(data.sigma[sl], dtype=torch.float64)[:, None]
        n = y.shape[0]
        init = model.initial_estimate(y, b)
        grid = []
        for f, dstar in MULTISTART_GRID:
            point = init.clone()
            point[:, 1], point[:, 3] = f, dstar
            grid.append(point)
        truth = torch.as_tensor(data.theta_true[sl], dtype=torch.float64)
        starts = torch.stack(grid + [init, truth], dim=1)
        count = starts.shape[1]
        starts = torch.minimum(torch.maximum(starts, lo_all), hi_all).reshape(-1, 4)
        rows = torch.arange(n).repeat_interleave(count)
        batch = solver.start(starts, y[rows], sigma[rows], lo_all.expand(n * count, 4), hi_all.expand(n * count, 4))
        solver.iterate(batch, 500)
        best = batch.obj.reshape(n, count).argmin(-1) + torch.arange(n) * count
        theta[sl] = batch.theta[best].numpy()
        nll[sl] = full_nll(y, model.forward(batch.theta[best], b), sigma, "rician").numpy()
    return nll, theta


def parse_settings(text: str) -> dict:
    settings = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        settings[key.strip()] = type_of(key.strip())(value)
    return settings


def type_of(key):
    return float if key == "tol" else int


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=float, default=0.1, help="NLL excess over the reference that counts as a failure")
    parser.add_argument("--reference", choices=("scipy", "torch"), default="scipy",
                        help="scipy: L-BFGS-B from 18 starts (slow: ~0.3 s per voxel and core); torch: the "
                             "same starts in float64 with the fitter's step, each to full convergence")
    parser.add_argument("--workers", type=int, default=1, help="processes for the scipy reference")
    parser.add_argument("--cache", type=Path, default=None, help="npz file that keeps the reference between runs")
    parser.add_argument("--compare", action="append", default=[], metavar="K=V,K=V",
                        help="other fit_mle settings to measure, e.g. n_starts=5,probe_iter=2")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    args = parser.parse_args(argv)

    bounds = BOXES["epstein"]
    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=args.snr, noise="rician", n=args.n, seed=args.seed).generate()
    key = f"n{args.n}-snr{args.snr:g}-seed{args.seed}-{args.reference}"
    if args.cache is not None and args.cache.is_file() and str(np.load(args.cache)["key"]) == key:
        with np.load(args.cache) as npz:
            ref_nll, ref_theta = npz["nll"], npz["theta"]
        print(f"reference from {args.cache}")
    else:
        t0 = time.perf_counter()
        if args.reference == "torch":
            ref_nll, ref_theta = torch_reference(data, bounds)
        else:
            ref_nll, ref_theta = reference(data, bounds, args.workers)
        print(f"{args.reference} reference: {len(data):,} voxels x 18 starts in {time.perf_counter() - t0:.0f} s")
        if args.cache is not None:
            from qmri_labels.fileio import atomic_write_bytes
            import io

            buf = io.BytesIO()
            np.savez(buf, nll=ref_nll, theta=ref_theta, key=key)
            atomic_write_bytes(args.cache, buf.getvalue())

    print(f"{len(data):,} Rician IVIM voxels, SNR {args.snr:g}, Epstein b-values, box {bounds.tolist()}")
    print(f"{'settings':36s} {'fail > gap':>11s} {'> 0.01':>8s} {'> 1':>6s} {'worst gap':>10s} {'voxels/s':>10s}")
    rates = {}
    for text in ["", *args.compare]:
        settings = parse_settings(text)
        fit_mle(data.signals[:2000], data.protocol, sigma=data.sigma[:2000], bounds=bounds, **settings)  # warm-up
        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fit = fit_mle(data.signals, data.protocol, sigma=data.sigma, bounds=bounds, **settings)
            best = min(best, time.perf_counter() - t0)
        gap = fit.nll - ref_nll
        fails = gap > args.gap
        rates[text or "defaults"] = len(data) / best
        print(f"{text or 'defaults':36s} {fails.sum():5d} ({fails.mean():.1e}) {np.sum(gap > 0.01):8d} "
              f"{np.sum(gap > 1):6d} {gap.max():10.3f} {len(data) / best:10,.0f}")
        for i in np.flatnonzero(fails)[:5]:
            print(f"    voxel {i}: fit {np.round(fit.params[i], 5).tolist()} nll {fit.nll[i]:.3f}; reference "
                  f"{np.round(ref_theta[i], 5).tolist()} nll {ref_nll[i]:.3f}; truth {np.round(data.theta_true[i], 5).tolist()}")
    if len(rates) > 1:
        base = rates["defaults"]
        print("throughput relative to the defaults, same process: "
              + ", ".join(f"{k}: {v / base:.2f}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
