"""How the distillation losses draw their times and noise, and what they do with them, against the algorithms written
out at the same draws: each test replays the loss's random draws from a generator with the same seed, in the
documented order, and recomputes the loss from the paper (tests/paper.py), never with the module's helpers.

MCM: Heek et al., arXiv:2403.06807v3, Alg. 1 and App. A.1."""
import math

import torch

import paper
from algorithms import mcm
from data import toy

f64 = torch.float64


# ---- MCM (Alg. 1) -------------------------------------------------------------------------------------------------

MCM_CFG = dict(S=4, N_start=8, N_end=64, anneal_iters=10, eta=0.6, huber_eps=1e-3, sigma_data=0.6, sigma_max=40.0)


def mcm_times(cfg, B, i, g):
    """Alg. 1 with App. A.1's annealing: T = S·round(N(i)/S) teacher steps on [0, 1]; a segment step ~ U{0..S−1}, a
    step n_rel ~ U{1..T/S} inside it; t = step/S + n_rel/T, s = t − 1/T."""
    frac = min(max(i / cfg.anneal_iters, 0.0), 1.0)
    N = math.exp(math.log(cfg.N_start) + frac * (math.log(cfg.N_end) - math.log(cfg.N_start)))
    per_seg = max(1, round(N / cfg.S))
    T = per_seg * cfg.S
    step = torch.randint(0, cfg.S, (B,), generator=g)
    n_rel = torch.randint(1, per_seg + 1, (B,), generator=g)
    t_step = step.to(f64) / cfg.S
    t = t_step + n_rel.to(f64) / T
    return T, t_step, t, t - 1 / T


def mcm_expected(cfg, net, x, x_t, x_s, t_step, t, s):
    """Alg. 1 from the teacher point x_s on: x_ref = DDIM_{s→t_step}(sg x̂_θ(x_s, s), x_s) (x_s itself where s = t_step),
    target = invDDIM_{t→t_step}(x_ref, x_t), loss = (SNR(t) + 1)·(sqrt(‖x̂_θ(x_t, t) − target‖²/d + ε²) − ε)."""
    sig = lambda u: paper.vp_time_to_sigma(u, cfg.sigma_max)
    sigma_step, sigma_t, sigma_s = sig(t_step), sig(t), sig(s)
    with torch.no_grad():
        x_ref = x_s.clone()
        inner = s > t_step + 1e-12
        x_ref[inner] = paper.ddim(paper.edm_D(net, x_s[inner], sigma_s[inner], sd=cfg.sigma_data), x_s[inner],
                                  sigma_s[inner], sigma_step[inner])
        target = paper.inverse_ddim(x_ref, x_t, sigma_t, sigma_step)
    delta = paper.edm_D(net, x_t, sigma_t, sd=cfg.sigma_data) - target
    rho = torch.sqrt(delta.square().mean(1) + cfg.huber_eps**2) - cfg.huber_eps
    return (1 / sigma_t**2 + 1) * rho


def test_mcm_cd_loss_takes_an_addim_teacher_step_with_x_var_from_the_true_x():
    """Alg. 1 (CD): x_t = x + σ_t ε, x̂ = teacher(x_t), x_var = η‖x − x̂‖²/d, x_s = aDDIM_{t→s}(x̂, x_t; x_var)
    (Eq. 14), at the draws (step, n_rel, ε) replayed from the generator; at iteration i = 3 of the anneal."""
    cfg, ds = mcm.Config(**MCM_CFG), toy.ring8()
    x = ds.sample(256, torch.Generator().manual_seed(0))[0]
    got = mcm.loss(cfg, paper.Probe(2), ds.denoiser, x, step=3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    T, t_step, t, s = mcm_times(cfg, 256, 3, g)
    assert T == 16                                                            # 8·8^0.3 = 14.9 → 4 per segment
    sigma_t, sigma_s = paper.vp_time_to_sigma(t, 40.0), paper.vp_time_to_sigma(s, 40.0)
    x_t = x + sigma_t[:, None] * torch.randn(x.shape, dtype=f64, generator=g)
    x_hat = ds.denoiser(x_t, sigma_t)
    x_var = cfg.eta * (x - x_hat).square().mean(1)
    x_s = paper.addim(x_hat, x_t, sigma_t, sigma_s, x_var)
    expected = mcm_expected(cfg, paper.Probe(2), x, x_t, x_s, t_step, t, s)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the DDIM teacher step (x_var = 0) gives a different loss: the test can tell them apart
    x_s_ddim = paper.ddim(x_hat, x_t, sigma_t, sigma_s)
    ddim_expected = mcm_expected(cfg, paper.Probe(2), x, x_t, x_s_ddim, t_step, t, s)
    assert float((ddim_expected - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    ablation = mcm.loss(mcm.Config(**MCM_CFG, addim_teacher=False), paper.Probe(2), ds.denoiser, x, step=3,
                        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ablation, ddim_expected, rtol=1e-9, atol=1e-12)          # Table 4 ablation


def test_mcm_loss_draws_every_segment_and_every_teacher_step_including_the_boundary():
    """step takes all S values and n_rel all T/S values, including n_rel = 1 (s = t_step, the anchor) and n_rel = T/S
    (t at the segment's end)."""
    cfg = mcm.Config(**MCM_CFG)
    t_step, t, s = mcm.sample_times(cfg, 4000, 3, torch.Generator().manual_seed(2))
    T = 16
    k_t = torch.round(t * T).long()
    assert set((t_step * cfg.S).round().long().tolist()) == set(range(cfg.S))
    assert set((k_t - torch.round(t_step * T).long()).tolist()) == set(range(1, T // cfg.S + 1))
    torch.testing.assert_close(t - s, torch.full_like(t, 1 / T), rtol=0, atol=1e-15)


def test_mcm_sqrt_snr_weight_is_the_square_root_of_snr_plus_one():
    cfg = mcm.Config(**MCM_CFG)
    x = toy.ring8().sample(64, torch.Generator().manual_seed(0))[0]
    a = mcm.loss(cfg, paper.Probe(2), toy.ring8().denoiser, x, generator=torch.Generator().manual_seed(4))
    b = mcm.loss(mcm.Config(**MCM_CFG, sqrt_snr_weight=True), paper.Probe(2), toy.ring8().denoiser, x,
                 generator=torch.Generator().manual_seed(4))
    _, _, t, _ = mcm_times(cfg, 64, 0, torch.Generator().manual_seed(4))
    w = 1 / paper.vp_time_to_sigma(t, 40.0) ** 2 + 1
    torch.testing.assert_close(b, a / w.sqrt(), rtol=1e-10, atol=0)


def test_mcm_ct_loss_steps_the_true_x_with_ddim():
    """Alg. 1 (CT): the teacher is the data itself, x_s = DDIM_{t→s}(x, x_t) = x + σ_s ε."""
    cfg = mcm.Config(**MCM_CFG)
    x = toy.ring8().sample(128, torch.Generator().manual_seed(0))[0]
    got = mcm.loss_ct(cfg, paper.Probe(2), x, step=20, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    T, t_step, t, s = mcm_times(cfg, 128, 20, g)
    assert T == 64
    eps = torch.randn(x.shape, dtype=f64, generator=g)
    x_t = x + paper.vp_time_to_sigma(t, 40.0)[:, None] * eps
    x_s = x + paper.vp_time_to_sigma(s, 40.0)[:, None] * eps
    torch.testing.assert_close(got, mcm_expected(cfg, paper.Probe(2), x, x_t, x_s, t_step, t, s), rtol=1e-9,
                               atol=1e-12)
