"""toolkit.convention: the toy's evidence for the two mean_y conventions, and its figures."""
import numpy as np
import pytest

from toolkit import convention, linear
from toolkit.plotting.sanity import plot_sample_size, plot_toy_shift


def test_a_distractor_mean_is_a_shift_the_masked_pattern_ignores():
    shift = convention.toy_shift(noise_means=(0.0, 0.5, 2.0), n=3000, seed=1)
    base = shift.data[0.0]
    for nu in shift.noise_means:
        np.testing.assert_allclose(shift.data[nu].x, base.x + nu * shift.a_d, rtol=0, atol=1e-12)
        np.testing.assert_allclose(shift.w[nu], shift.w[0.0], atol=1e-9)
        np.testing.assert_allclose(shift.patterns[nu]["masked"], shift.patterns[0.0]["masked"], atol=1e-9)
        # the global a_+ moves by c (E_+[y] - E[y]) / (w^T N) in closed form, c = nu a_d
        y, active = base.y, base.x @ shift.w[0.0] > 0
        numerator = (base.x[active] * y[active, None]).mean(0) - base.x[active].mean(0) * y.mean()
        moved = numerator + nu * shift.a_d * (y[active].mean() - y.mean())
        np.testing.assert_allclose(shift.patterns[nu]["global"], moved / (shift.w[0.0] @ moved), atol=1e-9)
    # the paper's closed form for y ~ U[-1, 1]: a_+ = a_s + 1.5 nu a_d (up to sampling)
    np.testing.assert_allclose(shift.patterns[2.0]["global"], shift.a_s + 3.0 * shift.a_d, atol=0.15)
    np.testing.assert_allclose(shift.patterns[2.0]["masked"], shift.a_s, atol=0.1)


def test_sample_size_study_is_reproducible_and_the_global_pattern_needs_fewer_samples():
    study = convention.sample_size_study(sizes=(200, 2000), seeds=12, n_held_out=4000, seed=3)
    again = convention.sample_size_study(sizes=(200, 2000), seeds=12, n_held_out=4000, seed=3)
    for c in linear.MEAN_Y_CONVENTIONS:
        np.testing.assert_array_equal(study.error[c], again.error[c])
        assert study.rho[c]["active"].shape == (2, 12)
    # twice the error at a given n (a quarter of the signal in the masked numerator)
    ratio = study.error["masked"].mean(1) / study.error["global"].mean(1)
    assert np.all((ratio > 1.3) & (ratio < 3.0)), ratio
    assert study.error["masked"].mean(1)[1] < study.error["masked"].mean(1)[0] / 2
    mean, low, high, n = study.summary("global", "all")[1]
    assert low <= mean <= high and n == 12
    table = study.table()
    assert table.splitlines()[2].split()[0] == "200" and "rho, active masked" in table


def test_convention_figures_draw_both_conventions():
    shift = convention.toy_shift(noise_means=(0.0, 1.0), n=300)
    figure = plot_toy_shift(shift)
    assert [ax.get_title() for ax in figure.axes] == [r"distractor mean $\nu = 0$", r"distractor mean $\nu = 1$"]
    assert figure.axes[0].get_xlim() == figure.axes[1].get_xlim()
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels[:2] == [r"$a_+$ with $E_+[y]$ (masked)", r"$a_+$ with $E[y]$ (global)"]
    study = convention.sample_size_study(sizes=(50, 500), seeds=4, n_held_out=500)
    ax = plot_sample_size(study).axes[0]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[50, 500], [50, 500]]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(study.error["masked"].mean(1))
