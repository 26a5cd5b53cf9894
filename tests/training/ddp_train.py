"""Train one network with DDP on CPU processes; run by ``tests/training/test_ddp.py`` (not a test itself).

    python tests/ddp_train.py OUT_DIR N_PROCESSES

Lightning's launcher (``strategy="ddp"``, ``devices=N``) starts the other ranks by running
this script again. Every rank writes what it holds after training (``rank<r>.json`` with the
SHA-256 of its weights and its loss history, ``rank<r>_state.pt``, ``rank<r>_pred.npy``);
``NetworkEstimator.save`` writes the bundle on rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

#: the data and training settings shared with the one-process reference in the test; 1801
#: training rows do not split evenly over 2 ranks, blocks of 4 steps end mid-epoch, and the loss
#: has two terms (each reduced over ranks)
DATA = {"n": 2001, "seed": 41}
SETTINGS = {"label": "weighted", "weights": {"gt": 0.7, "self": 0.3}, "batch_size": 64, "batches_per_block": 4,
            "max_epochs": 2, "patience": 0, "lr": 3e-3, "seed": 7, "num_threads": 1, "progress": False}
N_PREDICT = 300


def launch(script: Path, out: Path, processes: int, timeout: float = 300) -> None:
    """Run a training script (``script OUT N``) that Lightning turns into ``processes`` gloo ranks;
    the package comes from this checkout and no launcher variable leaks in from the caller."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(script), str(out), str(processes)], env=env, cwd=out,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def state_sha256(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: str, processes: int) -> None:
    from qmri_labels.data import DatasetSpec
    from qmri_labels.estimators import NetworkEstimator

    out = Path(out)
    dataset = DatasetSpec(**DATA).generate()
    estimator = NetworkEstimator(**SETTINGS, accelerator="cpu", devices=processes, strategy="ddp")
    estimator.fit(dataset)
    rank = estimator.global_rank_
    state = estimator.network_.state_dict()
    torch.save(state, out / f"rank{rank}_state.pt")
    np.save(out / f"rank{rank}_pred.npy", estimator.predict(dataset.signals[:N_PREDICT]))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": estimator.world_size_, "sha256": state_sha256(state),
        "history": estimator.history_, "best_epoch": estimator.best_epoch_,
        "best_val_loss": estimator.best_val_loss_}))
    estimator.save(out / "bundle")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))


def gradient_average_worker(rank: int, world: int, init_file: str, rows: list, out: str) -> None:
    """One rank of ``test_ddp``'s check of :func:`average_gradients` (run by torch.multiprocessing)."""
    import torch.distributed as dist

    from qmri_labels.training.distributed import average_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        data = torch.randn(sum(rows), 3, generator=torch.Generator().manual_seed(1))
        start = sum(rows[:rank])
        x = data[start : start + rows[rank]]
        values = [torch.zeros(()), torch.zeros(())]
        if rows[rank]:
            loss = net(x).pow(2).mean()
            loss.backward()
            values = [loss, 2 * loss]
        means, total = average_gradients(list(net.parameters()), rows[rank], values)
        torch.save({"grads": [p.grad.clone() for p in net.parameters()], "means": means.clone(),
                    "total": total.clone()}, Path(out) / f"grad{rank}.pt")
    finally:
        dist.destroy_process_group()
