"""Noise-level distributions and loss weights, against the papers' formulas at reproduced random draws.

Any distribution of σ keeps the exact denoiser optimal, so a minimiser test cannot see a wrong p(σ) or λ(σ): these
tests replay the loss's draws from the same generator and compare with the formula written out (tests/paper.py).
EDM: Karras et al., arXiv:2206.00364v2 (Eq. 7, Eq. 8, Table 1)."""
import math

import torch
from hypothesis import given, settings, strategies as st

import paper
from algorithms import edm

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
