"""Multistep consistency models (Heek et al. 2024, arXiv:2403.06807v3, Alg. 1–2): the paper's claims about its
algorithms that a few lines of float64 can check."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from algorithms import addim, edm, mcm
from data import toy
from networks.mlp import MLP

f64 = torch.float64


class DenoiserAsNet(nn.Module):
    """A raw network F whose EDM-preconditioned D_θ (edm.denoise) is exactly the given denoiser,
    F = (D − c_skip x)/c_out. It makes `f = the teacher` in the Alg. 2 check."""

    def __init__(self, D, sigma_data=edm.SIGMA_DATA):
        super().__init__()
        self.D, self.sigma_data = D, sigma_data

    def forward(self, x_in, noise_labels, class_labels=None, noise_labels_s=None):
        sigma = (4 * noise_labels.to(f64)).exp()                                   # c_noise = ln σ / 4
        sd, sig = self.sigma_data, sigma[:, None]
        c_skip, c_out = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2).sqrt()  # EDM Table 1, written out
        x = x_in * (sig**2 + sd**2).sqrt()                                          # undo c_in = 1/sqrt(σ² + σ_d²)
        return (self.D(x, sigma, class_labels) - c_skip * x) / c_out


def student(seed=0):
    torch.manual_seed(seed)
    return MLP(hidden=32, num_blocks=2, emb=32).to(f64)


def f(net, x, sigma):
    """The student's x̂_θ written out from EDM Eq. 7 with Table 1's coefficients (σ > 0)."""
    sig, sd = edm.bcast(sigma, x), edm.SIGMA_DATA
    c_skip, c_out, c_in = sd**2 / (sig**2 + sd**2), sig * sd / (sig**2 + sd**2).sqrt(), 1 / (sig**2 + sd**2).sqrt()
    return c_skip * x + c_out * net(c_in * x, (sig.log() / 4).flatten())


def rho_w(cfg, delta, sigma_t):
    """Pseudo-Huber on the RMS norm times SNR + 1 (the RMS reading of mcm.py's docstring; Alg. 1)."""
    rho = (delta.square().mean(1) + cfg.huber_eps**2).sqrt() - cfg.huber_eps
    return (1 / sigma_t**2 + 1) * rho


def test_teacher_steps_anneal_log_linearly_from_64_to_1280():
    cfg = mcm.Config(anneal_iters=1000)
    assert mcm.teacher_steps(cfg, 0) == pytest.approx(64, rel=1e-12)
    assert mcm.teacher_steps(cfg, 1000) == pytest.approx(1280, rel=1e-12)
    assert mcm.teacher_steps(cfg, 5000) == pytest.approx(1280, rel=1e-12)
    assert mcm.teacher_steps(cfg, 500) == pytest.approx(math.sqrt(64 * 1280), rel=1e-12)    # ≈ 286, App. A.1
    steps = [mcm.teacher_steps(cfg, i) for i in range(0, 1001, 50)]
    assert all(a < b for a, b in zip(steps, steps[1:]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 2, 3, 4, 8, 16]), st.integers(0, 200_000), st.integers(0, 2**31))
def test_no_sampled_t_equals_a_segment_start(S, i, seed):
    """t ∈ (t_step, t_step + 1/S], s = t − 1/T ∈ [t_step, t), and the segment of t is ceil(tS) − 1 (Alg. 1, Alg. 2)."""
    cfg = mcm.Config(S=S)
    t_step, t, s = mcm.sample_times(cfg, 4096, i, torch.Generator().manual_seed(seed))
    T = S * max(1, round(mcm.teacher_steps(cfg, i) / S))
    assert bool((t > t_step).all()) and bool((t <= t_step + 1 / S + 1e-15).all())
    assert bool((s >= t_step).all()) and bool((s < t).all())
    torch.testing.assert_close(t - s, torch.full_like(t, 1 / T), rtol=0, atol=1e-15)
    assert bool(((t * S - 1e-9).ceil() - 1 == (t_step * S).round()).all())


def test_mcm_loss_with_one_segment_is_the_cm_loss():
    """1-step MCM is a CM: with S = 1 (t_step = 0, σ = 0) the target is sg x̂_θ(x_s, s), the classic CM loss, and at the
    boundary s = 0 it is the teacher point x_s itself."""
    cfg, net, g = mcm.Config(S=1), student(), torch.Generator().manual_seed(0)
    t_step, t, s = mcm.sample_times(cfg, 64, 0, g)
    assert bool((t_step == 0).all()) and bool((s == 0).any()) and bool((s > 0).any())
    x_t, x_s = torch.randn(64, 2, dtype=f64, generator=g), torch.randn(64, 2, dtype=f64, generator=g)
    sigma_t, sigma_s = addim.sigma_of_t(t), addim.sigma_of_t(s)
    got = mcm.consistency_loss(cfg, net, x_t, x_s, t_step, t, s)
    target = torch.where((s > 0)[:, None], f(net, x_s, sigma_s.clamp(min=1e-3)), x_s).detach()  # sg: Alg. 1
    expected = rho_w(cfg, f(net, x_t, sigma_t) - target, sigma_t)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grads = [torch.autograd.grad(l.sum(), list(net.parameters())) for l in (got, expected)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_ct_loss_with_one_teacher_step_per_segment_is_a_diffusion_loss():
    """∞-step MCM is diffusion: N/S = 1 gives s = t_step, x_s = x + σ_s ε and target x; the loss is
    w(t)·ρ(x̂_θ(x_t, t) − x). The draws are reproduced from the same generator seed."""
    for S in (1, 4, 8):
        cfg, net = mcm.Config(S=S, N_start=S, N_end=S), student()
        x = torch.randn(128, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
        got = mcm.loss_ct(cfg, net, x, step=7, generator=torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(2)
        _, t, _ = mcm.sample_times(cfg, 128, 7, g)
        eps = torch.randn(x.shape, dtype=f64, generator=g)
        sigma_t = addim.sigma_of_t(t)
        torch.testing.assert_close(got, rho_w(cfg, f(net, x + sigma_t[:, None] * eps, sigma_t) - x, sigma_t),
                                   rtol=1e-10, atol=1e-12)


def test_boundary_anchor_target_is_the_teacher_for_ddim_and_not_for_addim():
    """The boundary anchor (Eq. 8): at n_rel = 1 the target does not depend on the student. With a DDIM teacher it
    is x_teacher; with aDDIM (x_var > 0) it is a different point."""
    cfg, g = mcm.Config(S=4), torch.Generator().manual_seed(3)
    data = toy.ring8()
    t_step = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=f64)
    t, s = t_step + 1 / 64, t_step
    x = data.sample(4, generator=g)[0]
    sigma_t, sigma_s = addim.sigma_of_t(t), addim.sigma_of_t(s)
    x_t = x + sigma_t[:, None] * torch.randn(4, 2, dtype=f64, generator=g)
    x_teacher = data.denoiser(x_t, sigma_t)
    x_var = addim.x_var_empirical(x, x_teacher, cfg.eta)
    for net in (student(0), student(1)):
        x_hat = f(net, x_t, sigma_t)
        ddim_loss = mcm.consistency_loss(cfg, net, x_t, addim.ddim(x_teacher, x_t, sigma_t, sigma_s), t_step, t, s)
        torch.testing.assert_close(ddim_loss, rho_w(cfg, x_hat - x_teacher, sigma_t), rtol=1e-10, atol=1e-12)
        x_s = addim.addim(x_teacher, x_t, sigma_t, sigma_s, x_var)
        x_target = addim.inverse_ddim(x_s, x_t, sigma_t, sigma_s)
        addim_loss = mcm.consistency_loss(cfg, net, x_t, x_s, t_step, t, s)
        torch.testing.assert_close(addim_loss, rho_w(cfg, x_hat - x_target, sigma_t), rtol=1e-10, atol=1e-12)
    assert bool(((x_target - x_teacher).norm(dim=1) > 1e-6).all())


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 0.9), st.floats(0.05, 1.0), st.integers(0, 2**31))
def test_z_space_residual_is_c_times_the_x_space_residual(t_step, width, seed):
    """Eq. 6 vs Eq. 7: DDIM_{t→t_step}(x̂) − DDIM_{t→t_step}(x_target) = (1 − σ_step/σ_t)(x̂ − x_target),
    i.e. the paper's c(t, t_step)/α_{t_step}, so the x-space loss is the z-space loss rescaled per example."""
    g = torch.Generator().manual_seed(seed)
    x_hat, x_target, x_t = (torch.randn(3, 2, dtype=f64, generator=g) for _ in range(3))
    sigma_step, sigma_t = addim.sigma_of_t(t_step), addim.sigma_of_t(min(t_step + width, 1.0))
    lhs = addim.ddim(x_hat, x_t, sigma_t, sigma_step) - addim.ddim(x_target, x_t, sigma_t, sigma_step)
    torch.testing.assert_close(lhs, (1 - sigma_step / sigma_t) * (x_hat - x_target), rtol=1e-10, atol=1e-12)


def test_sampling_with_the_teacher_as_student_is_s_step_ddim_of_the_teacher():
    """Alg. 2 with f = the teacher equals S-step DDIM, here written in the paper's VP form (Eq. 4) on the
    cosine schedule α_t = cos(πt'/2), σ_t = sin(πt'/2), t' = t·(2/π)atan σ_max, and mapped back by x = z_0."""
    data = toy.two_modes()
    net, noise = DenoiserAsNet(data.denoiser), torch.randn(32, 2, dtype=f64, generator=torch.Generator().manual_seed(4))
    for S in (1, 2, 4, 8):
        path = []
        got = mcm.sample(mcm.Config(S=S), net, noise, path=path)
        c = 2 / math.pi * math.atan(80.0)
        z = math.cos(math.pi / 2 * c) * 80.0 * noise                                      # z_1 = α_1·(σ_max·noise)
        for k in range(S, 0, -1):
            a_t, s_t = math.cos(math.pi / 2 * c * k / S), math.sin(math.pi / 2 * c * k / S)
            a_s, s_s = math.cos(math.pi / 2 * c * (k - 1) / S), math.sin(math.pi / 2 * c * (k - 1) / S)
            x_hat = data.denoiser(z / a_t, s_t / a_t)                                    # f(z_t, t)
            z = a_s * x_hat + s_s / s_t * (z - a_t * x_hat)                               # Eq. 4
        torch.testing.assert_close(got, z, rtol=1e-10, atol=1e-10)
        assert len(path) == S + 1
        torch.testing.assert_close(path[0], 80.0 * noise, rtol=1e-12, atol=0)


def test_sample_needs_exactly_s_network_calls():
    calls = []
    net = student()
    counting = lambda *a, **k: calls.append(1) or net(*a, **k)
    mcm.sample(mcm.Config(S=4), counting, torch.randn(8, 2, dtype=f64))
    assert len(calls) == 4
    with pytest.raises(ValueError):
        mcm.sample(mcm.Config(S=4), net, torch.randn(8, 2, dtype=f64), nfe=1)


def test_cd_loss_is_finite_at_the_sigma_zero_boundary():
    """S = 1 with one teacher step: every s is t_step = 0, where σ = 0 and the student is never evaluated."""
    cfg, net, data = mcm.Config(S=1, N_start=1, N_end=1), student(), toy.ring8()   # every s is the σ = 0 boundary
    x = data.sample(64, generator=torch.Generator().manual_seed(5))[0]
    loss = mcm.loss(cfg, net, data.denoiser, x, generator=torch.Generator().manual_seed(6))
    assert loss.shape == (64,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
