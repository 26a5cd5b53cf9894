"""benchmarks/ivimnet_design.py's optional peer method runs the GPL ``ivimnet`` package, which is no
dependency: without it the method must fail at once with the install command, and nothing else
may need it. The package itself is never imported here."""

import sys

import pytest


def test_peer_method_without_the_package_names_the_install_command(load_benchmark, monkeypatch, tmp_path):
    bench = load_benchmark("ivimnet_design")
    monkeypatch.setitem(sys.modules, "IVIMNET", None)  # makes `import IVIMNET...` fail as if not installed
    monkeypatch.setitem(sys.modules, "IVIMNET.deep", None)

    def no_signals(*args, **kwargs):
        raise AssertionError("signals were generated before the missing package was noticed")

    monkeypatch.setattr(bench, "study_spec", no_signals)
    out = tmp_path / "peer.json"
    with pytest.raises(ImportError, match=r"ivimnet package.*not installed.*pip install ivimnet"):
        bench.main(["--methods", "peer-ivimnet", "--out", str(out)])
    assert not out.exists()


def test_package_log_keeps_epochs_and_losses_and_drops_progress_bars(load_benchmark, capsys):
    """The package reports its epochs only in print(); tqdm bars arrive as carriage-return updates."""
    bench = load_benchmark("ivimnet_design")
    log = bench._PackageLog(sys.stdout, every=2)
    for epoch, (train, val) in enumerate([(0.12, 0.11), (0.05, 0.04), (0.05, 0.045)]):
        log.write("-" * 65 + f"\nEpoch: {epoch}; Bad epochs: 0\n")
        log.write("\r  0%|          | 0/500 [00:00<?, ?it/s]")
        log.write("\r 50%|#####     | 250/500 [00:01<00:01, 200.0it/s]")
        log.write("\r501it [00:02, 200.00it/s]\n\n validation \n")
        log.write(f"\nLoss: {train}, validation_loss: {val}, lr: 3e-05\n")
    log.write("\nDone, best val loss: 0.04\nDone\n")
    log.write("UserWarning: something the package wants said\n")
    assert log.epochs == 3
    assert log.val_losses == [0.11, 0.04, 0.045]
    assert log.stopped_early
    assert log.other == ["UserWarning: something the package wants said"]
    assert capsys.readouterr().out == "  [peer-ivimnet] epoch 2: training loss 0.05, validation loss 0.04\n"
