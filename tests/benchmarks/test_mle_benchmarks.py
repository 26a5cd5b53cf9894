"""The MLE benchmarks compare like with like: scipy at fit_mle's starts and a matched tolerance
(besides the former strict one-start baseline), and the local-minimum check against a multi-start
reference. Tiny runs: the numbers are the scripts' business, the pairings are the test's."""

import re

import numpy as np
import pytest


def test_throughput_benchmark_reports_matched_and_strict_baselines(load_benchmark, capsys):
    bench = load_benchmark("mle_throughput")
    assert bench.MATCHED["ftol"] > bench.STRICT["ftol"] and bench.MATCHED["gtol"] > bench.STRICT["gtol"]
    bench.main(["--n", "2000", "--n-baseline", "8"])
    out = capsys.readouterr().out
    n = bench.N_STARTS
    for row in (f"scipy matched, {n} starts (fit_mle's)", "scipy matched, 1 start (segmented)",
                "scipy strict, 1 start (prior middle)", f"fit_mle CPU, {n} starts", "fit_mle CPU, 1 start"):
        assert re.search(re.escape(row) + r".*: +[\d,]+ voxels/s", out), row
    ratios = re.findall(r"ratio (.+?) *: +([\d.]+)x", out)
    assert [r[0] for r in ratios] == [f"fit_mle {n} starts / scipy matched {n} starts",
                                      "fit_mle 1 start / scipy matched 1 start",
                                      f"fit_mle {n} starts / scipy strict 1 start (former)"]


def test_scipy_starts_are_the_fitters_starts(load_benchmark):
    bench = load_benchmark("mle_throughput")
    from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec

    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, n=20, seed=1).generate()
    starts = bench.fitter_starts(data, 20, 5)
    assert starts.shape == (20, 5, 4)
    assert np.all(starts >= bench.BOUNDS[0]) and np.all(starts <= bench.BOUNDS[1])
    # the first start is the model's segmented estimate, the one fit_mle starts from
    import torch

    from qmri_labels.physics import get_model

    init = get_model("ivim").initial_estimate(torch.as_tensor(data.signals, dtype=torch.float64),
                                              torch.as_tensor(data.protocol, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(starts[:, 0], np.clip(init, bench.BOUNDS[0], bench.BOUNDS[1]))
    assert len({tuple(s) for s in starts[0].round(6)}) == 5


def test_local_minima_benchmark_counts_failures_against_the_reference(load_benchmark, capsys, tmp_path):
    bench = load_benchmark("mle_local_minima")
    bench.main(["--n", "40", "--cache", str(tmp_path / "ref.npz"), "--repeats", "1",
                "--compare", "n_starts=1,probe_iter=0"])
    out = capsys.readouterr().out
    assert re.search(r"defaults +\d+ \([\d.e+-]+\)", out) and "n_starts=1,probe_iter=0" in out
    assert (tmp_path / "ref.npz").is_file()
    bench.main(["--n", "40", "--cache", str(tmp_path / "ref.npz"), "--repeats", "1"])
    assert "reference from" in capsys.readouterr().out


def test_multistart_reference_is_no_worse_than_scipy_from_the_truth():
    from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
    from qmri_labels.fitting.reference import fit_multistart, fit_voxel_lbfgsb

    data = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, n=10, seed=3).generate()
    bounds = np.array([[0.0, 0.0, 0.0, 0.003], [2.0, 1.0, 0.005, 0.3]])
    for i in range(10):
        theta, nll = fit_multistart(data.signals[i], data.protocol, data.sigma[i], bounds)
        truth = fit_voxel_lbfgsb(data.signals[i], data.protocol, data.sigma[i], data.theta_true[i], bounds).fun
        assert nll <= truth + 1e-6
        assert np.all(theta >= bounds[0]) and np.all(theta <= bounds[1])
    with pytest.raises(ValueError):
        fit_multistart(data.signals[0][:5], data.protocol, data.sigma[0], bounds)
