"""Analytic-Precond (algorithms/analytic_precond.py) against the closed forms of analytic_precond.md §3.8."""
import dataclasses

import torch
from hypothesis import given, settings, strategies as st

from algorithms import analytic_precond as ap, edm
from data import toy

SD = edm.SIGMA_DATA
T_RANGE = st.floats(edm.SIGMA_MIN, edm.SIGMA_MAX)


def stats_of(ell, kappa, backward_anchor=True, num_intervals=40):
    lam = ap.lambda_grid(ap.Config(num_intervals=num_intervals))
    return ap.Stats(lam, ell(lam), kappa(lam), SD, backward_anchor)


def pairs(a, b):
    t, s = torch.tensor([max(a, b)], dtype=torch.float64), torch.tensor([min(a, b)], dtype=torch.float64)
    return t, s


@settings(deadline=None, max_examples=200)
@given(a=T_RANGE, b=T_RANGE, backward_anchor=st.booleans())
def test_reduces_to_ctm_coefficients_when_ell_and_kappa_vanish(a, b, backward_anchor):
    """§3.3: ℓ ≡ κ ≡ 0 gives f = s/t, g = 1 − s/t, hence CTM's β = (σ_d² + st)/(σ_d² + t²) and
    α = σ_d(t − s)/sqrt(σ_d² + t²)."""
    stats = stats_of(torch.zeros_like, torch.zeros_like, backward_anchor)
    t, s = pairs(a, b)
    beta, alpha = ap.coefficients(stats, t, s)
    assert torch.allclose(beta, (SD**2 + s * t) / (SD**2 + t**2), rtol=1e-12, atol=1e-12)
    assert torch.allclose(alpha, SD * (t - s) / (SD**2 + t**2).sqrt(), rtol=1e-10, atol=1e-12)


@settings(deadline=None, max_examples=100)
@given(t=T_RANGE, c1=st.floats(-3, 3), c2=st.floats(-3, 3), backward_anchor=st.booleans())
def test_jump_from_t_to_t_is_identity(t, c1, c2, backward_anchor):
    """f(t,t) = 1, g(t,t) = 0, so β(t,t) = 1 and α(t,t) = 0 for any statistics (CTM's boundary condition)."""
    stats = stats_of(lambda lam: (c1 * lam).sin().abs(), lambda lam: c2 * lam.cos(), backward_anchor)
    tt = torch.tensor([t], dtype=torch.float64)
    f, g, _ = ap.f_and_g(stats, tt, tt)
    beta, alpha = ap.coefficients(stats, tt, tt)
    assert f.item() == 1.0 and g.item() == 0.0 and beta.item() == 1.0 and alpha.item() == 0.0


def test_gaussian_data_recovers_ell_and_f_closed_forms():
    """§3.8: for N(0, σ_d² I), ℓ_t = σ_d²/(σ_d² + t²) and f(t,s) = sqrt((s² + σ_d²)/(t² + σ_d²)), and the
    teacher-initialised jumper G = β·x_t + α·F_φ is the exact flow f·x_t.

    ∇_x D_φ = ℓ_t·I, so each Hutchinson term vᵀJv equals ℓ_t·d: the Monte Carlo error of ℓ is rounding only.
    f then carries the trapezoid error of Λ = ∫(1 − ℓ)dλ plus linear interpolation between grid points,
    bounded by span·h²/12·max|ℓ''| + 2·h²/8·max|ℓ'| (|ℓ'| ≤ 1/2, |ℓ''| ≤ 4/(6√3) for this logistic in λ)."""
    cfg = ap.Config(num_intervals=60, num_samples=64)
    ds = toy.gaussian(std=SD, dim=3)
    x0, _ = ds.sample(64, torch.Generator().manual_seed(0))
    stats = ap.compute_stats(cfg, ds.denoiser, x0, generator=torch.Generator().manual_seed(1))
    t_grid = (-stats.lam).exp()
    assert torch.allclose(stats.ell, SD**2 / (SD**2 + t_grid**2), rtol=1e-9, atol=1e-12)
    span = float(stats.lam[-1] - stats.lam[0])
    h = span / cfg.num_intervals
    bound = span * h**2 / 12 * 4 / (6 * 3**0.5) + 2 * h**2 / 8 * 0.5
    t = torch.tensor([80.0, 10.0, 3.3, 1.0, 0.5, 0.2, 0.05], dtype=torch.float64)
    s = torch.tensor([0.002, 0.7, 0.003, 0.9, 0.011, 0.1, 0.002], dtype=torch.float64)
    f, _, _ = ap.f_and_g(stats, t, s)
    err = (f.log() - 0.5 * ((s**2 + SD**2) / (t**2 + SD**2)).log()).abs()
    assert (err <= bound).all(), (err, bound)
    # N_φ ≡ 0 here, so the teacher-initialised jumper β·x_t + α·F_φ (F_φ = (D_φ − c_skip·x)/c_out, the raw
    # teacher network) is f·x_t: the exact ODE flow, up to the same bound.
    x_t = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * t[:, None]
    c_skip, c_out, _, _ = edm.precond(t, SD)
    F_phi = (ds.denoiser(x_t, t) - c_skip[:, None] * x_t) / c_out[:, None]
    beta, alpha = ap.coefficients(stats, t, s)
    G = beta[:, None] * x_t + alpha[:, None] * F_phi
    x_s = ds.ode(x_t, t, s)
    assert ((G - x_s).abs() <= (bound * 1.01) * x_s.abs() + 1e-12).all()


def consistency_gap(stats, x_t, x_s, D, t, s):
    """§3.4: E‖D* − D_φ(x_t, t)‖²/d, where D* = ℓ(t)x_t + (x_s − f·x_t)/g makes the jump exact (x_s: reference ODE)."""
    tt, ss = torch.full((x_t.shape[0],), t, dtype=torch.float64), torch.full((x_t.shape[0],), s, dtype=torch.float64)
    f, g, ell = (c[:, None] for c in ap.f_and_g(stats, tt, ss))
    return ((ell * x_t + (x_s - f * x_t) / g) - D).square().mean().item()


def test_analytic_jumper_has_smaller_consistency_gap_than_ctm_for_intermediate_jumps():
    """§3.8, Fig. 1: with the exact ring8 mixture as teacher, the teacher-initialised analytic jumper is closer to
    the teacher ODE than CTM's, summed over the intermediate jumps (ε < s < t) of a 9-level Karras grid."""
    ds = toy.ring8()
    g = torch.Generator().manual_seed(0)
    x0, _ = ds.sample(1024, g)
    stats = ap.compute_stats(ap.Config(num_intervals=40, num_samples=1024), ds.denoiser, x0, generator=g)
    ctm = dataclasses.replace(stats, ell=torch.zeros_like(stats.ell), kappa=torch.zeros_like(stats.kappa))
    fwd = dataclasses.replace(stats, backward_anchor=False)
    grid = edm.sigma_grid(9).tolist()
    gaps = torch.zeros(3, dtype=torch.float64)
    x_eval, _ = ds.sample(256, g)
    for i, t in enumerate(grid):
        x_t = x_eval + t * torch.randn(x_eval.shape, dtype=torch.float64, generator=g)
        D = ds.denoiser(x_t, t)
        for s in grid[i + 1:-1]:
            x_s = ds.ode(x_t, t, s)
            gaps += torch.tensor([consistency_gap(S, x_t, x_s, D, t, s) for S in (ctm, stats, fwd)])
    assert gaps[1] < 0.5 * gaps[0] and gaps[2] < 0.5 * gaps[0], gaps


def test_ell_lies_in_unit_interval_and_stats_round_trip_through_a_file(tmp_path):
    """ℓ_t = E tr Cov[x_0|x_t]/(d t²) ∈ [0, 1] (§3.5); save/load keeps the tensors and checks the teacher."""
    ds = toy.two_modes()
    g = torch.Generator().manual_seed(0)
    x0, _ = ds.sample(512, g)
    stats = ap.compute_stats(ap.Config(num_intervals=20, num_samples=512), ds.denoiser, x0, generator=g)
    assert (stats.ell > -1e-3).all() and (stats.ell < 1 + 1e-3).all()
    ap.save(stats, tmp_path / "stats.pt")
    loaded = ap.load(tmp_path / "stats.pt", teacher=ds.denoiser)
    assert torch.equal(loaded.ell, stats.ell) and torch.equal(loaded.kappa, stats.kappa)
    t, s = torch.tensor([5.0, 1.0]), torch.tensor([0.5, 0.002])
    assert all(torch.equal(a, b) for a, b in zip(ap.coefficients(loaded, t.double(), s.double()),
                                                 ap.coefficients(stats, t.double(), s.double())))
    try:
        ap.load(tmp_path / "stats.pt", teacher=toy.ring8().denoiser)
        raise AssertionError("statistics of another teacher were accepted")
    except ValueError:
        pass
