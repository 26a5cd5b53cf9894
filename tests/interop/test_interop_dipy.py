"""The dipy adapter: a dipy IVIM example runs with only its import changed."""

import numpy as np
import pytest

dipy = pytest.importorskip("dipy")

# dipy's IVIM tutorial (doc/examples/reconst_ivim.py), with the data made here instead of
# downloaded: the same calls, names and orders. Only the first line differs between the runs.
EXAMPLE = """
{import_line}
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.ivim import ivim_prediction

bvals = np.array([0., 10., 20., 30., 40., 60., 80., 100., 120., 140., 160., 180., 200., 300., 400., 500., 600.,
                  700., 800., 900., 1000.])
bvecs = np.zeros((bvals.size, 3)); bvecs[1:, 2] = 1.0
gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=0)

rng = np.random.default_rng(0)
shape = (6, 6, 1)
truth = np.stack([rng.uniform(800, 1200, shape), rng.uniform(0.08, 0.25, shape),
                  rng.uniform(0.01, 0.05, shape), rng.uniform(0.0007, 0.0015, shape)], -1)   # S0, f, D*, D
clean = np.array([ivim_prediction(p, gtab) for p in truth.reshape(-1, 4)]).reshape(shape + (bvals.size,))
data_slice = clean + rng.normal(0, 5, clean.shape)

ivimmodel = IvimModel(gtab, fit_method='trr')
ivimfit = ivimmodel.fit(data_slice)
ivimparams = ivimfit.model_params
i, j = 2, 3
estimated_params = ivimfit.model_params[i, j, 0, :]
ivim_predict = ivimfit.predict(gtab)[i, j, 0, :]
maps = {{"S0_predicted": ivimfit.S0_predicted, "perfusion_fraction": ivimfit.perfusion_fraction,
        "D_star": ivimfit.D_star, "D": ivimfit.D}}
"""


def run_example(import_line):
    scope = {}
    exec(EXAMPLE.format(import_line=import_line), scope)  # noqa: S102 - our own example text
    return scope


@pytest.fixture(scope="module")
def both():
    import warnings

    ours = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run_example("from qmri_labels.interop.dipy import IvimModel")
    theirs = run_example("from dipy.reconst.ivim import IvimModel")
    return ours, theirs, caught


def test_example_runs_with_the_same_names_shapes_and_order(both):
    ours, theirs, caught = both
    assert ours["ivimparams"].shape == theirs["ivimparams"].shape == (6, 6, 1, 4)
    assert ours["estimated_params"].shape == (4,) and ours["ivim_predict"].shape == (21,)
    for name in ("S0_predicted", "perfusion_fraction", "D_star", "D"):
        assert ours["maps"][name].shape == (6, 6, 1)
        np.testing.assert_array_equal(ours["maps"][name], ours["ivimparams"][..., ("S0_predicted", "perfusion_fraction",
                                                                                  "D_star", "D").index(name)])
    # fit_method is dipy's optimiser: accepted, and the user is told it does not apply
    assert any("fit_method" in str(w.message) for w in caught)


def test_example_estimates_agree_with_truth_and_with_dipy(both):
    ours, theirs, _ = both
    truth = ours["truth"]
    ours_err = np.abs(ours["ivimparams"] - truth) / truth
    theirs_err = np.abs(theirs["ivimparams"] - truth) / truth
    # SNR ~200: S0, f and D close to the truth; at least as close as dipy's own fit (median)
    for k, limit in enumerate((0.01, 0.1, 0.5, 0.05)):
        assert np.median(ours_err[..., k]) < limit, (k, np.median(ours_err[..., k]))
        assert np.median(ours_err[..., k]) <= np.median(theirs_err[..., k]) * 1.1 + 1e-3, k
    # predicted signals match the data (the same forward model as dipy's)
    i, j = ours["i"], ours["j"]
    np.testing.assert_allclose(ours["ivim_predict"], ours["data_slice"][i, j, 0], rtol=0.03)
    from dipy.reconst.ivim import ivim_prediction

    np.testing.assert_allclose(ours["ivim_predict"], ivim_prediction(ours["estimated_params"], ours["gtab"]),
                               rtol=1e-10)


def test_mask_single_voxel_bounds_and_unknown_options():
    from dipy.core.gradients import gradient_table

    from qmri_labels.interop.dipy import IvimModel

    bvals = np.array([0, 10, 20, 50, 100, 200, 400, 800.0])
    gtab = gradient_table(bvals, bvecs=np.tile([0, 0, 1.0], (bvals.size, 1)), b0_threshold=0)
    model = IvimModel(gtab, bounds=[[0, 0, 0.005, 0], [2000, 1, 0.2, 0.003]])
    signal = model.predict([1000, 0.2, 0.03, 0.001])
    one = model.fit(signal)
    assert one.shape == () and one.model_params.shape == (4,)
    np.testing.assert_allclose(one.model_params, [1000, 0.2, 0.03, 0.001], rtol=1e-2)
    data = np.stack([signal, signal])
    masked = model.fit(data, mask=np.array([True, False]))
    assert np.all(masked.model_params[1] == 0) and masked[0].perfusion_fraction == pytest.approx(0.2, rel=1e-2)
    with pytest.raises(TypeError, match="unknown options"):
        IvimModel(gtab, fitmethod="trr")
    with pytest.raises(ValueError, match="b-values"):
        model.fit(np.ones((2, 5)))
