"""Consistency distillation (algorithms/cd.py, Song et al., arXiv:2303.01469v2) against the identities of its Sec. 3
and Alg. 1–2, with exact toy teachers."""
import copy
import math

import torch
from hypothesis import given, settings, strategies as st

from algorithms import analytic_precond as ap, cd, edm
from data import toy

SD = edm.SIGMA_DATA


class Constant(torch.nn.Module):
    """A 'network' whose output is a fixed tensor, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, noise_labels, class_labels=None, noise_labels_s=None):
        return self.out


class Exact(torch.nn.Module):
    """The network F that makes f_θ the exact consistency function of Gaussian data N(0, σ_d² I):
    f*(x, t) = sqrt((ε² + σ_d²)/(t² + σ_d²))·x (the PF-ODE of Gaussian data solved from t to ε), solved for F from
    f = c_skip·x + c_out·F."""

    def __init__(self, cfg, outer=None):
        super().__init__()
        self.cfg, self.outer = cfg, outer

    def forward(self, x_in, noise_labels, class_labels=None, noise_labels_s=None):
        t = (4 * noise_labels.to(torch.float64)).exp()                      # c_noise = ln t / 4
        x = x_in * edm.bcast((t**2 + SD**2).sqrt(), x_in)                   # undo c_in
        if self.outer is None:
            eps = self.cfg.sigma_min                                          # CM App. C, written out
            c_skip, c_out = SD**2 / ((t - eps) ** 2 + SD**2), SD * (t - eps) / (SD**2 + t**2).sqrt()
        else:
            c_skip, c_out = self.outer(t, torch.full_like(t, self.cfg.sigma_min))
        f_star = edm.bcast(((self.cfg.sigma_min**2 + SD**2) / (t**2 + SD**2)).sqrt(), x) * x
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)      # at t = ε any F will do
        return (f_star - edm.bcast(c_skip, x) * x) / edm.bcast(safe, x)


def analytic_outer(ell, kappa):
    """Analytic-Precond's outer coefficients (t, s) -> (β, α) for statistics ℓ(λ), κ(λ) on a 30-interval λ-grid."""
    lam = ap.lambda_grid(ap.Config(num_intervals=30))
    stats = ap.Stats(lam, ell(lam), kappa(lam))
    return lambda t, s: ap.coefficients(stats, t, s)


def zero_outer():
    return analytic_outer(torch.zeros_like, torch.zeros_like)


def wiggly_outer():
    """Arbitrary ℓ ∈ [0, 1] and κ: the boundary condition must not depend on the statistics."""
    return analytic_outer(lambda lam: lam.sin().square(), lambda lam: 2 * (3 * lam).cos())


@settings(deadline=None, max_examples=50)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3), analytic=st.booleans())
def test_consistency_fn_is_identity_at_sigma_min(seed, scale, analytic):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(5, 3, dtype=torch.float64, generator=g)
    net = Constant(scale * torch.randn(5, 3, dtype=torch.float64, generator=g))
    cfg = cd.Config()
    eps = torch.full((5,), cfg.sigma_min, dtype=torch.float64)
    out = cd.f(cfg, net, x, eps, outer=wiggly_outer() if analytic else None)
    assert torch.equal(out, x)


def test_heun_teacher_step_is_second_order():
    """The local error of one Heun step with the exact ring8 denoiser shrinks like h³ (a second-order method)."""
    ds = toy.ring8()
    x0, _ = ds.sample(256, torch.Generator().manual_seed(0))
    t = 1.0
    x = x0 + t * torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errs = []
    for h in (0.08, 0.04, 0.02):
        step = edm.heun_step(ds.denoiser, x, t, t - h)
        errs.append((step - ds.ode(x, t, t - h, steps_per_unit=2000)).norm().item())
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(2.7 < p < 3.3 for p in orders), orders


def test_cd_loss_vanishes_for_exact_consistency_function_on_gaussian_data():
    """With f_θ = f_{θ⁻} = f* the loss is the teacher's Heun error only, (c·local error)² = O(h⁶): refining the
    grid 4× divides it by about 4⁶, and it is far below the loss of a wrong student."""
    ds = toy.gaussian(std=SD, dim=2)
    x, _ = ds.sample(4096, torch.Generator().manual_seed(0))
    means = []
    for N, outer in [(18, None), (72, None), (18, zero_outer())]:
        cfg = cd.Config(N=N)
        net = Exact(cfg, outer)
        L = cd.loss(cfg, net, net, ds.denoiser, x, generator=torch.Generator().manual_seed(1), outer=outer)
        means.append(L.mean().item())
    assert 5 < math.log(means[0] / means[1], 4) < 7.5, means
    assert math.isclose(means[2], means[0], rel_tol=1e-9), means  # ℓ ≡ κ ≡ 0: the same f*, another F
    wrong = cd.loss(cd.Config(), Constant(torch.zeros_like(x)), Exact(cd.Config()), ds.denoiser, x,
                    generator=torch.Generator().manual_seed(1))
    assert wrong.mean().item() > 1e3 * means[0]


def test_only_the_student_receives_gradient():
    torch.manual_seed(0)
    from networks.mlp import MLP
    net = MLP(hidden=16, num_blocks=1, emb=16)
    net_ema = copy.deepcopy(net)
    x, _ = toy.ring8().sample(64, torch.Generator().manual_seed(0), dtype=torch.float32)
    cd.loss(cd.Config(), net, net_ema, toy.ring8().denoiser, x).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.out.parameters())
    assert all(p.grad is None for p in net_ema.parameters())


def test_distances_vanish_on_equal_inputs_and_pseudo_huber_interpolates():
    a = torch.randn(7, 4, dtype=torch.float64)
    for d in (edm.squared_l2, edm.l2, edm.pseudo_huber):
        assert torch.equal(d(a, a), torch.zeros(7, dtype=torch.float64))
    c = 0.00054 * 2  # iCT: c = 0.00054·sqrt(d), sqrt(d) = 2
    small, large = a + 1e-7, a + 1e3
    # atol = 0: the small-distance values are about 2e-11, below allclose's default atol of 1e-8
    assert torch.allclose(edm.pseudo_huber(a, small), (small - a).square().sum(1) / (2 * c), rtol=1e-6, atol=0)
    assert torch.allclose(edm.pseudo_huber(a, large), (large - a).square().sum(1).sqrt() - c, rtol=1e-9, atol=0)
    assert torch.allclose(edm.squared_l2(a, large), (large - a).square().mean(1), rtol=1e-12, atol=0)


def test_the_loss_uses_the_distance_it_is_given():
    ds = toy.gaussian(std=SD, dim=2)
    x, _ = ds.sample(64, torch.Generator().manual_seed(0))
    cfg, student, target = cd.Config(), Constant(torch.zeros_like(x)), Exact(cd.Config())
    L = lambda d: cd.loss(cfg, student, target, ds.denoiser, x, generator=torch.Generator().manual_seed(1),
                          distance=d)
    torch.testing.assert_close(L(edm.l2), L(edm.squared_l2).mul(2).sqrt(), rtol=1e-12, atol=0.0)  # d = 2 dims


def test_sampling_with_exact_consistency_fn_lands_on_teacher_ode():
    """One step of Alg. 1 with f* is the exact ODE solution from T; each further step is f* of a noised point,
    so the outputs stay on the data distribution N(0, σ_d²) scaled by f*(·, τ) ≈ 1 (checked by the variance)."""
    cfg = cd.Config()
    ds = toy.gaussian(std=SD, dim=2)
    noise = torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = []
    x1 = cd.sample(cfg, Exact(cfg), noise, nfe=1, path=path)
    assert len(path) == 2 and torch.equal(path[0], noise * cfg.sigma_max)
    assert torch.allclose(x1, ds.ode(noise * cfg.sigma_max, cfg.sigma_max, cfg.sigma_min), rtol=1e-6, atol=1e-12)
    path = []
    x3 = cd.sample(cfg, Exact(cfg), noise, nfe=3, generator=torch.Generator().manual_seed(1), path=path)
    assert len(path) == 6
    assert abs(x3.var().item() / SD**2 - 1) < 0.05
