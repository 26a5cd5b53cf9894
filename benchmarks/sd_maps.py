"""The MLE's standard-deviation maps against the spread over noise repeats, and their cost.

    python benchmarks/sd_maps.py [--repeats 300] [--snr 50] [--cost-voxels 20000]

Builds a volume of three known IVIM truths, each repeated ``--repeats`` times with Rician noise
at ``--snr`` (S0 = 1000, Epstein's 10 b-values; the configuration of
``tests/maps/test_mapping.py::test_mle_sd_map_matches_the_spread_over_noise_repeats``), maps it with
``fit_volume(..., uncertainty=True)`` and prints, per truth and parameter, the RMS of the SD
map over the repeats divided by the empirical SD of the estimates (1 = calibrated). Then times
``fit_volume`` with and without ``uncertainty=True`` on ``--cost-voxels`` voxels drawn from the
prior at SNR 30 (the ratio is the cost of the SD maps; under load it is noisy).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qmri_labels.maps import fit_volume
from qmri_labels.physics import get_model

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
TRUTHS = np.array([[1000, 0.2, 0.001, 0.05], [1000, 0.3, 0.0015, 0.08], [1000, 0.25, 0.002, 0.04]])


def rician(theta, sigma, rng):
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(B)).numpy()
    return np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--snr", type=float, default=50.0)
    parser.add_argument("--cost-voxels", type=int, default=20000)
    args = parser.parse_args()
    rng = np.random.default_rng(11)
    sigma = 1000.0 / args.snr
    data = rician(np.repeat(TRUTHS, args.repeats, axis=0).reshape(len(TRUTHS), args.repeats, 4), sigma, rng)
    maps = fit_volume(data, protocol=B, sigma=sigma, uncertainty=True)
    print(f"SNR {args.snr:g}, {args.repeats} repeats: RMS(SD map) / SD(estimates)")
    for i, truth in enumerate(TRUTHS):
        ratios = {n: np.sqrt(np.nanmean(maps.sd_map(n)[i] ** 2)) / np.std(maps[n][i]) for n in maps.param_names}
        print(f"  S0 {truth[0]:g} f {truth[1]:g} D {truth[2]:g} D* {truth[3]:g}: "
              + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()))
    n = args.cost_voxels
    theta = np.stack([rng.uniform(800, 1200, n), rng.uniform(0.1, 0.4, n), rng.uniform(5e-4, 2.5e-3, n),
                      rng.uniform(0.01, 0.1, n)], -1)
    data = rician(theta, 1000.0 / 30, rng)
    for _ in range(2):
        t0 = time.perf_counter()
        fit_volume(data, protocol=B, sigma=1000.0 / 30)
        t1 = time.perf_counter()
        fit_volume(data, protocol=B, sigma=1000.0 / 30, uncertainty=True)
        t2 = time.perf_counter()
        print(f"{n} voxels: point estimates {t1 - t0:.2f} s, with SD maps {t2 - t1:.2f} s, "
              f"ratio {(t2 - t1) / (t1 - t0):.3f}")


if __name__ == "__main__":
    main()
