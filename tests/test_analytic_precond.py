"""Analytic-Precond (algorithms/analytic_precond.py): the property table of docs/analytic_precond.md §2, for every
reading, against closed forms written out here (CTM's jumper, the Gaussian PF-ODE flow) and the exact toy teachers."""
import copy
import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algorithms import analytic_precond as ap
from algorithms import edm
from data import images, toy
from networks import checkpoint
from networks.mlp import MLP

SD = edm.SIGMA_DATA
T_RANGE = st.floats(edm.SIGMA_MIN, edm.SIGMA_MAX)
READINGS = {r.__name__: r for r in ap.READINGS}
f64 = torch.float64


def ctm_beta_alpha(t, s):
    """CTM's jumper G = (s/t)x_t + (1 − s/t)(c_skip x_t + c_out F) as β·x_t + α·F (CTM, arXiv:2310.02279v3)."""
    return (SD**2 + s * t) / (SD**2 + t**2), SD * (t - s) / (SD**2 + t**2).sqrt()


def stats_of(ell, kappa, num_intervals=40):
    lam = ap.lambda_grid(ap.Config(num_intervals=num_intervals))
    return ap.Stats(lam, ell(lam), kappa(lam), SD)


@functools.lru_cache
def toy_stats(name):
    """Statistics of an exact teacher: ring8 (narrow modes), the spiral (a point set), the 8x8 digits (an image
    set, 64 dimensions). Budgets below the paper's 121 × 4096 keep the test in seconds; the digits use the least."""
    g = torch.Generator().manual_seed(0)
    if name == "digits":
        data = images.digits_dataset()
        teacher = images.EmpiricalTeacher(data)
        x0 = data.batch(torch.randperm(len(data), generator=g)[:128].numpy())[0].double()
        return ap.compute_stats(ap.Config(num_intervals=40, num_samples=128), teacher, x0, generator=g)
    ds = toy.DATASETS[name]()
    n, J = (1024, 120) if name == "ring8" else (512, 60)
    return ap.compute_stats(ap.Config(num_intervals=J, num_samples=n), ds.denoiser, ds.sample(n, g)[0], generator=g)


# ---- boundary and CTM, for any statistics ----------------------------------------------------------------------

@settings(deadline=None, max_examples=60)
@given(t=T_RANGE, c1=st.floats(-3, 3), c2=st.floats(-3, 3))
@pytest.mark.parametrize("reading", READINGS)
def test_every_reading_jumps_from_t_to_t_as_the_identity(reading, t, c1, c2):
    """G(x, t, t) = x for any network: β(t,t) = 1, α(t,t) = 0, whatever ℓ ∈ [0, 1] and κ are (docs §2)."""
    stats = stats_of(lambda lam: (c1 * lam).sin().abs(), lambda lam: c2 * lam.cos())
    tt = torch.tensor([t], dtype=f64)
    beta, alpha = READINGS[reading](stats, tt, tt)
    assert beta.item() == 1.0 and alpha.item() == 0.0


@settings(deadline=None, max_examples=60)
@given(a=T_RANGE, b=T_RANGE)
@pytest.mark.parametrize("reading", READINGS)
def test_every_reading_is_ctm_when_ell_and_kappa_vanish(reading, a, b):
    """ℓ ≡ κ ≡ 0: f = s/t and every weight g = 1 − s/t, so each reading is CTM's jumper (docs §2)."""
    stats = stats_of(torch.zeros_like, torch.zeros_like)
    t, s = torch.tensor([max(a, b)], dtype=f64), torch.tensor([min(a, b)], dtype=f64)
    beta, alpha = READINGS[reading](stats, t, s)
    beta_ctm, alpha_ctm = ctm_beta_alpha(t, s)
    torch.testing.assert_close(beta, beta_ctm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha, alpha_ctm, rtol=1e-10, atol=1e-12)


# ---- Gaussian data: exact teacher-initialised, or else optimal, student --------------------------------------------

@functools.lru_cache
def gaussian_case():
    """N(0, 0.3² I) in 3 dimensions (σ ≠ σ_d, so c_skip ≠ ℓ): the statistics, and jumps (t, s) with x_t."""
    std = 0.3
    ds = toy.gaussian(std=std, dim=3)
    x0 = ds.sample(64, torch.Generator().manual_seed(0))[0]
    stats = ap.compute_stats(ap.Config(num_intervals=60, num_samples=64), ds.denoiser, x0,
                             generator=torch.Generator().manual_seed(1))
    t = torch.tensor([80.0, 10.0, 3.3, 1.0, 0.5, 0.2, 0.05], dtype=f64)
    s = torch.tensor([0.002, 0.7, 0.003, 0.9, 0.011, 0.1, 0.002], dtype=f64)
    x_t = torch.randn(7, 3, dtype=f64, generator=torch.Generator().manual_seed(2)) * t[:, None]
    x_s = ((s**2 + std**2) / (t**2 + std**2)).sqrt()[:, None] * x_t            # the exact flow, docs §2
    return std, stats, t, s, x_t, x_s


def quadrature_bound(stats):
    """Error of log f from the trapezoid Λ = ∫(1 − ℓ)dλ and linear interpolation: span·h²/12·max|ℓ''| + 2·h²/8·max|ℓ'|,
    with |ℓ'| ≤ 1/2 and |ℓ''| ≤ 4/(6√3) for ℓ = σ²/(σ² + e^{−2λ}), a logistic function of 2λ."""
    span = float(stats.lam[-1] - stats.lam[0])
    h = span / (len(stats.lam) - 1)
    return span * h**2 / 12 * 4 / (6 * 3**0.5) + 2 * h**2 / 8 * 0.5


def test_gaussian_statistics_are_the_closed_forms():
    """ℓ_t = σ²/(σ² + t²) (∇_x D_φ = ℓ_t·I, so each Hutchinson term is exact) and κ ≡ 0 (N_φ ≡ 0) (docs §2, §4)."""
    std, stats, *_ = gaussian_case()
    t_grid = (-stats.lam).exp()
    torch.testing.assert_close(stats.ell, std**2 / (std**2 + t_grid**2), rtol=1e-9, atol=1e-12)
    assert (stats.kappa == 0).all()


@pytest.mark.parametrize("reading", ["backward_explicit", "start_anchored", "kappa_zero"])
def test_explicit_readings_make_the_teacher_initialised_student_exact_on_gaussian_data(reading):
    """N_φ ≡ 0, so with the teacher's own network F_φ = (D_φ − c_skip x)/c_out the jumper is the flow f·x_t, exact
    up to the quadrature bound (docs §2, §3)."""
    std, stats, t, s, x_t, x_s = gaussian_case()
    c_skip, c_out, _, _ = edm.precond(t, SD)
    D_phi = std**2 / (std**2 + t[:, None] ** 2) * x_t
    F_phi = (D_phi - c_skip[:, None] * x_t) / c_out[:, None]
    beta, alpha = READINGS[reading](stats, t, s)
    G = beta[:, None] * x_t + alpha[:, None] * F_phi
    assert ((G - x_s).abs() <= 1.01 * quadrature_bound(stats) * x_s.abs() + 1e-12).all()


def test_implicit_reading_makes_the_optimal_student_exact_on_gaussian_data_but_not_the_teacher_initialised_one():
    """Reading D's network term stands for D_φ(x_s, s) = σ²/(σ² + s²)·x_s: with it the jumper is exact. The
    teacher-initialised student (D_φ(x_t, t)) is off by (f + g ℓ_t)/((1 + g ℓ_s) f) ≠ 1 (docs §2)."""
    std, stats, t, s, x_t, x_s = gaussian_case()
    c_skip, c_out, _, _ = edm.precond(t, SD)
    beta, alpha = ap.implicit_backward(stats, t, s)
    F_of = lambda D: (D - c_skip[:, None] * x_t) / c_out[:, None]
    G_opt = beta[:, None] * x_t + alpha[:, None] * F_of(std**2 / (std**2 + s[:, None] ** 2) * x_s)
    assert ((G_opt - x_s).abs() <= 1.01 * quadrature_bound(stats) * x_s.abs() + 1e-12).all()
    G_init = beta[:, None] * x_t + alpha[:, None] * F_of(std**2 / (std**2 + t[:, None] ** 2) * x_t)
    assert ((G_init - x_s).abs() > 0.1 * x_s.abs()).any()


# ---- toy teachers: one-step coefficients, bounds, consistency gap ------------------------------------------------

def one_step_distance(stats, reading):
    """On the 18-level Karras grid, s = ε: max |α − α_CTM| / max α_CTM and max |β − β_CTM|."""
    t = edm.sigma_grid(18)[:-1]
    s = torch.full_like(t, edm.SIGMA_MIN)
    beta, alpha = reading(stats, t, s)
    beta_ctm, alpha_ctm = ctm_beta_alpha(t, s)
    return float((alpha - alpha_ctm).abs().max() / alpha_ctm.max()), float((beta - beta_ctm).abs().max())


@pytest.mark.parametrize("data", ["ring8", "spiral", "digits"])
def test_default_one_step_coefficients_are_within_ten_percent_of_ctms(data):
    """Fig. 2: for single jumps the analytic coefficients nearly coincide with CTM's. Here: α within 10 % of CTM's
    scale and β within 0.1 at every level of the 18-level grid."""
    d_alpha, d_beta = one_step_distance(toy_stats(data), ap.coefficients)
    assert d_alpha <= 0.1 and d_beta <= 0.1, (d_alpha, d_beta)


def test_kappa_zero_one_step_alpha_is_far_from_ctms_on_narrow_modes():
    """Without κ, g_0 integrates the frozen N_φ over the whole λ-span: on ring8 α(t, ε) is several times CTM's."""
    d_alpha, _ = one_step_distance(toy_stats("ring8"), ap.kappa_zero)
    assert d_alpha > 1.0, d_alpha


@pytest.mark.parametrize("data", ["ring8", "spiral", "digits"])
@pytest.mark.parametrize("reading", ["implicit_backward", "kappa_zero"])
def test_bounded_readings_stay_inside_the_envelope_for_all_t_greater_than_s(reading, data):
    """|β| ≤ 1 + ln(t/s), |α| ≤ σ_d·max(1, ln(t/s)) on every pair of a 200-point grid (docs §3)."""
    assert ap.check_bounded(toy_stats(data), reading=READINGS[reading]) is None


@pytest.mark.parametrize("reading, data", [("backward_explicit", "ring8"), ("start_anchored", "ring8"),
                                           ("start_anchored", "spiral")])
def test_anchor_mismatch_and_forward_anchoring_blow_up(reading, data):
    """A on narrow modes (κ → −2 at low noise, g_bwd ~ (t/s)²) and B where κ > 0 (docs §2) leave the envelope, and
    the check says what to do."""
    msg = ap.check_bounded(toy_stats(data), reading=READINGS[reading])
    assert msg is not None and "--precond paper" in msg and reading in msg


@functools.lru_cache
def intermediate_jumps(data):
    """Over the intermediate jumps (ε < s < t) of a 9-level Karras grid from ring8 or spiral x_t, for CTM and for
    every reading: the consistency gap E‖D* − D_φ(x_t, t)‖²/d of the optimal student D* = c_skip x_t + c_out F*,
    F* = (x_s − β x_t)/α (abstract: "the gap between the teacher denoiser and the optimal student denoiser"), and
    the jump error E‖G − x_s‖²/d of the teacher-initialised student F = F_φ; each summed over the jumps."""
    ds, stats = toy.DATASETS[data](), toy_stats(data)
    g = torch.Generator().manual_seed(3)
    x0 = ds.sample(128, g)[0]
    grid = edm.sigma_grid(9).tolist()
    coeffs = {"ctm": ctm_beta_alpha, **{k: functools.partial(r, stats) for k, r in READINGS.items()}}
    gap, err = dict.fromkeys(coeffs, 0.0), dict.fromkeys(coeffs, 0.0)
    for i, t in enumerate(grid):
        x_t = x0 + t * torch.randn(x0.shape, dtype=f64, generator=g)
        D_t = ds.denoiser(x_t, t)
        c_skip, c_out, _, _ = edm.precond(torch.tensor(t, dtype=f64), SD)
        F_phi = (D_t - c_skip * x_t) / c_out
        x_s, u = x_t, t
        for s in grid[i + 1:-1]:
            x_s, u = ds.ode(x_s, u, s), s                       # the teacher ODE from t, level by level
            for k, c in coeffs.items():
                beta, alpha = c(torch.tensor([t], dtype=f64), torch.tensor([s], dtype=f64))
                gap[k] += float((c_skip * x_t + c_out * (x_s - beta * x_t) / alpha - D_t).square().mean())
                err[k] += float((beta * x_t + alpha * F_phi - x_s).square().mean())
    return gap, err


@pytest.mark.parametrize("data", ["ring8", "spiral"])
def test_explicit_readings_shrink_the_consistency_gap_and_the_default_does_not(data):
    """Fig. 1's mechanism, reading by reading: the optimal student of A and C is closer to the teacher than CTM's;
    that of the default D is further, since its network term stands for D_φ at the end of the jump (docs §2)."""
    gap, _ = intermediate_jumps(data)
    assert gap["backward_explicit"] < 0.5 * gap["ctm"] and gap["kappa_zero"] < 0.5 * gap["ctm"], gap
    assert gap["implicit_backward"] > gap["ctm"], gap


@pytest.mark.parametrize("data", ["ring8", "spiral"])
def test_default_teacher_initialised_jumper_is_closer_to_the_teacher_ode_than_ctms(data):
    """Where the student starts: with F_θ = F_φ the default's intermediate jumps land nearer the teacher ODE's x_s
    than CTM's do."""
    _, err = intermediate_jumps(data)
    assert err["implicit_backward"] < 0.9 * err["ctm"], err


def test_ell_lies_in_the_unit_interval():
    """ℓ_t = E tr Cov[x_0 | x_t]/(d t²) ∈ [0, 1] (Tweedie, docs §4), up to the Hutchinson noise."""
    for data in ("ring8", "spiral", "digits"):
        ell = toy_stats(data).ell
        assert (ell > -1e-3).all() and (ell < 1 + 1e-3).all(), data


# ---- engineering: tables, files, fingerprints, attention ------------------------------------------------------------

def test_integral_tables_are_built_once_per_device():
    stats = toy_stats("ring8")
    t, s = torch.tensor([5.0, 1.0], dtype=f64), torch.tensor([0.5, 0.002], dtype=f64)
    first = ap.coefficients(stats, t, s)
    tab = ap.tables(stats, "cpu")
    assert ap.tables(stats, torch.device("cpu")) is tab
    assert all(torch.equal(a, b) for a, b in zip(first, ap.coefficients(stats, t, s)))
    assert list(stats._tables) == ["cpu"]


def mlp_teacher(seed):
    torch.manual_seed(seed)
    return edm.Denoiser(MLP(dim=2, hidden=16, num_blocks=1, emb=16)).double().requires_grad_(False)


def test_stats_round_trip_through_a_file_and_belong_to_their_teacher(tmp_path):
    """A network teacher is recognised by the hash of its weights (a fresh copy passes; one changed weight does
    not); an exact teacher by its outputs (ring8 passes, two_modes does not)."""
    x0 = toy.ring8().sample(64, torch.Generator().manual_seed(0))[0]
    teacher = mlp_teacher(0)
    stats = ap.compute_stats(ap.Config(num_intervals=4, num_samples=64), teacher, x0,
                             generator=torch.Generator().manual_seed(1))
    checkpoint.save_analytic_stats(stats, tmp_path / "net.pt", teacher, x0)
    loaded = checkpoint.load_analytic_stats(tmp_path / "net.pt", teacher=copy.deepcopy(teacher))
    assert torch.equal(loaded.ell, stats.ell) and torch.equal(loaded.kappa, stats.kappa)
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        w = next(changed.parameters())
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf"), dtype=w.dtype))
    with pytest.raises(ValueError, match="different teacher"):
        checkpoint.load_analytic_stats(tmp_path / "net.pt", teacher=changed)
    exact = ap.compute_stats(ap.Config(num_intervals=4, num_samples=64), toy.ring8().denoiser, x0)
    checkpoint.save_analytic_stats(exact, tmp_path / "exact.pt", toy.ring8().denoiser, x0)
    checkpoint.load_analytic_stats(tmp_path / "exact.pt", teacher=toy.ring8().denoiser)
    with pytest.raises(ValueError, match="different teacher"):
        checkpoint.load_analytic_stats(tmp_path / "exact.pt", teacher=toy.two_modes().denoiser)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while saving leaves the previous file whole."""
    old = stats_of(torch.zeros_like, torch.zeros_like)
    checkpoint.save_analytic_stats(old, tmp_path / "s.pt")

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        checkpoint.save_analytic_stats(stats_of(torch.ones_like, torch.ones_like), tmp_path / "s.pt")
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_analytic_stats(tmp_path / "s.pt").ell, old.ell)


class TinyAttention(torch.nn.Module):
    """x ↦ x·c + attention over 4 tokens made from x, with torch's SDPA or written out (softmax(qkᵀ/√c)·v)."""

    def __init__(self, sdpa):
        super().__init__()
        torch.manual_seed(0)
        self.sdpa, self.qkv, self.out = sdpa, torch.nn.Linear(2, 4 * 3 * 8), torch.nn.Linear(4 * 8, 2)
        self.flags = []

    def forward(self, x, sigma, labels=None):
        self.flags.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        h = x / (sigma[:, None] ** 2 + SD**2).sqrt()
        q, k, v = self.qkv(h).reshape(-1, 4, 3, 8).unbind(2)                       # [B, tokens, channels] each
        if self.sdpa:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            a = (q @ k.transpose(1, 2) / 8**0.5).softmax(-1) @ v
        return x * SD**2 / (sigma[:, None] ** 2 + SD**2) + self.out(a.reshape(-1, 32)) * sigma[:, None] / 10


def test_statistics_of_an_attention_teacher_run_under_the_math_kernel_and_match_written_out_attention():
    """compute_stats' JVPs run with the flash and memory-efficient kernels switched off (they have no forward-AD
    formula on CUDA), and give the statistics of the same network with attention written out."""
    x0 = toy.ring8().sample(32, torch.Generator().manual_seed(0))[0]
    cfg = ap.Config(num_intervals=4, num_samples=32)
    a, b = TinyAttention(sdpa=True).double(), TinyAttention(sdpa=False).double()
    sa = ap.compute_stats(cfg, a, x0, generator=torch.Generator().manual_seed(1))
    sb = ap.compute_stats(cfg, b, x0, generator=torch.Generator().manual_seed(1))
    assert a.flags and all(f == (False, False) for f in a.flags)
    torch.testing.assert_close(sa.ell, sb.ell, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sa.kappa, sb.kappa, rtol=1e-8, atol=1e-10)


def test_check_bounded_accepts_ctms_coefficients():
    assert ap.check_bounded(stats_of(torch.zeros_like, torch.zeros_like)) is None
