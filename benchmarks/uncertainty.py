"""Cost and coverage of MLE uncertainty.

Cost: the time of ``fit_mle(..., uncertainty=True)`` (Wald standard errors from the Fisher
information at the estimate) over that of the point estimate alone, both in this process on the
same Rician IVIM data (Epstein's 10 b-values, SNR 30); target <= 2x.

    python benchmarks/uncertainty.py cost [--n 100000] [--repeats 3]

Coverage: how often the MLE's 95 % Wald interval holds the truth on the default evaluation grid
(``GridSpec()``: 10 x 10 x 10 values of f, D, D* over Epstein's prior, Rician noise) at each SNR,
and, on every ``--stride``-th grid point with ``--boot-repeats`` repeats, the Wald and the
parametric-bootstrap (percentile) interval side by side.

    python benchmarks/uncertainty.py coverage [--snr 30 15] [--repeats 100] [--stride 5]
        [--boot-repeats 10] [--n-boot 100] [--out table.csv]

Networks: a first look at how the training label changes calibration, until ``NetworkEstimator``
grows ``uncertainty="heteroscedastic"`` and ``n_members``: heteroscedastic MLPs trained with the
Gaussian NLL of GT and of MLE labels, a self-supervised one with the Rician signal-space NLL (its
SD: the Fisher SD at its prediction and its inferred noise level), and a deep ensemble of plain
GT-label MLPs, all with a plain PyTorch loop, evaluated with ``evaluate_calibration``.

    python benchmarks/uncertainty.py networks [--n 20000] [--epochs 20] [--members 3]

Columns: ``reported`` (fraction of fits with a Wald SE; the others sit on a bound or are not
identifiable), ``wald_reported`` (coverage among those), ``wald_all`` (unreported fits count as
misses), ``boot`` (percentile bootstrap, every fit has an interval).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from qmri_labels.analysis import GridSpec
from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.bootstrap import bootstrap_interval


def cost(n: int, repeats: int) -> None:
    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, noise="rician", n=n, seed=0).generate()
    fit_mle(data.signals[:2000], data.protocol, sigma=data.sigma[:2000], uncertainty=True)  # warm-up
    best = {False: np.inf, True: np.inf}
    for _ in range(repeats):
        for flag in (False, True):  # interleaved, so that load changes hit both alike
            start = time.perf_counter()
            fit_mle(data.signals, data.protocol, sigma=data.sigma, uncertainty=flag)
            best[flag] = min(best[flag], time.perf_counter() - start)
    print(f"{n} voxels, best of {repeats}: point estimate {best[False]:.2f} s, with standard errors "
          f"{best[True]:.2f} s, ratio {best[True] / best[False]:.3f} (target <= 2)")


def _hits(low, high, truth):
    return (truth >= low) & (truth <= high)


def coverage(snrs, repeats: int, stride: int, boot_repeats: int, n_boot: int, out: str | None) -> None:
    rows = []
    for snr in snrs:
        grid = GridSpec(snr=snr, repeats=repeats)
        signals = grid.signals().astype(np.float32)
        g, r, m = signals.shape
        truth = np.repeat(grid.truth, r, axis=0)
        start = time.perf_counter()
        fit = fit_mle(signals.reshape(-1, m), grid.protocol, sigma=grid.sigma, uncertainty=True)
        seconds = time.perf_counter() - start
        low, high = fit.interval(0.95)
        hit = _hits(low, high, truth)
        reported = np.isfinite(fit.sd)
        # subset: every stride-th point, the first boot_repeats repeats, both intervals
        sub = (np.arange(g)[::stride][:, None] * r + np.arange(min(boot_repeats, r))[None, :]).ravel()
        sub_fit = fit_mle(signals.reshape(-1, m)[sub], grid.protocol, sigma=grid.sigma, uncertainty=True)
        b_low, b_high = bootstrap_interval(sub_fit, grid.protocol, level=0.95, n_boot=n_boot, seed=0)
        s_low, s_high = sub_fit.interval(0.95)
        for i, name in enumerate(fit.param_names):
            rows.append({
                "snr": snr, "parameter": name, "n_fits": hit.shape[0],
                "reported": reported[:, i].mean(),
                "wald_reported": hit[reported[:, i], i].mean(),
                "wald_all": hit[:, i].mean(),
                "n_subset": sub.size,
                "subset_wald_all": _hits(s_low, s_high, truth[sub])[:, i].mean(),
                "subset_boot": _hits(b_low, b_high, truth[sub])[:, i].mean(),
                "subset_boot_halfwidth_median": np.median(0.5 * (b_high - b_low)[:, i]),
                "subset_wald_halfwidth_median": np.nanmedian(0.5 * (s_high - s_low)[:, i]),
                "fit_seconds": seconds,
            })
        print(f"SNR {snr}: done ({seconds:.1f} s for {hit.shape[0]} fits)", flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(table.drop(columns=["fit_seconds"]))
    if out:
        from qmri_labels.fileio import write_text

        write_text(out, table.to_csv(index=False))


def _train(network, loss_fn, tensors, epochs: int, seed: int, lr: float = 1e-3, batch: int = 256):
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    n = tensors["signals"].shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch):
            opt.zero_grad()
            loss = loss_fn(network(tensors["signals"][idx]), {k: v[idx] for k, v in tensors.items()})
            loss.backward()
            opt.step()
    return network.eval()


def networks(n: int, epochs: int, members: int, snr: float, out: str | None) -> None:
    import torch

    from qmri_labels.analysis import evaluate_calibration, summarize_calibration
    from qmri_labels.estimators import MLEEstimator
    from qmri_labels.nets import MLP
    from qmri_labels.nets.ensemble import DeepEnsemble
    from qmri_labels.nets.heteroscedastic import HeteroscedasticNet
    from qmri_labels.physics import get_model
    from qmri_labels.training import ParameterNormalisation, parameter_mse, resolve_weights
    from qmri_labels.training.likelihood_losses import HeteroscedasticLabelLoss, signal_space_sd

    torch.set_num_threads(1)
    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=snr, noise="rician", n=n, seed=0).generate()
    model = get_model("ivim")
    norm = ParameterNormalisation.from_support(data.prior_support, model.param_names)
    shift, scale = data.signals.mean(0), data.signals.std(0)
    labels = fit_mle(data.signals, data.protocol, sigma=data.sigma).params
    keep = np.all(np.isfinite(labels), axis=1)
    tensors = {"signals": torch.as_tensor(data.signals[keep]), "theta": torch.as_tensor(data.theta_true[keep]),
               "mle": torch.as_tensor(labels[keep], dtype=torch.float32)}

    def mlp(seed):
        torch.manual_seed(seed)
        return MLP(10, 4, bounds=model.default_bounds, input_shift=shift, input_scale=scale)

    estimators = {"mle": MLEEstimator(protocol=data.protocol, sigma=data.sigma[0])}
    for label in ("gt", "mle", "self"):
        n_var = 1 if label == "self" else 4
        net = HeteroscedasticNet(mlp(0), 10, n_var, scale=None if label == "self" else norm.scale)
        loss = HeteroscedasticLabelLoss(resolve_weights(label), "ivim", data.protocol, norm, noise="rician")
        _train(net, lambda out, batch, loss=loss: loss(out, batch)[0], tensors, epochs, seed=0)

        def predict(signals, net=net, label=label):
            with torch.no_grad():
                mean, log_var = net(torch.as_tensor(signals))
            if label == "self":
                return mean.numpy(), signal_space_sd("ivim", mean.numpy(), data.protocol, log_var.numpy(), "rician")
            return mean.numpy(), net.sd(log_var).numpy()

        estimators[f"net-{label}-hetero"] = predict
    norm_scale = torch.tensor(norm.scale, dtype=torch.float32)
    trained = [_train(mlp(100 + k), lambda out, batch: parameter_mse(out, batch["theta"], norm_scale), tensors, epochs,
                      seed=100 + k) for k in range(members)]
    ensemble = DeepEnsemble(trained)

    def predict_ensemble(signals):
        with torch.no_grad():
            mean, sd = ensemble(torch.as_tensor(signals))
        return mean.numpy(), sd.numpy()

    estimators[f"net-gt-ensemble{members}"] = predict_ensemble
    axes = {name: tuple(np.linspace(lo, hi, 5)) for name, lo, hi in
            zip(model.param_names[1:], data.prior_support[0, 1:], data.prior_support[1, 1:])}
    grid = GridSpec(axes=axes, repeats=50, snr=snr, seed=1)
    summary = summarize_calibration(evaluate_calibration(estimators, grid))
    cols = ["method", "parameter", "coverage_50", "coverage_95", "mean_halfwidth_95", "crps", "z_rms",
            "reported_fraction"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(summary[cols])
    if out:
        from qmri_labels.fileio import write_text

        write_text(out, summary.to_csv(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--n", type=int, default=100_000)
    c.add_argument("--repeats", type=int, default=3)
    v = sub.add_parser("coverage")
    v.add_argument("--snr", type=float, nargs="+", default=[30.0, 15.0])
    v.add_argument("--repeats", type=int, default=100)
    v.add_argument("--stride", type=int, default=5)
    v.add_argument("--boot-repeats", type=int, default=10)
    v.add_argument("--n-boot", type=int, default=100)
    v.add_argument("--out", default=None)
    w = sub.add_parser("networks")
    w.add_argument("--n", type=int, default=20_000)
    w.add_argument("--epochs", type=int, default=20)
    w.add_argument("--members", type=int, default=3)
    w.add_argument("--snr", type=float, default=30.0)
    w.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.mode == "cost":
        cost(args.n, args.repeats)
    elif args.mode == "networks":
        networks(args.n, args.epochs, args.members, args.snr, args.out)
    else:
        coverage(args.snr, args.repeats, args.stride, args.boot_repeats, args.n_boot, args.out)


if __name__ == "__main__":
    main()
