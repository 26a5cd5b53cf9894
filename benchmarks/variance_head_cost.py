"""What the variance head costs a training, and that it leaves the point estimates alone.

:func:`qmri_labels.search.tuning.tune` trains its trials without the study's ``uncertainty=
"variance_head"``: the head is trained at the detached mean, so the point estimates (and both
tuning criteria) are bit-identical without it. This measures the time that saves, per label,
with the two trainings interleaved in one process (so background load hits both alike), after a
warm-up training::

    python benchmarks/variance_head_cost.py [--n 100000] [--epochs 5] [--repeats 3] [--labels gt self]

Prints, per label, the median seconds with and without the head, their ratio, and whether the
predictions were bit-identical.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qmri_labels.data import DatasetSpec
from qmri_labels.estimators import NetworkEstimator

#: Epstein's b-values (the default study's protocol)
BVALUES = (0, 10, 20, 30, 50, 80, 100, 200, 400, 800)
#: a design that draws dropout masks and uses batch statistics: the cases where a head could
#: plausibly change the mean network's training
DESIGN = dict(dropout=0.1, batch_norm=True, hidden_layers=3, width=40, activation="gelu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--labels", nargs="+", default=["gt", "self"])
    args = parser.parse_args(argv)
    data = DatasetSpec(n=args.n, seed=1, snr=30, protocol=BVALUES).generate()
    common = dict(max_epochs=args.epochs, patience=0, progress=False, num_threads=1, accelerator="cpu",
                  devices=1, **DESIGN)
    # warm-up: the first training in a process pays one-off costs (imports, kernels)
    NetworkEstimator(label="gt", **{**common, "max_epochs": 1}).fit(data)
    for label in args.labels:
        seconds = {"variance_head": [], None: []}
        predictions = {}
        for _ in range(args.repeats):
            for head in seconds:
                est = NetworkEstimator(label=label, uncertainty=head, **common)
                t0 = time.perf_counter()
                est.fit(data)
                seconds[head].append(time.perf_counter() - t0)
                predictions[head] = est.predict(data.signals[:2000])
        with_head, without = (float(np.median(seconds[h])) for h in ("variance_head", None))
        same = np.array_equal(predictions["variance_head"], predictions[None])
        print(f"{label}: {with_head:.2f} s with the head, {without:.2f} s without (median of {args.repeats}), "
              f"ratio {with_head / without:.2f}; point estimates bit-identical: {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
