"""Noise-level distributions and loss weights, against the papers' formulas at reproduced random draws.

Any distribution of σ keeps the exact denoiser optimal, so a minimiser test cannot see a wrong p(σ) or λ(σ): these
tests replay the loss's draws from the same generator and compare with the formula written out (tests/paper.py).
EDM: Karras et al., arXiv:2206.00364v2 (Eq. 7, Eq. 8, Table 1)."""
import dataclasses
import math

import torch
from hypothesis import given, settings, strategies as st

import paper
from algorithms import ctm, edm
from data import toy
from networks.mlp import MLP

f64 = torch.float64


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-4, 1e3), st.floats(0.1, 2.0))
def test_edm_preconditioning_is_table_1(sigma, sigma_data):
    got = edm.precond(torch.tensor(sigma, dtype=f64), sigma_data)
    for a, b in zip(got, paper.edm_c(sigma, sigma_data)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def test_edm_denoiser_calls_the_network_at_c_in_x_and_c_noise_and_mixes_with_c_skip_and_c_out():
    """Eq. 7, D = c_skip·x + c_out·F(c_in·x; c_noise), with σ_d = 0.7 passed through (not the default 0.5)."""
    net, labels = paper.Probe(3, seed=1, label_dim=4), torch.eye(4, dtype=f64)[[0, 3, 1, 2, 2]]
    x = torch.randn(5, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.003, 0.2, 1.0, 7.0, 60.0], dtype=f64)
    got = edm.denoise(net, x, sigma, labels, sigma_data=0.7)
    ref = paper.Probe(3, seed=1, label_dim=4)
    torch.testing.assert_close(got, paper.edm_D(ref, x, sigma, labels, sd=0.7), rtol=1e-13, atol=0)
    (x_in, c_noise, _), = net.calls
    torch.testing.assert_close(c_noise, sigma.log() / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(x_in, x / (sigma**2 + 0.49).sqrt()[:, None], rtol=1e-14, atol=0)
    wrapped = edm.Denoiser(net, sigma_data=0.7)
    torch.testing.assert_close(wrapped(x, sigma, labels), got, rtol=0, atol=0)


CFG = edm.Config(sigma_data=0.7, P_mean=-0.4, P_std=1.7)  # unequal values, so that a swapped field shows


def test_edm_loss_is_lambda_weighted_squared_error_at_lognormal_sigma():
    """Eq. 8 with Table 1: ln σ = P_mean + P_std·ξ, n = σ·z, loss = λ(σ)·Σ_pixels (D(y + n; σ) − y)², replayed
    from the documented draw order (ξ [B], then z [B, d])."""
    x = torch.randn(64, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    got = edm.loss(CFG, paper.Probe(3), x, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sigma = torch.exp(CFG.P_mean + CFG.P_std * torch.randn(64, dtype=f64, generator=g))
    y_n = x + sigma[:, None] * torch.randn(64, 3, dtype=f64, generator=g)
    err = (paper.edm_D(paper.Probe(3), y_n, sigma, sd=CFG.sigma_data) - x).square().sum(1)
    torch.testing.assert_close(got, paper.edm_lambda(sigma, CFG.sigma_data) * err, rtol=1e-12, atol=0)


def test_edm_training_sigma_is_lognormal_with_table_1_parameters():
    """Whatever the draw order: the σ at which the network is called (c_noise = ln σ/4) has ln σ with mean P_mean and
    standard deviation P_std. 20 000 draws: standard errors 1.7/√20000 = 0.012 (mean) and 1.7/√40000 = 0.0085 (std);
    the bounds are 5 of them."""
    net, B = paper.Probe(2), 20_000
    edm.loss(CFG, net, torch.zeros(B, 2, dtype=f64), generator=torch.Generator().manual_seed(3))
    ln_sigma = 4 * net.calls[0][1]
    assert abs(float(ln_sigma.mean()) - CFG.P_mean) < 5 * CFG.P_std / math.sqrt(B)
    assert abs(float(ln_sigma.std()) - CFG.P_std) < 5 * CFG.P_std / math.sqrt(2 * B)


def test_edm_loss_weight_makes_the_effective_weight_of_the_network_output_one():
    """Sec. 5 / Eq. 8: λ(σ)·c_out(σ)² = 1, so the loss is the unweighted ‖F − F_target‖² of the raw network. With a
    network that outputs its target plus a constant δ, every example's loss is exactly d·δ²."""
    sd, delta = CFG.sigma_data, 0.125

    class TargetPlusDelta(torch.nn.Module):
        def forward(self, x_in, c_noise, labels=None):
            sigma = (4 * c_noise)[:, None].exp()
            y_n = x_in * (sigma**2 + sd**2).sqrt()
            c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
            return (self.y - c_skip * y_n) / c_out + delta                       # F_target = (y − c_skip·(y+n))/c_out

    net = TargetPlusDelta()
    net.y = torch.randn(256, 3, dtype=f64, generator=torch.Generator().manual_seed(1))
    got = edm.loss(CFG, net, net.y, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, torch.full((256,), 3 * delta**2, dtype=f64), rtol=1e-9, atol=0)


# ---- CTM's DSM term and its adaptive balance (Kim et al., arXiv:2310.02279v3; the official code's defaults) --------

def ctm_mlp(seed):
    """An MLP student with a randomised s-path (zero at initialisation), so that its output depends on s."""
    torch.manual_seed(seed)
    net = MLP(s_embedding=True, hidden=16, emb=16, num_blocks=1).to(f64)
    for block in net.blocks:
        torch.nn.init.normal_(block.affine_s.weight, std=0.3)
    return net


DSM_CFG = ctm.Config(sigma_data=0.6, sigma_min=0.01, sigma_max=20.0, rho=5.0, P_mean=-0.4, P_std=1.7,
                     diffusion_mult=0.5, N=8, K_max=5)


def dsm_replay(cfg, net, x, g):
    """The DSM draws in order: ξ [B//2] for ln σ = P_mean + P_std ξ, r [B − B//2] uniform on [0, diffusion_mult]
    for σ = (σ_max^{1/ρ} + r(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then z [B, d]; the loss is
    λ(σ)·mean_pixels(g(x + σz, σ, σ) − x)²."""
    B, h = x.shape[0], x.shape[0] // 2
    lognormal = torch.exp(cfg.P_mean + cfg.P_std * torch.randn(h, dtype=f64, generator=g))
    r = cfg.diffusion_mult * torch.rand(B - h, dtype=f64, generator=g)
    a, b = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    sigma = torch.cat([lognormal, (a + r * (b - a)) ** cfg.rho])
    z = torch.randn(x.shape, dtype=f64, generator=g)
    D = paper.ctm_g(net, x + sigma[:, None] * z, sigma, sigma, sd=cfg.sigma_data)
    return paper.edm_lambda(sigma, cfg.sigma_data) * (D - x).square().mean(1), sigma


def test_ctm_dsm_loss_is_edm_weighted_denoising_at_half_lognormal_half_karras_sigma():
    x = toy.ring8().sample(300, torch.Generator().manual_seed(0))[0]
    got = ctm.dsm_loss(DSM_CFG, paper.Probe(2), x, generator=torch.Generator().manual_seed(1))
    expected, sigma = dsm_replay(DSM_CFG, paper.Probe(2), x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=0)
    lo = (20.0 ** 0.2 + 0.5 * (0.01 ** 0.2 - 20.0 ** 0.2)) ** 5                       # the ramp's smallest σ
    assert float(sigma[150:].min()) >= lo and float(sigma[150:].max()) <= 20.0


def test_ctm_loss_adds_dsm_scaled_by_the_ratio_of_ctm_to_dsm_last_layer_gradient_norms():
    """L = L_CTM + λ·L_DSM with λ = dsm_weight·‖∇_{θ_L} mean L_CTM‖ / (‖∇_{θ_L} mean L_DSM‖ + 1e-4): the DSM term is
    scaled so that its gradient on the last layer matches the consistency term's, not the other way round. Every
    term written out at the replayed draws (CTM's first, then DSM's)."""
    cfg = dataclasses.replace(DSM_CFG, use_dsm=True, dsm_weight=0.7)
    ds = toy.ring8()
    x = ds.sample(64, torch.Generator().manual_seed(0))[0]
    net, net_ema = ctm_mlp(0), ctm_mlp(1)
    W = net.out[-1].weight
    got = ctm.loss(cfg, net, net_ema, ds.denoiser, x, generator=torch.Generator().manual_seed(2), last_layer=W)
    g = torch.Generator().manual_seed(2)
    L_ctm = paper.ctm_soft_matching(cfg, net, net_ema, ds.denoiser, x, *paper.ctm_draws(cfg, x, g))
    L_dsm, _ = dsm_replay(cfg, net, x, g)
    norm = lambda L: torch.autograd.grad(L.mean(), W, retain_graph=True)[0].norm()
    lam = cfg.dsm_weight * norm(L_ctm) / (norm(L_dsm) + 1e-4)
    assert not 0.5 < float(lam) / cfg.dsm_weight < 2                            # the balance is far from 1 here
    torch.testing.assert_close(got, L_ctm + lam * L_dsm, rtol=1e-9, atol=1e-14)
    # λ is a constant: the gradient of L is ∇L_CTM + λ∇L_DSM
    grad = torch.autograd.grad(got.mean(), W, retain_graph=True)[0]
    ref = torch.autograd.grad((L_ctm + lam.detach() * L_dsm).mean(), W)[0]
    torch.testing.assert_close(grad, ref, rtol=1e-8, atol=1e-14)


def test_edm_denoiser_broadcasts_per_example_sigma_over_image_shaped_data():
    """Eq. 7 on [B, C, H, W] data: every pixel of example b uses σ_b's coefficients."""
    x = torch.randn(3, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=f64)
    net = lambda x_in, c_noise, labels=None: torch.tanh(x_in) * c_noise[:, None, None, None]
    c_skip, c_out, c_in, c_noise = paper.edm_c(sigma, 0.6)
    b = lambda v: v[:, None, None, None]
    expected = b(c_skip) * x + b(c_out) * torch.tanh(b(c_in) * x) * b(c_noise)
    torch.testing.assert_close(edm.denoise(net, x, sigma, sigma_data=0.6), expected, rtol=1e-13, atol=1e-15)
