"""Train the QSM U-Net with DDP on CPU processes; run by ``tests/training/test_qsm_ddp.py`` (not a test itself).

    python tests/qsm_ddp_train.py OUT_DIR N_PROCESSES

Lightning's launcher (``strategy="ddp"``, ``devices=N``) starts the other ranks by running this
script again. Three fits: ``bn`` (the toy U-Net with batch norm, a validation set of 3 volumes
that does not split evenly over 2 ranks, a checkpoint path per launching rank), ``nobn``
(batch norm off: the run that must equal one process with the same global batch) and ``ens``
(two ``nobn`` members with seeds 3 and 4, one Trainer each). Every rank
writes what it holds (``<fit>_rank<r>.json`` with the SHA-256 of its state dict and its
history, ``<fit>_rank<r>_state.pt``); ``save`` writes the bundle on rank 0 only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_train import state_sha256  # noqa: E402  (one digest of a state dict for both DDP scripts)

#: tiny phantoms; 3 validation volumes do not split evenly over 2 ranks
TRAIN = {"shape": (16, 16, 16), "n": 2, "n_orientations": 1, "noise_sigma": 0.002, "seed": 7}
VALIDATION = {"shape": (16, 16, 16), "n": 3, "n_orientations": 1, "noise_sigma": 0.002, "seed": 8}
#: global batch 4 of 8^3 patches, 8 patches per epoch (2 steps), 2 epochs; graf's loss (two terms)
SETTINGS = {"label": "graf", "preset": "toy", "inputs": ("field", "tkd"), "patch_size": 8, "samples_per_epoch": 8,
            "batch_size": 4, "max_epochs": 2, "lr": 3e-3, "seed": 3, "device": "cpu", "progress": False}
#: ``ens``: a deep ensemble of two ``nobn`` networks (member 0 must be the ``nobn`` fit itself)
FITS = {"bn": {}, "nobn": {"unet": {"batch_norm": False}}, "ens": {"unet": {"batch_norm": False}, "n_members": 2}}


def phantoms():
    from qmri_labels.data.qsm import QSMPhantomSpec

    return QSMPhantomSpec(**TRAIN).generate(), QSMPhantomSpec(**VALIDATION).generate()



def main(out: str, processes: int) -> None:
    from qmri_labels.estimators import QSMEstimator

    torch.set_num_threads(1)
    out = Path(out)
    train, validation = phantoms()
    # LOCAL_RANK is set only in the processes Lightning starts: each launching rank names its own path
    launcher = os.environ.get("LOCAL_RANK", "0")
    for name, extra in FITS.items():
        checkpoint = out / f"{name}_ckpt_from_rank{launcher}" if name == "bn" else None
        est = QSMEstimator(**SETTINGS, **extra, checkpoint_path=checkpoint, accelerator="cpu", devices=processes,
                           strategy="ddp")
        est.fit(train, validation=validation)
        rank = est.global_rank_
        state = est.network_.state_dict()
        torch.save(state, out / f"{name}_rank{rank}_state.pt")
        (out / f"{name}_rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": est.world_size_, "sha256": state_sha256(state),
            "history": [{k: v for k, v in row.items() if k != "time_s"} for row in est.history_],
            "best_epoch": est.best_epoch_}))
        est.save(out / f"{name}_bundle_from_rank{rank}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
