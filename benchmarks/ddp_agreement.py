"""DDP against one process: the same network from the same data, seed and global batch?

Trains a ``NetworkEstimator`` on IVIM signals with ``strategy="ddp"`` on several CPU processes
(gloo; Lightning's launcher starts the other ranks by running this script again), then the
same estimator in one process, and prints the SHA-256 of every rank's weights, the largest
weight and prediction differences to the one-process network, and both loss histories.

    python benchmarks/ddp_agreement.py [--n 20000] [--epochs 1] [--processes 2] [--batch-size 256]
        [--label gt]

Exact equality is not expected across world sizes: each step's gradient is the mean of
per-rank means (summed in another order); see the guide's "Scaling out".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _estimator(args, **device):
    from qmri_labels.estimators import NetworkEstimator

    return NetworkEstimator(label=args.label, alpha=0.5, batch_size=args.batch_size, max_epochs=args.epochs,
                            patience=0, seed=args.seed, num_threads=1, progress=False, **device)


def _dataset(args):
    from qmri_labels.data import DatasetSpec

    return DatasetSpec(n=args.n, seed=args.seed).generate()


def _sha256(state) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ddp_stage(args) -> None:
    """One rank of the DDP run (this script, started by Lightning for every rank)."""
    dataset = _dataset(args)
    est = _estimator(args, accelerator="cpu", devices=args.processes, strategy="ddp").fit(dataset)
    out = Path(args.out)
    torch.save(est.network_.state_dict(), out / f"rank{est.global_rank_}.pt")
    (out / f"rank{est.global_rank_}.json").write_text(json.dumps({"history": est.history_}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="IVIM training signals")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2, help="DDP processes (CPU, gloo)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (over all processes)")
    parser.add_argument("--label", default="gt", choices=["gt", "self", "hybrid"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=["compare", "ddp"], default="compare", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage == "ddp":
        ddp_stage(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, os.path.abspath(__file__), "--stage", "ddp", "--out", tmp,
                   "--n", str(args.n), "--epochs", str(args.epochs), "--processes", str(args.processes),
                   "--batch-size", str(args.batch_size), "--label", args.label, "--seed", str(args.seed)]
        subprocess.run(command, check=True)
        states = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(args.processes)]
        histories = [json.loads((Path(tmp) / f"rank{r}.json").read_text())["history"] for r in range(args.processes)]
    dataset = _dataset(args)
    single = _estimator(args, accelerator="cpu", devices=1).fit(dataset)
    reference = single.network_.state_dict()
    for rank, state in enumerate(states):
        print(f"rank {rank}: weights SHA-256 {_sha256(state)}")
    print(f"one process: weights SHA-256 {_sha256(reference)}")
    print(f"ranks bit-identical: {len({_sha256(s) for s in states}) == 1}; "
          f"histories identical: {all(h == histories[0] for h in histories)}")
    diff = max(float((reference[k] - states[0][k]).abs().max()) for k in reference)
    print(f"max |weight(DDP, {args.processes} processes) - weight(1 process)|: {diff:.3g}")
    net = single.network_
    with torch.inference_mode():
        x = torch.as_tensor(dataset.signals[:5000])
        ours = net(x)
        net.load_state_dict(states[0])
        theirs = net(x)
    rel = ((ours - theirs).abs().amax(0) / ours.abs().amax(0)).tolist()
    print("max relative prediction difference per parameter: "
          + ", ".join(f"{p} {r:.2g}" for p, r in zip(single.param_names_, rel)))
    for name, history in (("DDP", histories[0]), ("1 process", single.history_)):
        print(f"{name:10s} " + "; ".join(f"epoch {h['epoch']}: train {h['train_loss']:.6f}, val {h['val_loss']:.6f}"
                                         for h in history))


if __name__ == "__main__":
    main()
