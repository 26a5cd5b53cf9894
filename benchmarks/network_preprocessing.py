"""RMSE of the shipped IVIM networks through the mapping path, with the preprocessing they were
trained with (recorded in the bundle) against the per-voxel b = 0 division the fit command used
before (which feeds a noise-free b = 0 of exactly 1 to networks trained on noisy, unnormalised
signals).

    python benchmarks/network_preprocessing.py [--n 20000] [--scale 1000] [--seed 123]

Data: each network's own training distribution (its manifest's ``train_spec``: model, protocol,
prior with S0 ~ U(0.8, 1.2), Rician SNR) with a new seed, multiplied by ``--scale`` (intensity
units of a scanner), mapped with :func:`qmri_labels.maps.fit_volume`. Prints the RMSE of each
parameter (S0 relative to the scale) for both preprocessings and the network's own prediction on
the unscaled signals (what it was validated on).

Then, per network, what ``predict``'s automatic scale does to voxels predicted in parts rather
than as one scan: the voxels sorted by true S0 (the worst case: each part's median differs most
from the scan's) and predicted a tenth at a time, against the whole set at once. Prints the
median and 95th percentile of the relative difference per parameter, and the median of that
difference over the estimate's own error. ``fit_volume`` and ``qmri-fit`` compute one scale for
the whole scan; a caller predicting parts should pass ``signal_scale=network.signal_scale(scan)``.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from qmri_labels.data import DatasetSpec
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.maps import fit_volume
from qmri_labels.paths import models_dir


def rmse(estimate, truth):
    return np.sqrt(np.nanmean((estimate - truth) ** 2, axis=0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--scale", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    for bundle in sorted(models_dir().glob("ivim_*")):
        network = NetworkEstimator.load(bundle)
        spec = DatasetSpec.from_dict(network.train_spec_).replace(n=args.n, seed=args.seed)
        data = spec.generate()
        signals = data.signals.astype(np.float64) * args.scale
        truth = data.theta_true.astype(np.float64).copy()
        rows = {"native (unscaled, network.predict)": network.predict(data.signals).astype(np.float64)}
        after = fit_volume(signals, protocol=data.protocol, estimator=network).params.astype(np.float64)
        before_net = copy.copy(network)
        per_voxel = {"kind": "per_voxel_lowest_b", "reference": 1.0}
        before_net.manifest_ = {**network.manifest_, "preprocessing": per_voxel}
        before_net.preprocessing_ = per_voxel
        before = fit_volume(signals, protocol=data.protocol, estimator=before_net).params.astype(np.float64)
        for out in (after, before):
            out[:, 0] /= args.scale
        rows["before: per-voxel b=0 division"] = before
        rows["after: recorded preprocessing"] = after
        print(f"{bundle.name}  (n = {args.n}, SNR {spec.snr:g}, scale {args.scale:g})")
        print(f"  {'':38s}" + "".join(f"{p:>11s}" for p in network.param_names))
        for label, estimate in rows.items():
            print(f"  {label:38s}" + "".join(f"{v:11.5f}" for v in rmse(estimate, truth)))
        change = 100 * (rmse(before, truth) / rmse(after, truth) - 1)
        print(f"  {'RMSE before / after - 1 (%)':38s}" + "".join(f"{v:11.1f}" for v in change))
        order = np.argsort(truth[:, 0])
        whole = network.predict(signals[order]).astype(np.float64)
        parts = np.concatenate([network.predict(part) for part in np.array_split(signals[order], 10)])
        difference = np.abs(parts - whole)
        relative = difference / np.abs(whole).clip(1e-12)
        error = np.abs(whole - truth[order] * np.r_[args.scale, np.ones(truth.shape[1] - 1)])
        print(f"  {'parts / whole: median rel. diff (%)':38s}" + "".join(f"{v:11.2f}" for v in
                                                                           100 * np.median(relative, 0)))
        print(f"  {'parts / whole: p95 rel. diff (%)':38s}" + "".join(f"{v:11.2f}" for v in
                                                                        100 * np.percentile(relative, 95, 0)))
        print(f"  {'parts / whole: median diff / error':38s}" + "".join(
            f"{v:11.3f}" for v in np.median(difference / error.clip(1e-12), 0)))


if __name__ == "__main__":
    main()
