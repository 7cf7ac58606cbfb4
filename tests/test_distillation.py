"""Distillation as an exact question: on Gaussian data the teacher's Heun step is linear, x ↦ h_n·x, so the fixed
point of CD training (Song et al., arXiv:2303.01469v2, Alg. 2 with μ = 0) is known in closed form. A student that can
represent it must reach it, and its one-step sample must then be the teacher's whole Heun chain from T to ε."""
import torch

import paper
from algorithms import cd, edm
from data import toy

f64 = torch.float64


class PerLevel(torch.nn.Module):
    """F(x_in, c_noise) = a_n·x_in with one trainable scalar per grid level n (σ read back from c_noise = ln σ/4):
    for Gaussian data every consistency function f(x, t_n) = k_n·x is of this form."""

    def __init__(self, grid):
        super().__init__()
        self.log_grid, self.a = grid.log(), torch.nn.Parameter(torch.zeros(len(grid), dtype=f64))

    def forward(self, x_in, c_noise, labels=None):
        n = (4 * c_noise.to(f64)[:, None] - self.log_grid[None]).abs().argmin(1)
        return self.a[n][:, None] * x_in


def test_cd_training_reaches_the_teachers_heun_chain_on_gaussian_data():
    cfg, ds = cd.Config(N=10), toy.gaussian(std=0.5)
    grid = torch.tensor(paper.karras_grid(cfg.N), dtype=f64)
    one = torch.ones(1, 2, dtype=f64)
    # Fixed point of Alg. 2 with f = k_n·x: k_{N−1} = 1 (f(x, ε) = x), and k_n = h_n·k_{n+1}, h_n the gain of one
    # Heun step of the exact denoiser from t_n to t_{n+1} (EDM Alg. 1 l. 4–8).
    k = [1.0]
    for n in range(cfg.N - 2, -1, -1):
        k.insert(0, float(paper.heun(ds.denoiser, one, float(grid[n]), float(grid[n + 1]))[0, 0]) * k[0])
    k = torch.tensor(k, dtype=f64)
    net, net_ema = PerLevel(grid), PerLevel(grid)
    learned = lambda: cd.f(cfg, net, one.expand(cfg.N, 2), grid)[:, 0].detach()      # k_n of the student
    start_err = float(((learned() - k) / k).abs()[:-1].max())
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 400)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x = ds.sample(256, g)[0]
        opt.zero_grad()
        cd.loss(cfg, net, net_ema, ds.denoiser, x, generator=g).mean().backward()
        opt.step()
        sched.step()
        edm.ema_update_(net_ema, net, cfg.mu)                                       # θ⁻ ← θ (μ = 0)
    err = float(((learned() - k) / k).abs().max())
    assert start_err > 0.5 and err < 1e-3, (start_err, err)
    # The distilled one-step sampler is the teacher's N − 1 Heun steps from T to ε.
    noise = torch.randn(64, 2, dtype=f64, generator=g)
    x = noise * cfg.sigma_max
    for n in range(cfg.N - 1):
        x = paper.heun(ds.denoiser, x, float(grid[n]), float(grid[n + 1]))
    torch.testing.assert_close(cd.sample(cfg, net, noise, nfe=1), x, rtol=1e-3, atol=1e-6)
