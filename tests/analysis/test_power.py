"""The paired t-test's power and sample size against textbook values and a simulation."""

import pytest

from qmri_labels.analysis.power import paired_t_power, paired_t_sample_size, simulated_paired_t_power


@pytest.mark.parametrize("dz, n", [(0.2, 199), (0.5, 34), (0.8, 15)])
def test_sample_size_matches_textbook_values(dz, n):
    # G*Power's "means: difference between two dependent means", two-sided, alpha 0.05, power 0.8
    # (Cohen's small, medium and large d_z)
    assert paired_t_sample_size(dz, power=0.8, alpha=0.05) == n
    assert paired_t_sample_size(-dz, power=0.8, alpha=0.05) == n
    assert paired_t_power(dz, n) >= 0.8 > paired_t_power(dz, n - 1)


@pytest.mark.parametrize("dz, n", [(0.5, 34), (1.0, 8), (0.3, 20)])
def test_power_matches_simulation(dz, n):
    # 40000 draws: the simulated power's SE is below 0.0025
    assert paired_t_power(dz, n) == pytest.approx(simulated_paired_t_power(dz, n, n_sim=40_000, seed=1), abs=0.01)


def test_power_at_zero_effect_is_alpha_and_no_size_is_enough():
    assert paired_t_power(0.0, 30, alpha=0.05) == pytest.approx(0.05, abs=1e-9)
    assert paired_t_sample_size(0.0) is None
    assert paired_t_sample_size(0.01, n_max=1000) is None


def test_power_of_a_large_effect_is_one_not_nan():
    # a pilot d_z of -5.5 at 50 pairs (noncentrality 39): scipy's noncentral t alone gives NaN
    assert paired_t_power(-5.474, 50) == pytest.approx(1.0)
    for dz, n in ((3.0, 4), (5.474, 3), (5.474, 2)):
        assert paired_t_power(dz, n) == pytest.approx(simulated_paired_t_power(dz, n, n_sim=40_000, seed=2), abs=0.01)
    assert paired_t_sample_size(5.474) == 3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        paired_t_power(0.5, 10, alpha=1.5)
    with pytest.raises(ValueError, match="n >= 2"):
        paired_t_power(0.5, 1)
    with pytest.raises(ValueError, match="power"):
        paired_t_sample_size(0.5, power=1.0)
