"""How the distillation losses draw their times and noise, and what they do with them, against the algorithms written
out at the same draws: each test replays the loss's random draws from a generator with the same seed, in the
documented order, and recomputes the loss from the paper (tests/paper.py), never with the module's helpers.

CD: Song et al., arXiv:2303.01469v2, Alg. 2. CTM: Kim et al., arXiv:2310.02279v3, with the official code's discrete
(t, u, s) grid (algorithms/ctm.py). MCM: Heek et al., arXiv:2403.06807v3, Alg. 1 and App. A.1."""
import math

import torch

import paper
from algorithms import cd, ctm, mcm
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
    assert float((ddim_expected - expected).detach().abs().max()) > 1e-3 * float(expected.detach().abs().max())
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


# ---- CD (Alg. 2) --------------------------------------------------------------------------------------------------

CD_CFG = dict(N=6, sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=0.6)   # unequal to the defaults


def test_cd_loss_noises_to_t_n_plus_1_steps_the_teacher_to_t_n_and_compares_student_with_target():
    """Alg. 2 at replayed draws (n, z): x_{t_{n+1}} = x + t_{n+1} z, x̂ = one Heun step t_{n+1} → t_n of the teacher,
    L = d(f_θ(x_{t_{n+1}}, t_{n+1}), f_{θ⁻}(x̂, t_n)) with f of CM's App. C. Student and target are different networks,
    so their roles cannot be swapped unseen."""
    cfg, ds, B = cd.Config(**CD_CFG), toy.ring8(), 512
    x = ds.sample(B, torch.Generator().manual_seed(0))[0]
    student, target = paper.Probe(2, seed=1), paper.Probe(2, seed=2)
    got = cd.loss(cfg, student, target, ds.denoiser, x, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    n = torch.randint(0, cfg.N - 1, (B,), generator=g)                      # the pair (t_{n+1}, t_n), all N − 1 of them
    z = torch.randn(x.shape, dtype=f64, generator=g)
    grid = torch.tensor(paper.karras_grid(cfg.N, 0.01, 20.0, 5.0), dtype=f64)
    t_n1, t_n = grid[n], grid[n + 1]
    x_t = x + t_n1[:, None] * z
    x_hat = paper.heun_rows(ds.denoiser, x_t, t_n1, t_n)
    f = lambda net, x_, t_: paper.cm_f(net, x_, t_, eps=0.01, sd=0.6)
    expected = (f(paper.Probe(2, seed=1), x_t, t_n1) - f(paper.Probe(2, seed=2), x_hat, t_n)).square().mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    assert set(n.tolist()) == set(range(cfg.N - 1))
    # The last pair (t_{N−2}, ε): the target is the teacher step itself, f_{θ⁻}(x̂, ε) = x̂, whatever θ⁻ is.
    last = n == cfg.N - 2
    other = cd.loss(cfg, paper.Probe(2, seed=1), paper.Probe(2, seed=9), ds.denoiser, x,
                    generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(other[last], got[last], rtol=0, atol=0)
    assert not torch.allclose(other[~last], got[~last], rtol=1e-3, atol=0)
    torch.testing.assert_close(got[last], (f(paper.Probe(2, seed=1), x_t, t_n1) - x_hat).square().mean(1)[last],
                               rtol=1e-10, atol=1e-14)


def test_cd_loss_with_n_equal_2_is_one_jump_from_t_to_the_heun_step_at_epsilon():
    """N = 2: the only pair is (T, ε), one Heun step of the teacher from T to ε is the target (Alg. 2)."""
    cfg, ds = cd.Config(N=2), toy.gaussian(std=0.5)
    x = ds.sample(64, torch.Generator().manual_seed(0))[0]
    got = cd.loss(cfg, paper.Probe(2), paper.Probe(2, seed=5), ds.denoiser, x,
                  generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randint(0, 1, (64,), generator=g)
    x_t = x + 80.0 * torch.randn(x.shape, dtype=f64, generator=g)
    x_hat = paper.heun(ds.denoiser, x_t, 80.0, 0.002)
    torch.testing.assert_close(got, (paper.cm_f(paper.Probe(2), x_t, 80.0) - x_hat).square().mean(1), rtol=1e-10,
                               atol=1e-14)


# ---- CTM: the (t, u, s) grid indices and the teacher's solver ------------------------------------------------------

def chi2_uniform_bound(counts):
    """Pearson's χ² of counts against uniform cells, with its df; the bound df + 5·sqrt(2 df) is 5 standard deviations
    of χ²_df above its mean."""
    counts = torch.as_tensor(counts, dtype=f64)
    e = counts.sum() / len(counts)
    return float(((counts - e) ** 2 / e).sum()), len(counts) - 1


def test_ctm_indices_n_given_k_and_m_given_n_k_are_uniform_including_s_at_sigma_min():
    """n | k ~ U{0, …, N−1−k} and m | (n, k) ~ U{n+k, …, N−1}: the last value m = N − 1 is s = σ_min, the first
    s = u. Pooled Pearson χ² over all cells (df = Σ(cells − 1)) against 5 standard deviations; a uniform that
    leaves out either end puts zero counts in a cell with ≈ 1/L of the draws and fails it."""
    N, K_max, B = 8, 7, 512
    g = torch.Generator().manual_seed(0)
    n_counts, m_counts = {}, {}
    for _ in range(300):
        n, k, m = ctm.sample_indices(N, K_max, B, g)
        assert bool(((0 <= n) & (n <= N - 1 - k)).all()) and bool(((n + k <= m) & (m <= N - 1)).all())
        n_counts.setdefault(k, torch.zeros(N - k, dtype=f64)).index_add_(0, n, torch.ones(B, dtype=f64))
        for L in range(1, N):                                                  # L = N − n − k values of m
            sel = N - n - k == L
            m_counts.setdefault(L, torch.zeros(L, dtype=f64)).index_add_(0, (m - n - k)[sel],
                                                                         torch.ones(int(sel.sum()), dtype=f64))
    chi2 = df = 0.0
    for table in (n_counts, m_counts):
        for c in table.values():
            if len(c) > 1:
                a, b = chi2_uniform_bound(c)
                chi2, df = chi2 + a, df + b
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)
    assert all(float(c[-1]) > 0 and float(c[0]) > 0 for c in m_counts.values())


def test_ctm_teacher_solver_takes_k_heun_steps_along_the_grid():
    """Solver_φ(x_t, t → u) = k Heun steps σ_n → σ_{n+1} → … → σ_{n+k} (EDM Alg. 1 l. 4–8): 2k teacher calls."""
    ds, N = toy.ring8(), 12
    grid = torch.tensor(paper.karras_grid(N), dtype=f64)
    calls = []
    teacher = lambda x_, s_, labels=None: calls.append(1) or ds.denoiser(x_, s_)
    n = torch.tensor([0, 3, 5, 1, 7], dtype=torch.long)
    x = 5 * torch.randn(5, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 4):
        calls.clear()
        got = ctm.teacher_solver(teacher, x, grid, n, k)
        assert len(calls) == 2 * k
        ref = x
        for j in range(k):
            ref = paper.heun_rows(ds.denoiser, ref, grid[n + j], grid[n + j + 1])
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)


CTM_CFG = dict(N=8, K_max=5, sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=0.6, use_dsm=False)


def test_ctm_loss_is_soft_consistency_matching_at_the_replayed_draws():
    cfg, ds = ctm.Config(**CTM_CFG), toy.ring8()
    x = ds.sample(128, torch.Generator().manual_seed(0))[0]
    for seed in range(4):
        got = ctm.loss(cfg, paper.Probe(2, seed=1), paper.Probe(2, seed=2), ds.denoiser, x,
                       generator=torch.Generator().manual_seed(seed))
        expected = paper.ctm_soft_matching(cfg, paper.Probe(2, seed=1), paper.Probe(2, seed=2), ds.denoiser, x,
                                *paper.ctm_draws(cfg, x, torch.Generator().manual_seed(seed)))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


class GlobalNoise(torch.nn.Module):
    """A network whose output is a draw from the global RNG, as dropout's masks are: F = U(0, 1) of x's shape."""

    def forward(self, x_in, c_noise, labels=None):
        return torch.rand(x_in.shape, dtype=x_in.dtype)


def test_cd_student_and_target_passes_see_the_same_dropout_masks():
    """The target pass runs under a forked RNG, so the student pass draws the same masks (CM's code): with F = the
    same uniform draw R in both passes,
    L = d(c_skip(t_{n+1}) x_{t_{n+1}} + c_out(t_{n+1}) R, c_skip(t_n) x̂ + c_out(t_n) R)."""
    cfg, ds, B = cd.Config(**CD_CFG), toy.ring8(), 64
    x = ds.sample(B, torch.Generator().manual_seed(0))[0]
    torch.manual_seed(11)
    got = cd.loss(cfg, GlobalNoise(), GlobalNoise(), ds.denoiser, x, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    R = torch.rand(x.shape, dtype=f64)
    g = torch.Generator().manual_seed(3)
    n = torch.randint(0, cfg.N - 1, (B,), generator=g)
    grid = torch.tensor(paper.karras_grid(cfg.N, 0.01, 20.0, 5.0), dtype=f64)
    x_t = x + grid[n][:, None] * torch.randn(x.shape, dtype=f64, generator=g)
    x_hat = paper.heun_rows(ds.denoiser, x_t, grid[n], grid[n + 1])
    f = lambda x_, t_: paper.col(paper.cm_scalings(t_, 0.01, 0.6)[0], x_) * x_ + paper.col(
        paper.cm_scalings(t_, 0.01, 0.6)[1], x_) * R
    torch.testing.assert_close(got, (f(x_t, grid[n]) - f(x_hat, grid[n + 1])).square().mean(1), rtol=1e-10,
                               atol=1e-14)
