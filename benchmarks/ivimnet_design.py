"""Self-supervised IVIM on IVIM-NET's simulation protocol: our default design vs IVIM-NET's.

Trains networks on the *same* training signals of ``studies/ivimnet_sim.yaml`` (11 b-values,
Gaussian noise, SNR 20, 100k signals) and reports test NRMSE (RMSE / mean truth) of D, f and
D* at test SNRs 15, 20, 50 and 100, the measure of Kaandorp et al.'s tables::

    python benchmarks/ivimnet_design.py                        # default self, ivimnet self, default gt
    python benchmarks/ivimnet_design.py --methods ivimnet-self --max-epochs 300
    python benchmarks/ivimnet_design.py --tune 12 --tune-n 20000   # + a tuned self network
    python benchmarks/ivimnet_design.py --methods tuned-gt tuned-self --tune 12   # tuned networks only

Methods: ``<design>-<label>`` with design ``default`` (Epstein's MLP), ``ivimnet`` (the
``ivimnet`` preset of :data:`qmri_labels.estimators.DESIGN_PRESETS`); ``tuned-<label>`` runs
:func:`qmri_labels.search.tuning.tune` for that label with ``--tune`` trials, then retrains the best
design on every training signal. Writes a JSON with every number.

``peer-ivimnet`` (optional, never run by default) trains the published IVIM-NET itself, side by
side on the same signals: the ``ivimnet`` package (GPL-3.0, *not* a dependency of qmri_labels;
``pip install ivimnet``), imported here at run time only when this method is asked for::

    python benchmarks/ivimnet_design.py --methods peer-ivimnet default-self default-gt

It is configured through the package's own config objects, ``IVIMNET.deep.net_pars("optim")`` and
``IVIMNET.deep.train_pars("optim")``, unchanged but for the device (always the CPU, one thread).
In ``ivimnet`` 0.1.1 these are: 4 parallel sub-networks (D, f, D*, S0), 2 hidden layers as
wide as the number of b-values (11), batch norm, dropout 0.1, ELU, sigmoid-bounded outputs
D [0, 0.005], f [0, 0.7], D* [0.005, 0.2] mm^2/s, S0 [0, 2] fitted; Adam, lr 3e-5, weight
decay 1e-4, batch 128, at most 500 batches an epoch, 90/10 train/validation split, MSE signal
loss, early stop after 10 epochs without a lower validation loss, no LR scheduler and
``select_best`` False (the network of the last epoch is kept, as published). The package
normalises every signal by its b = 0 measurement itself (training and prediction), drops
training signals it deems not IVIM-like and clips the rest at 1.5, returns zeros for test
signals it deems not IVIM-like (counted in the JSON as ``excluded_by_package``) and returns
``[D, f, D*, S0/S(b=0)]``; D and D* are in mm^2/s because the b-values are in s/mm^2.
Python's, NumPy's and torch's global generators are seeded with :data:`PEER_SEED` (plus the
``--seeds`` index) before its training. Its epochs are read from its printed log.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from qmri_labels import paths
from qmri_labels.data import DatasetSpec
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.fileio import write_json
from qmri_labels.training.reproducibility import seed_everything
# seed index k trains with init_seed = shuffle_seed = k * SEED_STRIDE, as the study's --seeds does
from qmri_labels.workflows.label_fairness import SEED_STRIDE

REPORTED = ("D", "f", "Dstar")
#: Kaandorp et al. 2021, IVIM-NET optim as measured (D / f / D* NRMSE)
IVIMNET_OPTIM = {15: (0.214, 0.263, 0.482), 20: (0.182, 0.233, 0.410), 50: (0.138, 0.192, 0.305),
                 100: (0.131, 0.186, 0.287)}
#: every method trains and predicts on one CPU thread (the benchmark compares like with like)
THREADS = 1
PEER_METHOD = "peer-ivimnet"
#: the global torch / NumPy seed set before the ``ivimnet`` package trains (plus the seed index)
PEER_SEED = 0

#: the network's keywords recorded in the JSON for this benchmark's own methods
RECORDED_PARAMS = ("parallel", "batch_norm", "dropout", "bounds_margin", "hidden_layers", "width", "activation", "lr",
                   "batch_size", "weight_decay", "lr_schedule", "output_bounds", "max_epochs", "patience")


def study_spec(n: int, seed: int = 0) -> DatasetSpec:
    cfg = yaml.safe_load((paths.studies_dir() / "ivimnet_sim.yaml").read_text())
    return DatasetSpec(model="ivim", protocol=tuple(cfg["bvalues"]), prior=cfg["prior"], snr=cfg["snr"],
                       noise=cfg["noise"], n=n, seed=seed)


def import_ivimnet():
    """Import ``IVIMNET.deep`` from the ``ivimnet`` package, only for the ``peer-ivimnet`` method.

    Raises
    ------
    ImportError
        If the package is not installed: it is GPL and deliberately no dependency of qmri_labels.
    """
    try:
        import IVIMNET.deep as deep
    except ImportError as err:
        raise ImportError(f"method {PEER_METHOD!r} runs the published IVIM-NET from the ivimnet package, which "
                          "is not installed (GPL-3.0, deliberately not a dependency of qmri_labels): "
                          "pip install ivimnet") from err
    return deep


class _PackageLog(io.TextIOBase):
    """Swallows the ``ivimnet`` package's printed log and tqdm bars; keeps its per-epoch losses.

    The package reports epochs only by printing them; one short line every ``every`` epochs goes
    to ``echo`` so that a long run still shows progress.
    """

    EPOCH = re.compile(r"Epoch: (\d+);")
    LOSS = re.compile(r"Loss: ([-+.\deE]+), validation_loss: ([-+.\deE]+)")
    TQDM_BAR = re.compile(r"^\s*\d+%\||\d+it \[")
    CHATTER = re.compile(r"^(-+|validation|#+ Saving good model #+|Done)$")

    def __init__(self, echo, every: int = 10):
        self.echo, self.every = echo, every
        self.epochs, self.val_losses, self.stopped_early, self.other = 0, [], False, []
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *done, self._pending = re.split(r"[\r\n]", self._pending + text)
        for line in filter(None, (piece.strip() for piece in done)):
            if match := self.EPOCH.search(line):
                self.epochs = int(match.group(1)) + 1
            elif match := self.LOSS.search(line):
                self.val_losses.append(float(match.group(2)))
                if self.epochs % self.every == 0:
                    print(f"  [{PEER_METHOD}] epoch {self.epochs}: training loss {float(match.group(1)):.3g}, "
                          f"validation loss {self.val_losses[-1]:.3g}", file=self.echo, flush=True)
            elif line.startswith("Done, best val loss"):
                self.stopped_early = True
            elif not (self.TQDM_BAR.search(line) or self.CHATTER.match(line)):
                self.other.append(line)
        return len(text)


class PeerIvimnet:
    """IVIM-NET "optim" as trained and applied by the ``ivimnet`` package, behind this benchmark's
    estimator interface (``fit``, ``predict``, ``n_epochs_``, ``best_epoch_``, ``training_config``).

    Parameters
    ----------
    param_names : tuple of str
        The order of the columns :meth:`predict` returns (must hold S0, f, D and Dstar).
    """

    def __init__(self, param_names, seed: int = PEER_SEED):
        self.seed = int(seed)
        self.deep = import_ivimnet()
        self.version = importlib.metadata.version("ivimnet")
        self.param_names = tuple(param_names)
        if set(self.param_names) != {"S0", "f", "D", "Dstar"}:
            raise ValueError(f"the ivimnet package estimates S0, f, D and Dstar, not {self.param_names}")
        arg = type("IvimnetArguments", (), {})()  # the package's checkarg reads plain attributes
        arg.fig, arg.save_name, arg.norm_data_full = False, "optim", False
        arg.net_pars, arg.train_pars = self.deep.net_pars("optim"), self.deep.train_pars("optim")
        arg.sim, arg.fit = self.deep.sim(), self.deep.lsqfit()  # unused by learn/predict; checkarg asks for them
        arg.train_pars.use_cuda, arg.train_pars.device = False, torch.device("cpu")
        self.arg = self.deep.checkarg(arg)

    def fit(self, data) -> "PeerIvimnet":
        """Train on ``data.signals`` (raw: the package normalises them by S(b=0) itself)."""
        self.bvalues = np.asarray(data.protocol, dtype=np.float64)
        if not np.any(self.bvalues == 0):
            raise ValueError("the ivimnet package normalises by the b = 0 measurement; this protocol has none")
        torch.set_num_threads(THREADS)
        seed_everything(self.seed)
        log = _PackageLog(sys.stdout)
        with _redirected(log):
            self.net = self.deep.learn_IVIM(np.asarray(data.signals, dtype=np.float64), self.bvalues, self.arg)
        self.n_epochs_ = log.epochs
        self.best_epoch_ = int(np.argmin(log.val_losses)) if log.val_losses else None
        self.stopped_early_ = log.stopped_early
        return self

    def predict_with_exclusions(self, signals) -> tuple[np.ndarray, int]:
        """Estimates in ``param_names`` order and the number of signals the package returned as zeros."""
        signals = np.asarray(signals, dtype=np.float64)
        with _redirected(_PackageLog(sys.stdout)):
            D, f, Dstar, S0_relative = self.deep.predict_IVIM(signals, self.bvalues, self.net, self.arg)
        # the package divides each signal by the mean of its b = 0 measurements before estimating
        S0 = S0_relative * signals[:, self.bvalues == 0].mean(axis=1)
        columns = {"S0": S0, "f": f, "D": D, "Dstar": Dstar}
        estimates = np.stack([columns[name] for name in self.param_names], axis=1).astype(np.float32)
        excluded = int(np.sum(np.all(estimates == 0, axis=1)))
        return estimates, excluded

    def predict(self, signals) -> np.ndarray:
        return self.predict_with_exclusions(signals)[0]

    def training_config(self) -> dict:
        """The package's settings as used: its version, device, seed and both config objects."""
        def plain(obj):
            return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in sorted(vars(obj).items())}

        return {"package": f"ivimnet {self.version}", "seed": self.seed, "threads": THREADS,
                "net_pars": plain(self.arg.net_pars), "train_pars": plain(self.arg.train_pars),
                "stopped_early": self.stopped_early_}


@contextlib.contextmanager
def _redirected(log):
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield
    if log.other:
        print("\n".join(f"  [{PEER_METHOD}] {line}" for line in log.other), flush=True)


def nrmse(pred, data) -> dict:
    out = {}
    for name in REPORTED:
        i = data.param_names.index(name)
        truth = data.theta_true[:, i].astype(np.float64)
        out[name] = float(np.sqrt(np.nanmean((pred[:, i] - truth) ** 2)) / truth.mean())
    return out


def slopes(pred, data) -> dict:
    """Sensitivity: least-squares slope of the estimate against the truth (1 ideal, 0 ignores it)."""
    out = {}
    for name in REPORTED:
        i = data.param_names.index(name)
        truth = data.theta_true[:, i].astype(np.float64)
        out[name] = float(np.polyfit(truth, pred[:, i].astype(np.float64), 1)[0])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=["default-self", "ivimnet-self", "default-gt"])
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="epoch budget of the non-default designs (default: the design's own)")
    parser.add_argument("--tune", type=int, default=0, help="trials of a tuned self-supervised network (0: none)")
    parser.add_argument("--tune-n", type=int, default=20_000, help="training signals per tuning trial")
    parser.add_argument("--tune-epochs", type=int, default=30)
    parser.add_argument("--criterion", default="val_loss", choices=["val_loss", "param_rmse"])
    parser.add_argument("--design", default=None,
                        help="JSON of NetworkEstimator keywords: trains method 'custom-self' with them")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every method this many times (other weights and batch order, same data; "
                             "a tuned method is tuned once) and report mean and SD over seeds")
    parser.add_argument("--out", default="ivimnet_design.json")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if PEER_METHOD in args.methods:
        import_ivimnet()  # before any signal is generated: a missing package fails at once

    train = study_spec(args.n_train).generate()
    tests = {snr: study_spec(args.n_test, seed=10 + k).replace(snr=float(snr)).generate()
             for k, snr in enumerate(IVIMNET_OPTIM)}
    common = dict(accelerator="cpu", devices=1, num_threads=THREADS, progress=False)
    results = {"train_fingerprint": train.fingerprint, "n_train": args.n_train, "ivimnet_optim_reported": IVIMNET_OPTIM,
               "methods": {}}
    tuned = [m for m in args.methods if m.startswith("tuned-")]
    if tuned and not args.tune:
        parser.error(f"{', '.join(tuned)} need --tune N (trials)")
    extra = (["tuned-self"] if args.tune and not tuned else []) + (["custom-self"] if args.design else [])
    designs = {}  # a tuned method's design, found once and retrained at every seed

    def train_once(method: str, k: int):
        """The method's network trained at seed index ``k`` (weights and batch order; same data)."""
        seeds = dict(init_seed=k * SEED_STRIDE, shuffle_seed=k * SEED_STRIDE) if k else {}
        if method.startswith("tuned-"):
            label = method.split("-", 1)[1]
            if method not in designs:
                from qmri_labels.search.tuning import tune

                small = study_spec(args.tune_n, seed=5).generate()  # tuning signals: a smaller draw, same spec
                found = tune(label, small, n_trials=args.tune, seed=0, criterion=args.criterion,
                             base=dict(common, max_epochs=args.tune_epochs))
                designs[method] = {**found.tuning_["base"], **found.tuning_["best_params"]}
            # the best design, retrained on every training signal
            est = NetworkEstimator(label=label, **{**common, **designs[method], **seeds})
            if args.max_epochs:
                est.set_params(max_epochs=args.max_epochs)
            return est.fit(train)
        if method == "custom-self":
            return NetworkEstimator(label="self", **{**common, **json.loads(args.design), **seeds}).fit(train)
        if method == PEER_METHOD:
            return PeerIvimnet(train.param_names, seed=PEER_SEED + k).fit(train)
        design, label = method.split("-", 1)
        preset = {"default": "epstein"}.get(design, design)
        est = NetworkEstimator.from_preset(preset, label=label, **common, **seeds)
        if args.max_epochs and design != "default":
            est.set_params(max_epochs=args.max_epochs)
        return est.fit(train)

    for method in args.methods + extra:
        runs = []
        for k in range(args.seeds):
            t0 = time.perf_counter()
            est = train_once(method, k)
            seconds = time.perf_counter() - t0
            if method == PEER_METHOD:
                params = est.training_config()
                predicted = {snr: est.predict_with_exclusions(d.signals) for snr, d in tests.items()}
                excluded = {str(snr): n for snr, (_, n) in predicted.items()}
                predicted = {snr: estimates for snr, (estimates, _) in predicted.items()}
            else:
                params = {k: v for k, v in est.training_config().items() if k in RECORDED_PARAMS}
                predicted = {snr: est.predict(d.signals) for snr, d in tests.items()}
            run = {"seed_index": k, "train_seconds_under_load": seconds, "epochs": est.n_epochs_,
                   "best_epoch": est.best_epoch_, "params": params,
                   "nrmse": {str(snr): nrmse(predicted[snr], d) for snr, d in tests.items()},
                   "sensitivity": {str(snr): slopes(predicted[snr], d) for snr, d in tests.items()}}
            if method == PEER_METHOD:
                run["excluded_by_package"] = excluded
            runs.append(run)
            print(f"{method} (seed {k}): {est.n_epochs_} epochs, {seconds:.0f} s (under load)", flush=True)
        # the first seed's row as before, and the mean and SD over seeds when there are several
        row = dict(runs[0])
        if len(runs) > 1:
            row["seeds"] = runs
            for metric in ("nrmse", "sensitivity"):
                values = {snr: {p: [r[metric][snr][p] for r in runs] for p in REPORTED} for snr in row[metric]}
                row[f"{metric}_mean"] = {snr: {p: float(np.mean(v)) for p, v in d.items()} for snr, d in values.items()}
                row[f"{metric}_sd"] = {snr: {p: float(np.std(v, ddof=1)) for p, v in d.items()} for snr, d in values.items()}
        results["methods"][method] = row
        for snr, d in tests.items():
            ref = IVIMNET_OPTIM[snr]
            if len(runs) > 1:
                r, e = row["nrmse_mean"][str(snr)], row["nrmse_sd"][str(snr)]
                sens, sens_sd = row["sensitivity_mean"][str(snr)], row["sensitivity_sd"][str(snr)]
                print(f"  SNR {snr:>3}, mean (SD) over {len(runs)} seeds: D/f/D* NRMSE "
                      + " / ".join(f"{r[p]:.3f} ({e[p]:.3f})" for p in REPORTED)
                      + f"   (IVIM-NET optim {ref[0]:.3f} / {ref[1]:.3f} / {ref[2]:.3f});  sensitivity "
                      + " / ".join(f"{sens[p]:.2f} ({sens_sd[p]:.2f})" for p in REPORTED), flush=True)
                continue
            r = row["nrmse"][str(snr)]
            k = row["sensitivity"][str(snr)]
            print(f"  SNR {snr:>3}: D/f/D* NRMSE {r['D']:.3f} / {r['f']:.3f} / {r['Dstar']:.3f}   "
                  f"(IVIM-NET optim {ref[0]:.3f} / {ref[1]:.3f} / {ref[2]:.3f});  "
                  f"sensitivity {k['D']:.2f} / {k['f']:.2f} / {k['Dstar']:.2f}"
                  + (f";  {row['excluded_by_package'][str(snr)]} signals returned as zeros (not IVIM-like to the "
                     "package)" if method == PEER_METHOD and row["excluded_by_package"][str(snr)] else ""), flush=True)
        write_json(Path(args.out), results, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
