"""Training throughput: the Lightning path of qmri_labels against a minimal PyTorch loop.

Both train the same MLP (IVIM, Epstein's 10 b-values, 3 hidden layers of width 10, ELU) with
the same loss, batch size, optimiser (Adam) and data, in the same process, alternating
repeats so that background load hits both alike. Samples/s counts training samples only
(validation is switched off in both), after one warm-up epoch.

    python benchmarks/train_throughput.py [--n 100000] [--batch-size 256] [--epochs 3]
        [--repeats 3] [--label gt] [--accelerator cpu] [--threads 1] [--batches-per-block 32]

Prints samples/s of each and the ratio Lightning / plain (target >= 0.9).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import numpy as np
import torch

from qmri_labels.data import DatasetSpec
from qmri_labels.estimators.network_training import quiet_lightning
from qmri_labels.nets import MLP
from qmri_labels.training import (InMemoryDataModule, LabelLoss, LabelRegressor, ParameterNormalisation,
                                  resolve_weights)


def build(dataset, label: str, seed: int):
    model = dataset.model
    torch.manual_seed(seed)
    network = MLP(dataset.signals.shape[1], model.n_params, bounds=model.default_bounds)
    loss = LabelLoss(resolve_weights(label, 0.5), model.name, dataset.protocol,
                     ParameterNormalisation.from_support(dataset.prior_support, model.param_names))
    return network, loss


def plain_loop(dataset, label, batch_size, epochs, seed, device, deterministic=True) -> float:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)  # as Lightning's Trainer(deterministic=...)
    try:
        return _plain_loop(dataset, label, batch_size, epochs, seed, device)
    finally:
        torch.use_deterministic_algorithms(before)


def _plain_loop(dataset, label, batch_size, epochs, seed, device) -> float:
    network, loss = build(dataset, label, seed)
    network, loss = network.to(device), loss.to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    tensors = {"signals": torch.as_tensor(dataset.signals, device=device),
               "theta": torch.as_tensor(dataset.theta_true, device=device)}
    n = dataset.signals.shape[0]
    generator = torch.Generator().manual_seed(seed)

    def epoch():
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.index_select(0, idx) for k, v in tensors.items()}
            optimiser.zero_grad(set_to_none=True)
            total, _ = loss(network(batch["signals"]), batch)
            total.backward()
            optimiser.step()

    epoch()  # warm-up
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        epoch()
    _sync(device)
    return n * epochs / (time.perf_counter() - start), n * epochs / (time.process_time() - cpu)


class _Timer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:  # epoch 0 is the warm-up
            _sync(pl_module.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module):
        _sync(pl_module.device)
        self.stop, self.cpu_stop = time.perf_counter(), time.process_time()


def lightning_path(dataset, label, batch_size, epochs, seed, accelerator, batches_per_block=32,
                   deterministic=True) -> float:
    network, loss = build(dataset, label, seed)
    module = LabelRegressor(network, loss, lr=1e-3, step_batch_size=batch_size)
    data = InMemoryDataModule({"signals": dataset.signals, "theta": dataset.theta_true}, batch_size=batch_size,
                              val_fraction=0.0, shuffle_seed=seed, batches_per_block=batches_per_block)
    timer = _Timer()
    with quiet_lightning(True):
        trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs + 1, callbacks=[timer],
                            logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                            deterministic=deterministic)
        trainer.fit(module, datamodule=data)
    n = dataset.signals.shape[0] * epochs
    return n / (timer.stop - timer.start), n / (timer.cpu_stop - timer.cpu_start)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="gt", choices=["gt", "self"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the study trains with 1: small nets run fastest on one)")
    parser.add_argument("--batches-per-block", type=int, default=32,
                        help="batches per Lightning call (1: one Lightning step per batch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if args.accelerator in ("cuda", "gpu") else "cpu"
    dataset = DatasetSpec(n=args.n, seed=0).generate()
    plain, light = [], []
    for repeat in range(args.repeats):
        plain.append(plain_loop(dataset, args.label, args.batch_size, args.epochs, repeat, device))
        light.append(lightning_path(dataset, args.label, args.batch_size, args.epochs, repeat, args.accelerator,
                                    args.batches_per_block))
        print(f"repeat {repeat}: plain {plain[-1][0]:,.0f} samples/s, lightning {light[-1][0]:,.0f} samples/s")
    plain, light = np.asarray(plain), np.asarray(light)
    ratio = np.median(light[:, 0]) / np.median(plain[:, 0])
    cpu_ratio = np.median(light[:, 1]) / np.median(plain[:, 1])
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"threads {torch.get_num_threads()}, n {args.n}, batch {args.batch_size}, label {args.label}, "
          f"batches per Lightning call {args.batches_per_block}")
    print(f"plain PyTorch loop: {np.median(plain[:, 0]):,.0f} samples/s (median of {args.repeats})")
    print(f"Lightning path:     {np.median(light[:, 0]):,.0f} samples/s (median of {args.repeats})")
    print(f"ratio Lightning / plain: {ratio:.3f}")
    # per CPU second: robust to other processes on a shared machine (CPU only)
    print(f"ratio per CPU second:    {cpu_ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
