"""DDIM, inverse DDIM and aDDIM (Heek et al. 2024, arXiv:2403.06807v3, Sec. 3, Alg. 3): the identities the
paper's Eqs. 4, 5 and 14 imply, in float64, and aDDIM against the closed form on Gaussian data."""
import math

import torch
from hypothesis import given, settings, strategies as st

from algorithms import addim
from data import toy

f64 = torch.float64
sigmas = st.floats(1e-3, 80.0)
ratios = st.floats(0.0, 0.99)  # σ_s/σ_t: invDDIM divides by 1 − σ_s/σ_t, so s → t is ill-conditioned by design


def draw(seed, B=5, d=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, dtype=f64, generator=g) for _ in range(3)]




def vp(sigma):
    """VP coefficients α, σ of a VE noise level (docs/mcm_vp_ve.md): α = 1/sqrt(1 + σ²), σ_VP = σ·α."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha


@settings(max_examples=50, deadline=None)
@given(sigmas, ratios, st.integers(0, 2**31))
def test_inverse_ddim_inverts_ddim_and_ddim_inverts_inverse_ddim(sigma_t, ratio, seed):
    sigma_s = ratio * sigma_t
    x_hat, x_t, x_s = draw(seed)
    x_s_ddim = addim.ddim(x_hat, x_t, sigma_t, sigma_s)
    torch.testing.assert_close(addim.inverse_ddim(x_s_ddim, x_t, sigma_t, sigma_s), x_hat, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(addim.ddim(addim.inverse_ddim(x_s, x_t, sigma_t, sigma_s), x_t, sigma_t, sigma_s),
                               x_s, rtol=1e-9, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(sigmas, ratios, st.integers(0, 2**31), st.floats(0.0, 2.0))
def test_ve_updates_are_the_papers_vp_updates_divided_by_alpha_s(sigma_t, ratio, seed, x_var):
    """Eq. 4, Eq. 5 and Eq. 14 written in VP form, mapped with z = α x_VE, then divided by α_s."""
    sigma_s = ratio * sigma_t
    (a_t, s_t), (a_s, s_s) = vp(sigma_t), vp(sigma_s)
    x_hat, x_t, x_s = draw(seed)
    z_t, z_s, d = a_t * x_t, a_s * x_s, x_t.shape[1]
    ddim_vp = a_s * x_hat + s_s / s_t * (z_t - a_t * x_hat)                                 # Eq. 4
    inv_vp = (z_s - s_s / s_t * z_t) / (a_s - a_t * s_s / s_t)                             # Eq. 5
    eps_hat = (z_t - a_t * x_hat) / s_t
    n2 = eps_hat.square().sum(1, keepdim=True)
    addim_vp = a_s * x_hat + (s_s**2 + d / n2 * (a_s - a_t * s_s / s_t) ** 2 * x_var).sqrt() * eps_hat  # Eq. 14
    torch.testing.assert_close(addim.ddim(x_hat, x_t, sigma_t, sigma_s), ddim_vp / a_s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(addim.inverse_ddim(x_s, x_t, sigma_t, sigma_s), inv_vp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(addim.addim(x_hat, x_t, sigma_t, sigma_s, x_var), addim_vp / a_s,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(addim.x_var_analytic(sigma_t), torch.tensor(0.1 / (2 + a_t**2 / s_t**2), dtype=f64))


@settings(max_examples=50, deadline=None)
@given(sigmas, ratios, st.integers(0, 2**31))
def test_ddim_with_the_true_x_gives_the_forward_sample(sigma_t, ratio, seed):
    """DDIM_{t→s}(x, α_t x + σ_t ε) = α_s x + σ_s ε; in VE form x + σ_s ε."""
    sigma_s = ratio * sigma_t
    x, eps, _ = draw(seed)
    torch.testing.assert_close(addim.ddim(x, x + sigma_t * eps, sigma_t, sigma_s), x + sigma_s * eps,
                               rtol=1e-12, atol=1e-12)
    (a_s, s_s) = vp(sigma_s)
    torch.testing.assert_close(a_s * addim.ddim(x, x + sigma_t * eps, sigma_t, sigma_s), a_s * x + s_s * eps,
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(sigmas, st.integers(0, 2**31), st.floats(0.0, 2.0))
def test_ddim_and_addim_from_t_to_t_are_the_identity(sigma, seed, x_var):
    x_hat, x_t, _ = draw(seed)
    torch.testing.assert_close(addim.ddim(x_hat, x_t, sigma, sigma), x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(addim.addim(x_hat, x_t, sigma, sigma, x_var), x_t, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(sigmas, ratios, st.integers(0, 2**31))
def test_addim_with_zero_x_var_is_ddim(sigma_t, ratio, seed):
    sigma_s = ratio * sigma_t
    x_hat, x_t, _ = draw(seed)
    torch.testing.assert_close(addim.addim(x_hat, x_t, sigma_t, sigma_s, 0.0), addim.ddim(x_hat, x_t, sigma_t, sigma_s),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(sigmas, ratios, st.integers(0, 2**31))
def test_addim_norm_identity_and_extra_component_parallel_to_eps_hat(sigma_t, ratio, seed):
    """Eq. 14: ‖x_s^aDDIM − x̂‖² = ‖x_s^DDIM − x̂‖² + d(1 − σ_s/σ_t)² x_var per example, and
    aDDIM − DDIM is a non-negative multiple of ε̂. Per-example x_var."""
    sigma_s = ratio * sigma_t
    x_hat, x_t, u = draw(seed, B=6, d=4)
    x_var = u[:, 0].abs()                                                                   # [B]
    d = x_t.shape[1]
    x_a, x_d = addim.addim(x_hat, x_t, sigma_t, sigma_s, x_var), addim.ddim(x_hat, x_t, sigma_t, sigma_s)
    lhs = (x_a - x_hat).square().sum(1)
    rhs = (x_d - x_hat).square().sum(1) + d * (1 - sigma_s / sigma_t) ** 2 * x_var
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)
    eps_hat = (x_t - x_hat) / sigma_t
    extra = x_a - x_d
    coef = (extra * eps_hat).sum(1, keepdim=True) / eps_hat.square().sum(1, keepdim=True)   # projection on ε̂
    torch.testing.assert_close(extra, coef * eps_hat, rtol=1e-10, atol=1e-12)
    assert bool((coef >= 0).all())


def test_time_grid_is_the_rescaled_cosine_schedule():
    sig = addim.time_grid(4)
    assert sig[-1].item() == 0.0 and abs(sig[0].item() - 80.0) < 1e-12
    t = torch.tensor([0.25, 0.5, 0.75], dtype=f64)
    torch.testing.assert_close(sig[1:-1].flip(0), torch.tan(t * math.atan(80.0)), rtol=1e-15, atol=0)


def test_estimate_x_var_matches_the_gaussian_posterior_variance():
    """For N(0, std² I) the posterior variance per dimension is std²σ²/(std² + σ²) at every x_σ (closed form)."""
    data, eta, n = toy.gaussian(std=0.5, dim=4), 0.75, 40_000
    g = torch.Generator().manual_seed(0)
    x, _ = data.sample(n, generator=g)
    sig = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=f64)
    est = addim.estimate_x_var(data.denoiser, x, sig, eta, generator=g)
    exact = eta * 0.25 * sig**2 / (0.25 + sig**2)
    # ‖x − x̂‖²/d is exact·(χ²_d/d)/η-scaled, so its standard error over n samples is exact·sqrt(2/(d n)).
    assert bool(((est - exact).abs() < 5 * exact * math.sqrt(2 / (4 * n))).all()), (est, exact)


def radial_closed_form(R, sig, std, d, x_var):
    """On N(0, std² I) with the exact denoiser x̂ = k x_t, k = std²/(std² + σ_t²), ε̂ = (1 − k) x_t/σ_t is parallel to
    x_t, so aDDIM maps ‖x_t‖ = R to k R + sqrt(σ_s²‖ε̂‖² + d (1 − σ_s/σ_t)² x_var) along the same direction."""
    for i in range(len(sig) - 1):
        s_t, s_s = sig[i], sig[i + 1]
        k = std**2 / (std**2 + s_t**2)
        R = k * R + (s_s**2 * ((1 - k) * R / s_t) ** 2 + d * (1 - s_s / s_t) ** 2 * x_var[i]).sqrt()
    return R


def test_addim_sampler_matches_the_closed_form_on_gaussian_data():
    std, d = 0.5, 2
    data = toy.gaussian(std=std, dim=d)
    noise = torch.randn(256, d, dtype=f64, generator=torch.Generator().manual_seed(1))
    cfg = addim.Config()
    for N in range(1, 9):
        sig = addim.time_grid(N)
        post = std**2 * sig[:-1] ** 2 / (std**2 + sig[:-1] ** 2)
        for x_var in (cfg.eta * post, addim.x_var_analytic(sig[:-1]), torch.zeros(N, dtype=f64)):
            x0 = addim.sample(cfg, data.denoiser, noise, num_steps=N, x_var=x_var)
            R0 = radial_closed_form(noise.norm(dim=1) * sig[0], sig, std, d, x_var)
            direction = noise / noise.norm(dim=1, keepdim=True)
            torch.testing.assert_close(x0, direction * R0[:, None], rtol=1e-10, atol=1e-12)
        # DDIM on Gaussian data is linear: x_0 = σ_max Π_i (k_i + (σ_{i+1}/σ_i)(1 − k_i)) · noise.
        k = std**2 / (std**2 + sig[:-1] ** 2)
        gain = sig[0] * (k + sig[1:] / sig[:-1] * (1 - k)).prod()
        x0 = addim.sample(cfg, data.denoiser, noise, num_steps=N, x_var=torch.zeros(N, dtype=f64))
        torch.testing.assert_close(x0, gain * noise, rtol=1e-10, atol=1e-12)


def test_addim_corrects_ddims_variance_deficit_on_gaussian_data():
    """Closed-form E‖x_0‖²/d (quadrature over the χ_2 law of ‖noise‖) for N = 2..8 steps on N(0, 0.25 I).

    DDIM under-disperses (Eqs. 12–13). aDDIM with the analytic 0.1/(2 + SNR) lands between DDIM and the data at
    every N, so it is closer. With the empirical η = 0.75 it is closer than DDIM at N = 2 but over-disperses: here
    x̂ ∥ ε̂, so the extra norm of Eq. 14 adds linearly instead of in quadrature (Eq. 14 assumes x̂ ⟂ ε̂)."""
    std, d = 0.5, 2
    r = torch.linspace(0, 12, 20_001, dtype=f64)[1:]
    pdf = r * torch.exp(-r**2 / 2)                                                          # χ_2 density
    second_moment = lambda R: torch.trapezoid(R**2 * pdf, r).item() / d
    for N in range(2, 9):
        sig = addim.time_grid(N)
        post = std**2 * sig[:-1] ** 2 / (std**2 + sig[:-1] ** 2)
        var = {name: second_moment(radial_closed_form(80 * r, sig, std, d, x_var)) for name, x_var in
               [("ddim", 0 * post), ("analytic", addim.x_var_analytic(sig[:-1])), ("empirical", 0.75 * post)]}
        assert var["ddim"] < var["analytic"] < std**2 < var["empirical"], (N, var)
        if N == 2:
            assert abs(var["empirical"] - std**2) < abs(var["ddim"] - std**2), var
