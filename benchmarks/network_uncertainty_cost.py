"""Training cost of network uncertainty: a heteroscedastic head, a variance head (trained on the
detached mean) and a deep ensemble against a plain network, as CPU-time ratios measured in one process (interleaved repeats, the first
repeat of each discarded as warm-up), so that a loaded machine distorts both sides alike.

    python benchmarks/network_uncertainty_cost.py --n 20000 --epochs 40 --repeats 3 --members 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qmri_labels.data import DatasetSpec
from qmri_labels.estimators import NetworkEstimator


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="training signals")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per training (no early stopping)")
    parser.add_argument("--repeats", type=int, default=3, help="trainings per variant (first one: warm-up)")
    parser.add_argument("--members", type=int, default=2, help="ensemble members")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (the first is a warm-up)")
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
