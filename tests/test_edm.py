"""EDM (Karras et al. 2022): preconditioning limits, the Karras grid, Heun's order, and the loss minimiser."""
import math

import torch
from hypothesis import given, settings, strategies as st

from algorithms import edm
from data import toy


@given(st.floats(1e-9, 1e-4))
def test_c_skip_tends_to_one_and_c_out_to_zero_as_sigma_goes_to_zero(sigma):
    c_skip, c_out, c_in, _ = edm.precond(torch.tensor(sigma, dtype=torch.float64))
    assert abs(c_skip - 1) <= 4 * sigma**2 / edm.SIGMA_DATA**2 + 1e-15      # Table 1: 1 − O(σ²)
    assert 0 < c_out <= sigma * (1 + 1e-12)                                 # Table 1: O(σ)
    assert abs(c_in - 1 / edm.SIGMA_DATA) < 1e-6


@given(st.integers(2, 400), st.floats(1e-4, 1.0), st.floats(2.0, 500.0), st.floats(1.0, 10.0))
def test_karras_grid_has_its_endpoints_and_decreases(N, sigma_min, sigma_max, rho):
    s = edm.sigma_grid(N, sigma_min, sigma_max, rho)
    assert s.dtype == torch.float64 and len(s) == N
    assert s[0] == sigma_max and s[-1] == sigma_min
    assert bool((s[1:] < s[:-1]).all())


def test_karras_grid_matches_the_paper_values():
    # Reference values of Eq. 5 with the defaults, computed independently of our code.
    s18 = edm.sigma_grid(18)
    for i, v, digits in [(1, 57.586, 3), (4, 19.352, 3), (9, 1.923, 3), (13, 0.1395, 4), (16, 0.0075, 4)]:
        assert abs(s18[i] - v) <= 0.5 * 10**-digits  # the table is rounded to `digits` decimals
    assert math.isclose(edm.sigma_grid(40)[22], 1.3824, rel_tol=1e-4)
    assert math.isclose(edm.sigma_grid(3)[1], 2.515, rel_tol=1e-3)


def test_sigma_grid_refuses_fewer_than_two_points():
    try:
        edm.sigma_grid(1)
    except ValueError as e:
        assert "N >= 2" in str(e)
    else:
        raise AssertionError("sigma_grid(1) must raise")


def gaussian_closed_form(x, t, s, std):
    return x * math.sqrt((s**2 + std**2) / (t**2 + std**2))


def heun_solve(D, x, t, s, n):
    """n Heun steps from t to s, uniform in ln σ (so that the step size halves exactly when n doubles)."""
    grid = torch.logspace(math.log10(t), math.log10(s), n + 1, dtype=torch.float64)
    for a, b in zip(grid[:-1], grid[1:]):
        x = edm.heun_step(D, x, a, b)
    return x


def test_heun_converges_at_second_order_for_gaussian_data_with_its_exact_denoiser():
    std, t, s = 0.5, 10.0, 0.05
    ds = toy.gaussian(std)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * t
    exact = gaussian_closed_form(x, t, s, std)
    errs = [(heun_solve(ds.denoiser, x, t, s, n) - exact).abs().max().item() for n in (16, 32, 64, 128)]
    ratios = [a / b for a, b in zip(errs[:-1], errs[1:])]
    assert all(3.6 < r < 4.4 for r in ratios), (errs, ratios)  # halving the step cuts the error ~4x


def test_euler_converges_at_first_order_for_gaussian_data():
    std, t, s = 0.5, 10.0, 0.05
    ds = toy.gaussian(std)
    x = torch.full((4, 2), 3.0, dtype=torch.float64)
    exact = gaussian_closed_form(x, t, s, std)
    errs = []
    for n in (64, 128, 256):
        grid = torch.logspace(math.log10(t), math.log10(s), n + 1, dtype=torch.float64)
        y = x
        for a, b in zip(grid[:-1], grid[1:]):
            y = edm.euler_step(ds.denoiser, y, a, b)
        errs.append((y - exact).abs().max().item())
    assert all(1.8 < a / b < 2.2 for a, b in zip(errs[:-1], errs[1:])), errs


def test_euler_step_to_zero_is_the_denoiser_output():
    """x + (0 − t)(x − D)/t = D: the sampler's last step (Alg. 1 l. 6 skips the correction at σ = 0)."""
    ds = toy.ring8()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 0.7, dtype=torch.float64)
    out = edm.euler_step(ds.denoiser, x, t, torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(out, ds.denoiser(x, t), rtol=0, atol=1e-14)


def test_heun_sampler_is_alg1_with_2N_minus_1_denoiser_calls():
    """Alg. 1 written out: N Karras levels (Eq. 5) plus t_N = 0, Heun steps (l. 4–8) except the last, which keeps
    the Euler result (l. 6). Counting the calls checks NFE = 2N − 1."""
    ds, N, calls = toy.ring8(), 5, []
    D = lambda x, sigma, labels=None: calls.append(1) or ds.denoiser(x, sigma)
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = edm.sample(edm.Config(), D, noise, num_steps=N)
    assert len(calls) == 2 * N - 1
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    t = [(a + i / (N - 1) * (b - a)) ** 7 for i in range(N)] + [0.0]          # Eq. 5, then t_N = 0
    x = noise * 80
    for i in range(N):
        d = (x - ds.denoiser(x, torch.full((16,), t[i], dtype=torch.float64))) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] != 0:
            d2 = (x_next - ds.denoiser(x_next, torch.full((16,), t[i + 1], dtype=torch.float64))) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
        x = x_next
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


def test_heun_sampler_with_exact_gaussian_denoiser_converges_to_the_closed_form_at_second_order():
    std = 0.5
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # The sampler ends at σ = 0, where the closed form is x_T·std/sqrt(T² + std²).
    exact = gaussian_closed_form(noise * 80, 80.0, 0.0, std)
    errs = [(edm.sample(edm.Config(), toy.gaussian(std).denoiser, noise, num_steps=n) - exact).abs().max().item()
            for n in (32, 64, 128)]
    assert all(3.5 < a / b < 4.5 for a, b in zip(errs[:-1], errs[1:])), errs


class ExactNet(torch.nn.Module):
    """The raw network F whose EDM-preconditioned denoiser is a given D (inverts Eq. 7), plus a perturbation."""

    def __init__(self, D, delta=0.0):
        super().__init__()
        self.D, self.delta = D, delta

    def forward(self, x_in, c_noise, labels=None):
        sigma, sd = (4 * c_noise).exp()[:, None], edm.SIGMA_DATA   # c_noise = ln σ / 4
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()  # Table 1, written out
        x = x_in * (sigma**2 + sd**2).sqrt()                  # undo c_in = 1/sqrt(σ² + σ_d²)
        D = self.D(x, sigma.flatten()) + self.delta * torch.tanh(x.flip(1))
        return (D - c_skip * x) / c_out


@settings(deadline=None, max_examples=10)
@given(st.floats(0.05, 1.0), st.sampled_from([-1.0, 1.0]))
def test_edm_loss_is_minimised_by_the_exact_denoiser(delta, sign):
    ds = toy.ring8()
    x, _ = ds.sample(20000, torch.Generator().manual_seed(2))
    loss = lambda net: edm.loss(edm.Config(), net, x, generator=torch.Generator().manual_seed(3)).mean()
    assert loss(ExactNet(ds.denoiser)) < loss(ExactNet(ds.denoiser, sign * delta))
