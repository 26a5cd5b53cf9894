"""The study command: ``python -m qmri_labels.study``.

Runs a complete comparison and writes a results folder. With no flag it runs the default IVIM
label comparison (``studies/default.yaml``: Epstein et al.'s 10 b-values, Rician SNR 30, nets
trained on GT, MLE, self-supervised and hybrid labels, evaluated with the MLE fitter on a
held-out grid)::

    python -m qmri_labels.study --alpha 0.5
    python -m qmri_labels.study --alpha 0.25 0.5 0.75 --snr 15 --n-train 50000
    python -m qmri_labels.study --snr 10 50 --snr-test 10 20 50      # train over an SNR range
    python -m qmri_labels.study --tune 20 --seeds 4                  # tuned vs default, 4 seeds
    python -m qmri_labels.study --tune 20 --storage sqlite:///tune.db --study-name s1   # one search, many runs
    python -m qmri_labels.study --config ivimnet_sim                 # IVIM-NET's simulation protocol
    python -m qmri_labels.study --config tiny_ivim --out runs/smoke --quiet
    python -m qmri_labels.study --model t2             # T2 (32-echo CPMG) with its defaults
    python -m qmri_labels.study --model fatwater --labels gt mle self   # fat-water, with its swaps
    python -m qmri_labels.study --model t2star --protocol 2.6 4.6 6.6 8.6 ms
    python -m qmri_labels.study --model qsm            # the QSM label study
    python -m qmri_labels.study --config mismatch_ivim # any named study in studies/
    python -m qmri_labels.study --list
    python -m qmri_labels.study --config hparam_ivim --storage sqlite:///search.db --study-name s1 --worker

A configuration (YAML) has a ``kind`` that selects the workflow (the table
:data:`qmri_labels.workflows.registry.WORKFLOWS`); keys not given take the workflow's defaults.
Flags override configuration keys; ``--set key=value`` (YAML value, dotted keys for nested
entries) overrides any other.

The results folder (``--out``, default ``runs/<name>-<YYYYMMDD-HHMMSS>`` below the current
folder, ``<name>`` the configuration's, e.g. ``runs/default-20261204-213015``) holds the resolved
``config.yaml``, ``manifest.json`` (seeds, dataset fingerprints, package versions, device,
determinism flags, CPU threads, timings, the command line), the workflow's tables (for the label
comparison ``summary.csv``), report and trained networks.

``--threads N|auto`` caps the CPU threads of the whole study: this process's torch threads and
its worker processes times each job's ``num_threads`` (default ``auto``: the cores that other
processes leave free when the study starts, :mod:`qmri_labels.threads`); the results do not
depend on it.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from qmri_labels import __version__
from qmri_labels.log import add_verbosity_flags, configure_cli_logging
from qmri_labels.paths import DEFAULT_CONFIG
from qmri_labels.physics import available_models, get_model

#: the command's parts shared with run_study (qmri_labels.workflows.run), imported when first used
#: so that --help, --version and a refused flag do not load the workflows (Lightning, Optuna)
_RUN_NAMES = ("MODEL_KINDS", "available_configs", "default_out", "execute_study", "load_config", "prepare_study")


def _threads(text: str):
    """``--threads``' type: :func:`qmri_labels.cli.common.threads_argument`, imported when a value
    is read (the fit command's helpers there load the mapping code, which --help does not need)."""
    from qmri_labels.cli.common import threads_argument

    return threads_argument(text)


def __getattr__(name: str):
    if name in _RUN_NAMES:
        from qmri_labels.workflows import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: flags that override configuration keys (flag destination -> key)
FLAG_KEYS = {"alpha": "alpha", "snr": "snr", "bvalues": "bvalues", "protocol": "protocol", "labels": "labels",
             "n_train": "n_train", "max_epochs": "max_epochs",
             "seed": "seed", "device": "device", "storage": "storage", "study_name": "study_name", "worker": "worker",
             "snr_test": "grid.snr", "tune": "tune.n_trials", "seeds": "seeds",
             "workers": "workers"}


def _model_help() -> str:
    """``--model``'s help: every registered model with its protocol and unit, and qsm."""
    lines = []
    for name in available_models():
        model = get_model(name)
        lines.append(f"{name} ({', '.join(model.param_names)}; {model.protocol_name} in {model.protocol_unit})")
    return ("signal model of the label study: " + "; ".join(lines)
            + "; or qsm for the QSM label study (default: ivim)")


def _protocol_help() -> str:
    """``--protocol``'s help: what the protocol is, per model."""
    by_unit: dict[tuple[str, str], list[str]] = {}
    for name in available_models():
        model = get_model(name)
        by_unit.setdefault((model.protocol_name, model.protocol_unit), []).append(name)
    kinds = "; ".join(f"{what.replace('_', ' ')} in {unit} for {', '.join(names)}"
                      for (what, unit), names in by_unit.items())
    return (f"acquisition protocol in the model's own units ({kinds}); a last value may name the unit "
            "(e.g. --protocol 10 20 40 ms), which must be the model's (default: the model's protocol of "
            "the literature)")


def _workers(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmri-study",
                                     description="\n\n".join(__doc__.split("\n\n")[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Named configurations: see --list.")
    parser.add_argument("--config", help="named configuration in studies/ or a YAML/JSON file "
                                         f"(default: {DEFAULT_CONFIG}, or the --model's default)")
    parser.add_argument("--model", help=_model_help())
    parser.add_argument("--alpha", type=float, nargs="+", help="hybrid weights of the MLE loss, one network each")
    parser.add_argument("--snr", type=float, nargs="+", metavar="SNR",
                        help="signal-to-noise ratio S0 / sigma of the training data; two values LOW HIGH: "
                             "one SNR per voxel, uniform in that range")
    parser.add_argument("--snr-test", type=float, nargs="+", metavar="SNR",
                        help="SNRs of the evaluation grid (default: the training SNR)")
    parser.add_argument("--tune", type=int, metavar="N",
                        help="tune every label's network with N trials (equal budget) and compare tuned vs default")
    parser.add_argument("--seeds", type=int, metavar="K",
                        help="train each method K times with different initialisation and batch order")
    parser.add_argument("--workers", type=_workers, metavar="N",
                        help="label studies: train N networks side by side in worker processes, or 'auto' "
                             "(default: the CPU cores other processes leave free / num_threads, within --threads; "
                             "1 on a GPU); results do not depend on it")
    parser.add_argument("--threads", type=_threads, default="auto", metavar="N|auto",
                        help="CPU threads the study may use in all: this process's torch threads and worker "
                             "processes x num_threads (default auto: the cores other processes leave free now); "
                             "results do not depend on it")
    parser.add_argument("--protocol", nargs="+", metavar="VALUE", help=_protocol_help())
    parser.add_argument("--bvalues", type=float, nargs="+",
                        help="b-values in s/mm^2 (diffusion models; the same as --protocol there)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="training labels compared besides the hybrids of --alpha (e.g. gt mle self "
                             "mle_approx bias_reduced; see training.labels.STUDY_LABELS)")
    parser.add_argument("--n-train", type=int, help="number of training signals")
    parser.add_argument("--max-epochs", type=int, help="maximum training epochs per network")
    parser.add_argument("--seed", type=int, help="seed of data, weights and batch order")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna storage shared by all workers of a search, e.g. sqlite:///runs/search.db "
                             "(one machine) or postgresql://user@host/db (many). Search studies (kind hparam): "
                             "default sqlite in --out, or $QMRI_LABELS_OPTUNA_STORAGE; label studies with --tune: "
                             "the same study run on several machines shares its searches and gives the same "
                             "results (default: each search in its process)")
    parser.add_argument("--study-name", metavar="NAME",
                        help="name of the shared search (the same on every worker; hparam default: "
                             "hparam-<dataset>; with --tune each label's search is NAME-<method>)")
    parser.add_argument("--worker", action="store_const", const=True, default=None,
                        help="search studies: only run trials until the study holds n_trials completed ones, "
                             "no comparison; start one run without --worker to finish and compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any configuration key (dotted for nested keys; VALUE is YAML)")
    parser.add_argument("--out", help="results folder (default: runs/<name>-<timestamp>)")
    add_verbosity_flags(parser)
    parser.add_argument("--list", action="store_true", help="list the named configurations and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def resolve(args: argparse.Namespace) -> tuple[str, dict, object, str]:
    """(kind, resolved config, workflow, config name) from parsed arguments."""
    return _prepare(args)[1:]


def _prepare(args: argparse.Namespace):
    if args.snr is not None and len(args.snr) not in (1, 2):
        raise ValueError(f"--snr takes one value or a range LOW HIGH, got {len(args.snr)} values")
    from qmri_labels.workflows.run import MODEL_KINDS, prepare_study

    model = args.model
    if args.bvalues is not None and model is not None and model.lower() not in MODEL_KINDS:
        signal_model = get_model(model.lower())
        if signal_model.protocol_name != "bvalues":
            raise ValueError(f"--bvalues is for diffusion models; model {signal_model.name!r} takes "
                             f"{signal_model.protocol_name} in {signal_model.protocol_unit}: use --protocol")
    overrides = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "snr" and len(value) == 1:
            value = value[0]
        overrides.append((key, value, "--" + dest.replace("_", "-")))
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {key}: value {text!r} is not valid YAML ({exc})") from exc
        overrides.append((key.strip(), value, f"--set {key}"))
    study = prepare_study(args.config, model=model, overrides=overrides)
    return study, study.kind, study.config, study.workflow, study.name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_cli_logging(quiet=args.quiet, verbose=args.verbose)
    from qmri_labels.workflows.run import available_configs, execute_study, load_config

    if args.list:
        for name, path in available_configs().items():
            try:
                config, _ = load_config(str(path))
                kind = config.get("kind", "ivim_labels")
                about = config.get("description") or config.get("title") or ""
            except ValueError as exc:
                kind, about = "?", str(exc)
            print(f"{name:28s} {kind:18s} {about}")
        return 0
    try:
        study = _prepare(args)[0]
    except ValueError as exc:
        parser.error(str(exc))
    try:
        out, result, wall = execute_study(study, args.out, quiet=args.quiet, threads=args.threads,
                                          argv=list(argv if argv is not None else sys.argv[1:]))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quiet:  # quiet: warnings and errors only, which go to stderr
        return 0
    text = result.get("summary_text")
    print()
    if text:
        print(text)
        print()
    print(f"finished in {wall:.1f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
