"""Tests for algorithms/ctm.py, named after the properties of CTM (Kim et al., arXiv:2310.02279v3): the jumper's
boundary G_θ(x, t, t) = x, its combined coefficients, soft consistency matching's gradient path, the DSM term and
γ-sampling. Ground truth: Gaussian data N(0, σ_d²I), whose PF-ODE jump is G(x,t,s) = sqrt((s²+σ_d²)/(t²+σ_d²))·x,
and the exact toy denoisers of data/toy.py."""
import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from algorithms import analytic_precond, ctm, edm
from algorithms.edm import SIGMA_DATA as sd, SIGMA_MAX, SIGMA_MIN
from data import toy
from networks.edm_unet import SongUNet
from networks.mlp import MLP

f64 = torch.float64
sigmas = st.floats(SIGMA_MIN, SIGMA_MAX)


def ctm_beta_alpha(t, s):
    """CTM's combined coefficients G_θ = β·x_t + α·NN_θ: (s/t)·x_t + (1 − s/t)·(c_skip(t)·x_t + c_out(t)·NN_θ) with
    EDM's c_skip, c_out, multiplied out (written out independently of ctm.py)."""
    return (sd**2 + s * t) / (sd**2 + t**2), sd * (t - s) / (sd**2 + t**2).sqrt()


@functools.lru_cache
def preconditioning(name):
    """The statistics behind the `outer` argument: None (CTM's own β, α); Analytic-Precond with ℓ ≡ κ ≡ 0 (CTM again:
    then f = s/t, g = 1 − s/t); with ℓ and κ fitted to the exact ring8 teacher on a small budget (30 λ-intervals,
    256 samples); with that ℓ and κ ≡ 0. The small fit's κ makes α reach ~1e28 for some grid pairs, too
    ill-conditioned for the exact-network tests below, which therefore use PRECONDS (all but the full fit)."""
    if name == "ctm":
        return None
    cfg = analytic_precond.Config(num_intervals=30, num_samples=256)
    lam = analytic_precond.lambda_grid(cfg)
    if name == "analytic_zero":
        return analytic_precond.Stats(lam, torch.zeros_like(lam), torch.zeros_like(lam))
    x0 = toy.ring8().sample(256, torch.Generator().manual_seed(0))[0]
    fit = analytic_precond.compute_stats(cfg, toy.ring8().denoiser, x0, generator=torch.Generator().manual_seed(1))
    return fit if name == "analytic_ring8" else analytic_precond.Stats(lam, fit.ell, torch.zeros_like(lam))


PRECONDS = ["ctm", "analytic_zero", "analytic_ring8_ell"]


def outer(name):
    """The `outer` argument of ctm.G: None (CTM's own) or (t, s) -> (β, α) from Analytic-Precond statistics."""
    stats = preconditioning(name)
    return None if stats is None else lambda t, s: analytic_precond.coefficients(stats, t, s)


def beta_alpha(name):
    """β(t,s), α(t,s) of a preconditioning for [B, 1] float64 t, s."""
    if name == "ctm":
        return ctm_beta_alpha
    stats = preconditioning(name)
    return lambda t, s: tuple(c[:, None] for c in analytic_precond.coefficients(stats, t.flatten(), s.flatten()))


def gaussian_jump(t, s):
    """The exact PF-ODE jump factor for N(0, σ_d²I) data: G(x, t, s) = gaussian_jump(t, s)·x."""
    return ((s**2 + sd**2) / (t**2 + sd**2)).sqrt()


class ExactGaussianNet(nn.Module):
    """A raw network whose jumper β·x + α·NN is the exact Gaussian jump, plus w·x_in, w a trainable scalar: at w = 0
    it is the exact jumper, and dG/dw = α(t,s)·c_in(t)·x_t is known in closed form."""

    def __init__(self, beta_alpha=ctm_beta_alpha, w=0.0):
        super().__init__()
        self.beta_alpha, self.w = beta_alpha, nn.Parameter(torch.tensor(w, dtype=f64))

    def forward(self, x_in, c_t, class_labels=None, noise_labels_s=None):
        t, s = (4 * c_t).exp()[:, None], (4 * noise_labels_s).exp()[:, None]   # undo c_noise = ln σ / 4
        x = x_in * (sd**2 + t**2).sqrt()                                         # undo c_in(t)
        beta, alpha = self.beta_alpha(t, s)
        safe = torch.where(alpha == 0, torch.ones_like(alpha), alpha)
        NN = torch.where(alpha == 0, torch.zeros_like(x), (gaussian_jump(t, s) - beta) * x / safe)
        return NN + self.w * x_in


class ScaledDenoiser(nn.Module):
    """The exact Gaussian teacher times a parameter (= 1), only to check that the teacher gets no gradient."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=f64))

    def forward(self, x, sigma, labels=None):
        return self.scale * toy.gaussian(std=sd).denoiser(x, sigma)


def random_mlp(seed):
    """An MLP with its zero-initialised s-path randomised, so that the output really depends on s."""
    torch.manual_seed(seed)
    net = MLP(s_embedding=True, hidden=32, emb=32, num_blocks=2).to(f64)
    for block in net.blocks:
        nn.init.normal_(block.affine_s.weight, std=0.3)
    return net


# ---- the jumper ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRECONDS + ["analytic_ring8"])
@settings(max_examples=50, deadline=None)
@given(t=sigmas, value=st.floats(-1e30, 1e30), scale=st.floats(1e-3, 1e4), seed=st.integers(0, 2**16))
def test_ctm_jump_is_identity_when_s_equals_t(name, t, value, scale, seed):
    x = scale * torch.randn(5, 2, dtype=f64, generator=torch.Generator().manual_seed(seed))
    net = lambda x_in, c_t, labels=None, noise_labels_s=None: torch.full_like(x_in, value)  # any output
    assert torch.equal(ctm.G(net, x, t, t, outer=outer(name)), x)


@settings(max_examples=50, deadline=None)
@given(t=sigmas, frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_ctm_jumper_has_combined_coefficients_beta_alpha(t, frac, seed):
    s = max(SIGMA_MIN, frac * t)
    net = random_mlp(seed % 7)
    x = torch.randn(6, 2, dtype=f64, generator=torch.Generator().manual_seed(seed))
    beta, alpha = ctm_beta_alpha(torch.tensor(t, dtype=f64), torch.tensor(s, dtype=f64))
    expected = beta * x + alpha * ctm.F(net, x, t, s)
    torch.testing.assert_close(ctm.G(net, x, t, s), expected, rtol=1e-12, atol=1e-12)
    zero = outer("analytic_zero")                            # ℓ ≡ κ ≡ 0: Analytic-Precond reduces to CTM
    torch.testing.assert_close(ctm.G(net, x, t, s, outer=zero), expected, rtol=1e-10, atol=1e-10)


def test_analytic_precond_makes_a_zero_network_the_exact_gaussian_jump_where_ctm_gives_ddim():
    """Gaussian data: ℓ_t = c_skip(t) exactly and κ ≡ 0, so with F_θ ≡ 0 an explicit Analytic-Precond jumper
    (κ ≡ 0; the default implicit reading is exact for the optimal student instead, docs/analytic_precond.md §2)
    is the exact jump up to the λ-grid quadrature, while CTM's is a first-order DDIM step
    with the exact denoiser, exact only as s → t. Tolerance: the Analytic-Precond integrals are
    trapezoid sums over a 121-point λ-grid (relative error ~1e-3 for ℓ = c_skip); CTM's errors are 2–99 %."""
    lam = analytic_precond.lambda_grid(analytic_precond.Config())
    stats = analytic_precond.Stats(lam, edm.precond((-lam).exp())[0], torch.zeros_like(lam))
    zero_net = lambda x_in, c_t, labels=None, noise_labels_s=None: torch.zeros_like(x_in)
    x = torch.randn(16, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    for t, s in [(80.0, 2.5), (10.0, 0.5), (2.5, 0.002), (0.5, 0.1)]:
        exact = float(gaussian_jump(torch.tensor(t), torch.tensor(s))) * x
        err = lambda outer_, t=t, s=s, exact=exact: float((ctm.G(zero_net, x, t, s, outer=outer_) - exact).abs().max())
        analytic = lambda t_, s_: analytic_precond.kappa_zero(stats, t_, s_)
        assert err(analytic) < 1e-2 * float(exact.abs().max()) and 10 * err(analytic) < err(None)


# ---- (t, u, s) sampler ---------------------------------------------------------------------------------------------

def test_tus_sampler_satisfies_sigma_min_le_s_le_u_lt_t_on_the_grid():
    g = torch.Generator().manual_seed(0)
    for N, K_max in [(18, 17), (40, 39), (10, 3), (2, 1)]:
        grid = edm.sigma_grid(N)
        seen_s_eq_u = seen_s_min = False
        for _ in range(200):
            n, k, m = ctm.sample_indices(N, K_max, 64, g)
            assert 1 <= k <= K_max and bool((n >= 0).all()) and bool((m <= N - 1).all())
            t, u, s = grid[n], grid[n + k], grid[m]
            assert bool((SIGMA_MIN <= s).all() and (s <= u).all() and (u < t).all())
            seen_s_eq_u |= bool((s == u).any())
            seen_s_min |= bool((s == SIGMA_MIN).any())
        assert seen_s_eq_u and seen_s_min


def test_number_of_teacher_steps_has_P_k_proportional_to_k():
    """Pearson chi-square at a fixed seed, 6000 draws of k on {1..17} (df = 16). Critical value of χ²_16 at
    significance 0.001: 39.252 (standard tables). The same counts must reject a uniform P(k), so the test can fail."""
    K_max, draws, critical = 17, 6000, 39.252
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(K_max, dtype=f64)
    for _ in range(draws):
        counts[ctm.sample_indices(18, K_max, 1, g)[1] - 1] += 1
    k = torch.arange(1, K_max + 1, dtype=f64)
    chi2 = lambda p: float(((counts - draws * p) ** 2 / (draws * p)).sum())
    assert chi2(k / k.sum()) < critical
    assert chi2(torch.full_like(k, 1 / K_max)) > critical


# ---- CTM loss ------------------------------------------------------------------------------------------------------

def draw(cfg, B, seed):
    g = torch.Generator().manual_seed(seed)
    n, k, m = ctm.sample_indices(cfg.N, cfg.K_max, B, g)
    grid = edm.sigma_grid(cfg.N)
    x0 = toy.gaussian(std=sd).sample(B, g)[0]
    return grid, n, k, m, x0 + grid[n][:, None] * torch.randn(B, 2, dtype=f64, generator=g)


@pytest.mark.parametrize("name", PRECONDS)
def test_ctm_loss_is_zero_up_to_solver_error_for_the_exact_jumper(name):
    """With G_θ = G_θ⁻ = the exact Gaussian jump, x_est is the exact ODE solution at σ_min and x_target differs only
    by the teacher's Heun error e at u, carried exactly to σ_min: L = gaussian_jump(u, σ_min)²·mean(e²)."""
    cfg, net = ctm.Config(use_dsm=False), ExactGaussianNet(beta_alpha(name))
    teacher, outer_ = toy.gaussian(std=sd).denoiser, outer(name)
    for seed in range(10):
        grid, n, k, m, x_t = draw(cfg, 256, seed)
        L = ctm.ctm_distance(cfg, net, net, teacher, x_t, n, k, m, outer=outer_)
        t, u = grid[n][:, None], grid[n + k][:, None]
        e = ctm.teacher_solver(teacher, x_t, grid, n, k) - gaussian_jump(t, u) * x_t   # Heun error at u
        expected = (gaussian_jump(u, SIGMA_MIN) ** 2 * e.square()).mean(1)             # squared_l2: a mean
        torch.testing.assert_close(L, expected, rtol=1e-8, atol=1e-18)
        assert float(L.detach().max()) < 1e-4 * float(x_t.square().sum(1).max())


@pytest.mark.parametrize("name", PRECONDS)
def test_ctm_gradient_flows_only_through_the_inner_call(name):
    """Online w, EMA w⁻ and the teacher's scale all require grad. Only w may get a gradient, and it must be the
    gradient through the estimate's inner call G_θ(x_t,t,s) *and* through the frozen outer θ⁻ call's input."""
    cfg, outer_ = ctm.Config(use_dsm=False), outer(name)
    net, net_ema = ExactGaussianNet(beta_alpha(name), w=0.3), ExactGaussianNet(beta_alpha(name), w=-0.2)
    teacher = ScaledDenoiser()
    grid, n, k, m, x_t = draw(cfg, 128, seed=3)
    ctm.ctm_distance(cfg, net, net_ema, teacher, x_t, n, k, m, outer=outer_).sum().backward()
    assert net_ema.w.grad is None and teacher.scale.grad is None
    t, u, s = (grid[i][:, None] for i in (n, n + k, m))
    a = lambda t_, s_: beta_alpha(name)(t_, s_ + 0 * t_)[1] / (sd**2 + t_**2).sqrt()   # dG/dw / x_t = α·c_in(t)
    A = gaussian_jump(s, SIGMA_MIN) + (-0.2) * a(s, SIGMA_MIN)          # the outer θ⁻ jump s → σ_min, linear
    x_u = ctm.teacher_solver(teacher, x_t, grid, n, k)
    est = A * (gaussian_jump(t, s) + 0.3 * a(t, s)) * x_t
    tgt = A * (gaussian_jump(u, s) + 0.3 * a(u, s)) * x_u
    expected = (2 * (est - tgt) * A * a(t, s) * x_t).mean(1).sum()      # d/dw of mean_dims (est − sg(tgt))²
    torch.testing.assert_close(net.w.grad, expected, rtol=1e-10, atol=0.0)


def test_loss_without_dsm_is_the_ctm_distance_at_x_t_equal_x0_plus_t_z():
    cfg, net, teacher = ctm.Config(use_dsm=False), random_mlp(0), toy.ring8().denoiser
    x0 = toy.ring8().sample(64, torch.Generator().manual_seed(0))[0]
    L = ctm.loss(cfg, net, net, teacher, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)                                  # the documented order: k, n, m, then z
    n, k, m = ctm.sample_indices(cfg.N, cfg.K_max, 64, g)
    x_t = x0 + edm.sigma_grid(cfg.N)[n][:, None] * torch.randn(64, 2, dtype=f64, generator=g)
    torch.testing.assert_close(L, ctm.ctm_distance(cfg, net, net, teacher, x_t, n, k, m), rtol=1e-12, atol=0.0)


def test_ctm_distance_uses_the_distance_it_is_given():
    cfg, net, teacher = ctm.Config(use_dsm=False), random_mlp(4), toy.ring8().denoiser
    grid, n, k, m, x_t = draw(cfg, 64, seed=5)
    d = lambda distance: ctm.ctm_distance(cfg, net, net, teacher, x_t, n, k, m, distance=distance)
    assert float(d(edm.squared_l2).min()) > 0
    torch.testing.assert_close(d(edm.l2), (2 * d(edm.squared_l2)).sqrt(), rtol=1e-12, atol=0.0)  # ‖δ‖ = sqrt(2·mean δ²)


# ---- DSM and the adaptive balance ----------------------------------------------------------------------------------

class ExactDenoiserNet(nn.Module):
    """A raw network whose g_θ(x, σ, σ) is the exact ring8 denoiser, plus a constant offset δ."""

    def __init__(self, delta=0.0):
        super().__init__()
        self.delta, self.D = delta, toy.ring8().denoiser

    def forward(self, x_in, c_t, class_labels=None, noise_labels_s=None):
        sigma = (4 * c_t).exp()
        sig = sigma[:, None]                                                  # EDM Table 1, written out
        c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2).sqrt()
        x = x_in * (sig**2 + sd**2).sqrt()                                    # undo c_in = 1/sqrt(σ² + σ_d²)
        return (self.D(x, sigma) - c_skip * x) / c_out + self.delta


def test_dsm_with_the_exact_denoiser_is_lower_than_with_a_perturbed_one():
    cfg = ctm.Config()
    x0 = toy.ring8().sample(4096, torch.Generator().manual_seed(0))[0]
    dsm = lambda net: float(ctm.dsm_loss(cfg, net, x0, generator=torch.Generator().manual_seed(1)).mean())
    exact = dsm(ExactDenoiserNet())
    for delta in (0.1, -0.1, 0.3):
        assert exact < dsm(ExactDenoiserNet(delta))


def test_dsm_sigma_sampler_is_half_lognormal_half_karras_ramp():
    sigma = ctm.dsm_sigma(ctm.Config(), 20000, torch.Generator().manual_seed(0))
    ln_first = sigma[:10000].log()
    assert abs(float(ln_first.mean()) + 1.2) < 0.05 and abs(float(ln_first.std()) - 1.2) < 0.05
    ramp = sigma[10000:]
    lo = (SIGMA_MAX ** (1 / 7) + 0.7 * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7    # ≈ 0.318
    assert float(ramp.min()) >= lo and float(ramp.max()) <= SIGMA_MAX and abs(lo - 0.318) < 1e-3


def test_adaptive_weight_equalises_the_last_layer_gradient_norms():
    cfg, net = ctm.Config(), random_mlp(1)
    x0 = toy.ring8().sample(128, torch.Generator().manual_seed(0))[0]
    g = torch.Generator().manual_seed(2)
    n, k, m = ctm.sample_indices(cfg.N, cfg.K_max, 128, g)
    x_t = x0 + edm.sigma_grid(cfg.N)[n][:, None] * torch.randn(128, 2, dtype=f64, generator=g)
    L_ctm = ctm.ctm_distance(cfg, net, copy.deepcopy(net), toy.ring8().denoiser, x_t, n, k, m).mean()
    L_dsm = ctm.dsm_loss(cfg, net, x0, generator=g).mean()
    W = net.out[-1].weight
    lam = ctm.adaptive_weight(L_ctm, L_dsm, W)
    norm = lambda L: torch.autograd.grad(L, W, retain_graph=True)[0].norm()
    assert not lam.requires_grad and 0 < float(lam) < 1e4
    torch.testing.assert_close(norm(lam * L_dsm) + lam * 1e-4, norm(L_ctm), rtol=1e-10, atol=0.0)


def test_adaptive_weight_under_fp16_autocast_needs_the_loss_scale_and_then_matches_fp32():
    """A 32×32 SongUNet whose jumper is the exact Gaussian flow plus α·NN_θ with NN_θ ≈ 0 (EDM's near-zero output
    layer), on N(0, σ_d²I) data and the ImageNet-64 grid (N = 40): L_CTM is only the teacher's Heun error, ~1e-10, as
    for a student close to convergence. Under fp16 autocast the last layer's gradient of the unscaled batch mean
    underflows to exactly 0, so λ = 0. Multiplied by the GradScaler's initial scale 2^16, the same ratio matches
    fp32, written out here as ‖∇L_CTM‖ / (‖∇L_DSM‖ + 1e-4)."""
    torch.manual_seed(0)
    net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                   attn_resolutions=[], dropout=0.0, embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], s_embedding=True)
    W = net.dec["32x32_aux_conv"].weight                                        # θ_L, as train.py picks it
    teacher = lambda x, sigma, labels=None: x * edm.bcast(sd**2 / (sigma.double() ** 2 + sd**2), x)  # exact
    exact_flow = lambda t, s: (((s**2 + sd**2) / (t**2 + sd**2)).sqrt(), (1 - s / t) * sd * t / (t**2 + sd**2).sqrt())
    cfg, B = ctm.Config(N=40, K_max=1), 4
    x0 = sd * torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def losses(fp16):
        g = torch.Generator().manual_seed(2)
        n, k, m = ctm.sample_indices(cfg.N, cfg.K_max, B, g)
        x_t = x0 + edm.sigma_grid(cfg.N)[n].float()[:, None, None, None] * torch.randn(x0.shape, generator=g)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            L_ctm = ctm.ctm_distance(cfg, net, net, teacher, x_t, n, k, m, outer=exact_flow).mean()
            return L_ctm, ctm.dsm_loss(cfg, net, x0, generator=g).mean()

    L_ctm, L_dsm = losses(fp16=False)
    norm = lambda L: torch.autograd.grad(L, W, retain_graph=True)[0].norm()
    expected = float(norm(L_ctm) / (norm(L_dsm) + 1e-4))
    assert float(L_ctm) < 1e-9 and expected > 0
    L_ctm, L_dsm = losses(fp16=True)
    assert float(ctm.adaptive_weight(L_ctm, L_dsm, W)) == 0.0                 # the underflow
    assert float(ctm.adaptive_weight(L_ctm, L_dsm, W, grad_scale=2.0**16)) == pytest.approx(expected, rel=1e-3)


def test_loss_with_dsm_requires_the_last_layer():
    x0 = toy.ring8().sample(8, torch.Generator().manual_seed(0))[0]
    net = random_mlp(0)
    try:
        ctm.loss(ctm.Config(), net, net, toy.ring8().denoiser, x0)
    except ValueError:
        return
    raise AssertionError("ctm.loss accepted use_dsm=True without last_layer")


# ---- γ-sampling ----------------------------------------------------------------------------------------------------

def test_gamma_one_reproduces_cm_multistep_sampling():
    """CM's multistep sampler (Song et al. 2023, arXiv:2303.01469v2, Alg. 1) written out with f(x, τ) = G_θ(x,τ,σ_min)
    on the same network, grid τ and noise stream."""
    net, cfg = random_mlp(2), ctm.Config(gamma=1.0)
    noise = torch.randn(32, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    for nfe in (1, 2, 4):
        path = []
        x_ctm = ctm.sample(cfg, net, noise, nfe=nfe, generator=torch.Generator().manual_seed(9), path=path)
        assert len(path) == nfe + 1 and torch.equal(path[0], SIGMA_MAX * noise)
        tau, g = edm.sigma_grid(nfe + 1).tolist(), torch.Generator().manual_seed(9)
        f = lambda x_, t_: ctm.G(net, x_, t_, SIGMA_MIN)
        x = f(SIGMA_MAX * noise, SIGMA_MAX)                                    # Alg. 1: x ← f(x̂_T, T)
        for t_n in tau[1:-1]:                                                  # Alg. 1: for each τ
            z = torch.randn(x.shape, dtype=f64, generator=g)                   # Alg. 1: z
            x = f(x + math.sqrt(t_n**2 - SIGMA_MIN**2) * z, t_n)               # Alg. 1: x ← f(x + sqrt(τ² − ε²)z, τ)
        torch.testing.assert_close(x_ctm, x, rtol=1e-12, atol=1e-12)


def test_gamma_zero_is_deterministic_long_jumps_given_the_noise():
    net, cfg = random_mlp(3), ctm.Config(gamma=0.0)
    noise = torch.randn(32, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    run = lambda c, seed: ctm.sample(c, net, noise, nfe=3, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(cfg, 0), run(cfg, 1))
    t = edm.sigma_grid(4).tolist()
    x = SIGMA_MAX * noise
    for i in range(3):
        x = ctm.G(net, x, t[i], t[i + 1])
    torch.testing.assert_close(run(cfg, 0), x, rtol=1e-12, atol=1e-12)
    half = ctm.Config(gamma=0.5)
    assert not torch.allclose(run(half, 0), run(half, 1))                      # γ > 0 is stochastic
