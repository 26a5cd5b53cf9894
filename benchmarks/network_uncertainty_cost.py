"""Cost of network uncertainty, as CPU-time ratios measured in one process (interleaved repeats,
the first repeat of each discarded as warm-up), so that a loaded machine distorts both sides alike.

Training (IVIM): a heteroscedastic head, a variance head (trained on the detached mean) and a
deep ensemble against a plain network::

    python benchmarks/network_uncertainty_cost.py --n 20000 --epochs 40 --repeats 3 --members 2

Inference (QSM, ``--qsm``): ``QSMEstimator.predict(field, mask, return_sd=True, sd_kind="label")`` of a U-Net
ensemble of ``--members`` networks against ``predict(field, mask)`` of one, on a ``--size``^3
head phantom (masked local field), whole volume on the CPU, the input channels included (the
TV channel of the shipped architecture is computed once and shared by the members, so the
ratio stays below M). The members are copies of the shipped network
(``models/qsm_unet_field-tv_residual_lrelu16``): trained members cost the same. One CPU
thread, as the trainings::

    python benchmarks/network_uncertainty_cost.py --qsm --size 64 --members 5 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def qsm_predict_cost(size: int, members: int, repeats: int) -> dict:
    """CPU seconds of an ensemble's ``predict(..., return_sd=True)`` and of a single network's
    ``predict``, summed over the repeats after the first; printed with their ratio."""
    import copy

    from qmri_labels.data.qsm import QSMPhantomSpec
    from qmri_labels.fitting.qsm_inversion import tv
    from qmri_labels.nets.ensemble import DeepEnsemble
    from qmri_labels.paths import models_dir
    from qmri_labels.estimators import QSMEstimator

    bundle = models_dir() / "qsm_unet_field-tv_residual_lrelu16"
    single = QSMEstimator.load(bundle, device="cpu")
    ensemble = QSMEstimator.load(bundle, device="cpu")
    ensemble.network_ = DeepEnsemble([copy.deepcopy(single.network_) for _ in range(members)]).eval()
    phantom = QSMPhantomSpec(shape=(size,) * 3, n=1, seed=0, field_kind="local").generate()
    field, mask = phantom.field[0], phantom.mask[0]
    seconds = {"single": [], f"ensemble-{members}": [], "tv_channel": []}
    for _ in range(repeats):
        start = time.process_time()
        single.predict(field, mask)
        seconds["single"].append(time.process_time() - start)
        start = time.process_time()
        ensemble.predict(field, mask, return_sd=True, sd_kind="label")
        seconds[f"ensemble-{members}"].append(time.process_time() - start)
        # the shared part: the TV input channel, computed once per prediction
        start = time.process_time()
        tv(field, mask, phantom.voxel_size, single.b0_dir_, lam=float(single.tv_lambda))
        seconds["tv_channel"].append(time.process_time() - start)
    cost = {name: float(np.sum(v[1:])) for name, v in seconds.items()}
    for name, value in cost.items():
        print(f"QSM predict {size}^3 {name:>12s}: {value:8.2f} s CPU over {repeats - 1} predictions, "
              f"ratio to single {value / cost['single']:.2f}")
    networks = (cost[f"ensemble-{members}"] - cost["tv_channel"]) / (cost["single"] - cost["tv_channel"])
    print(f"without the shared TV channel: ratio {networks:.2f} for {members} members")
    return cost


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="training signals (default 20000)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training, no early stopping (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="trainings (or predictions) per variant (first one: "
                                                               "warm-up)")
    parser.add_argument("--members", type=int, default=2, help="ensemble members")
    parser.add_argument("--qsm", action="store_true", help="time QSM U-Net ensemble inference instead of training")
    parser.add_argument("--size", type=int, default=None, help="--qsm: side of the cubic volume, a multiple of 16 "
                                                                "(default 64)")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (the first is a warm-up)")
    if args.members < 2:
        parser.error("--members must be >= 2 (an ensemble)")
    if args.qsm:
        if args.n is not None or args.epochs is not None:
            parser.error("--n and --epochs set the training benchmark; --qsm times inference (--size)")
        import torch

        torch.set_num_threads(1)  # as the trainings below (num_threads=1)
        return qsm_predict_cost(64 if args.size is None else args.size, args.members, args.repeats)
    if args.size is not None:
        parser.error("--size applies with --qsm only")
    from qmri_labels.data import DatasetSpec
    from qmri_labels.estimators import NetworkEstimator

    args.n = 20000 if args.n is None else args.n
    args.epochs = 40 if args.epochs is None else args.epochs
    data = DatasetSpec(n=args.n, seed=1).generate()
    variants = {"plain": {}, "heteroscedastic": {"uncertainty": "heteroscedastic"},
                "variance_head": {"uncertainty": "variance_head"},
                f"ensemble-{args.members}": {"n_members": args.members}}
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, options in variants.items():
            est = NetworkEstimator(label="gt", max_epochs=args.epochs, patience=args.epochs + 1, accelerator="cpu",
                                   progress=False, num_threads=1, **options)
            start = time.process_time()
            est.fit(data)
            seconds[name].append(time.process_time() - start)
    cost = {name: float(np.sum(v[1:])) for name, v in seconds.items()}
    for name, value in cost.items():
        print(f"{name:>18s}: {value:8.2f} s CPU over {args.repeats - 1} trainings, "
              f"ratio to plain {value / cost['plain']:.2f}")
    return cost


if __name__ == "__main__":
    main()
