"""The 2D world: exact denoisers against Monte Carlo, the reference ODE against closed forms, and the metrics."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from data import metrics, toy


@pytest.mark.parametrize("name", ["ring8", "spiral", "checkerboard", "two_modes"])
@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_exact_denoiser_equals_the_monte_carlo_posterior_mean(name, sigma):
    ds = toy.DATASETS[name]()
    g = torch.Generator().manual_seed(0)
    x0, _ = ds.sample(400_000, g)                                            # prior samples
    x_query = ds.sample(4, g)[0] + sigma * torch.randn(4, 2, dtype=torch.float64, generator=g)
    for xq in x_query:
        # Self-normalised importance sampling: E[x0 | x_σ] = E_p[w x0]/E_p[w], w = N(x_σ; x0, σ²I).
        logw = -(xq - x0).square().sum(1) / (2 * sigma**2)
        w = (logw - logw.max()).exp()
        w = w / w.sum()
        mc = (w[:, None] * x0).sum(0)
        se = ((w[:, None] ** 2 * (x0 - mc) ** 2).sum(0)).sqrt()              # delta-method standard error
        exact = ds.denoiser(xq[None], sigma)[0]
        assert bool(((exact - mc).abs() <= 5 * se + 1e-3).all()), (exact, mc, se)


def test_labelled_denoiser_restricts_the_posterior_to_the_class():
    ds = toy.ring8()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = toy.one_hot(torch.arange(8), 8, torch.float64)
    sigma = 0.7
    # Given its class, ring8's posterior is one Gaussian: μ_k + std²/(std² + σ²)·(x − μ_k).
    expected = ds.means + ds.std**2 / (ds.std**2 + sigma**2) * (x - ds.means)
    torch.testing.assert_close(ds.denoiser(x, sigma, labels), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="no classes"):
        toy.spiral().denoiser(x, 0.1, labels)


@settings(deadline=None, max_examples=15)
@given(st.floats(0.1, 2.0), st.floats(0.003, 80.0), st.floats(0.0, 1.0))
def test_reference_ode_agrees_with_the_gaussian_closed_form(std, t, frac):
    s = max(0.002, t * frac)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * t
    exact = x * math.sqrt((s**2 + std**2) / (t**2 + std**2))
    torch.testing.assert_close(toy.gaussian(std).ode(x, t, s), exact, rtol=1e-6, atol=1e-6)  # need 1e-4


@pytest.mark.parametrize("name", ["ring8", "spiral"])
def test_reference_ode_is_converged_to_1e4_on_mixtures_and_point_sets(name):
    ds = toy.DATASETS[name]()
    x = 80 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    coarse, fine = ds.ode(x, 80.0, 0.002), ds.ode(x, 80.0, 0.002, steps_per_unit=80)
    assert (coarse - fine).abs().max() < 1e-5  # 4x the steps of RK4 changes the answer by < 1e-5


def test_reference_ode_takes_per_example_times_and_refuses_going_up():
    ds = toy.ring8()
    x = torch.randn(3, 2, dtype=torch.float64)
    t, s = torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.1, 0.5], dtype=torch.float64)
    batched = ds.ode(x, t, s)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], ds.ode(x[i:i + 1], t[i].item(), s[i].item()))
    with pytest.raises(ValueError, match="s must be <= t"):
        ds.ode(x, 1.0, 2.0)


def test_sliced_wasserstein_is_zero_on_equal_sets_repeatable_and_measures_a_shift():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g)
    m = torch.tensor([0.6, -0.8])                                             # |m| = 1
    assert metrics.sliced_wasserstein(x, x) == 0
    assert metrics.sliced_wasserstein(x, y, seed=5) == metrics.sliced_wasserstein(x, y, seed=5)
    assert metrics.sliced_wasserstein(x, y) < 0.06
    # Shifting a set by m moves each 1D projection by θᵀm, so SW₂² = mean_θ (θᵀm)², whose expectation over
    # uniform directions in 2D is |m|²/2; with 4096 directions its standard deviation is about 0.004.
    assert abs(metrics.sliced_wasserstein(x[:200], x[:200] + m, num_projections=4096) - math.sqrt(0.5)) < 0.02


def test_teacher_gap_is_the_per_dimension_mean_squared_distance():
    a = torch.zeros(10, 2)
    assert metrics.teacher_gap(a, a) == 0
    assert math.isclose(metrics.teacher_gap(a, a + torch.tensor([3.0, 4.0])), 12.5)  # (9 + 16)/2
