"""Analytic-Precond: the outer coefficients of a trajectory jumper, derived from a generalized teacher ODE.

K. Zheng, G. He, J. Chen, F. Bao, J. Zhu, "Elucidating the Preconditioning in Consistency Distillation",
ICLR 2025, arXiv:2502.02922v3.

A RECONSTRUCTION. The paper's body could not be read, so no equation of it is cited here. What is sourced: the
jumper form G_θ(x_t, t, s) = β·x_t + α·F_θ (Fig. 1); a generalized teacher ODE with two free parameters l_t, s_t
and the "consistency gap" between teacher and optimal student denoisers (abstract); both parameters as closed
forms in expectations of the teacher, l_t from the expected Jacobian norm, estimated at 120 times from 4096
samples with automatic differentiation, in EDM's setting f = 0, g = sqrt(2t) (ICLR 2025 reviews, OpenReview
55pCDKiS8B); that single-step coefficients nearly coincide with CTM's (Fig. 2); that a backward form is used
(reviews, second-hand). Everything else is derived in docs/analytic_precond.md, which the comments below cite.

In λ = −ln t the teacher PF-ODE is dx/dλ = D_φ − x. With a scalar ℓ(λ) it is, for any ℓ,
                                                                                        (docs/analytic_precond.md §1)
    dx/dλ = −(1 − ℓ)·x + N_φ,        N_φ = D_φ − ℓ·x,
    x_s = f(t,s)·x_t + ∫_{λ_t}^{λ_s} e^{Λ(r) − Λ(λ_s)} N_φ(r) dr,      f = e^{Λ(λ_t) − Λ(λ_s)},  Λ = ∫(1 − ℓ)dλ,

and κ(λ) says how N_φ scales along the path, N_φ(r) ≈ e^{K(r) − K(a)}·N_φ(a), K = ∫κ dλ, a = the anchor. Each
reading below freezes N_φ at one end and says what the network's denoiser D_θ = c_skip(t)·x_t + c_out(t)·F_θ stands
for; with ℓ ≡ κ ≡ 0 every one is CTM's jumper (s/t)·x_t + (1 − s/t)·D_θ. The statistics are ℓ_t = E tr(∇_x D_φ)/d
(Hutchinson) and κ_t = E⟨N_φ, dN_φ/dλ⟩ / E‖N_φ‖², on a grid uniform in λ, once per teacher.

| code                 | symbol                                  | code             | symbol                        |
|----------------------|-----------------------------------------|------------------|-------------------------------|
| `lam`                | λ = −ln t, grid λ_0 < … < λ_J           | `ell`, `kappa`   | ℓ_t (paper's l_t), κ_t (s_t)  |
| `Lam`, `K`, `E`      | Λ(λ), K(λ), E = Λ + K                   | `I`, `I0`        | ∫ e^{E − m}, ∫ e^{Λ − m0}      |
| `f`                  | f(t,s) = e^{Λ_t − Λ_s}                   | `g_bwd`, `g_fwd`, `g_0` | weights of N_φ (§2)    |
| `beta`, `alpha`      | β on x_t, α on F_θ (Fig. 1)             | `teacher`        | D_φ                           |
| `D`, `N`, `N1`       | D_φ, N_φ, dN_φ/dλ                       | `c_skip`, `c_out`| EDM Table 1 of t               |
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from algorithms import edm


@dataclass(frozen=True)
class Config:
    num_intervals: int = 120            # reviews: "120 different times" (120 intervals, 121 points: docs §4)
    num_samples: int = 4096             # reviews: "4096 samples to estimate expectations"
    batch_size: int = 4096              # memory only: samples per teacher call
    sigma_min: float = edm.SIGMA_MIN    # EDM setting, t ∈ [0.002, 80] (EDM Table 1)
    sigma_max: float = edm.SIGMA_MAX
    sigma_data: float = edm.SIGMA_DATA  # EDM Table 1


@dataclass
class Stats:
    """ℓ and κ on the λ-grid (float64, [J+1]). The integral tables are built once per device on first use
    (`tables`) and cached here. (Files of statistics, tied to their teacher: networks/checkpoint.py.)"""
    lam: torch.Tensor
    ell: torch.Tensor
    kappa: torch.Tensor
    sigma_data: float = edm.SIGMA_DATA

    def __post_init__(self):
        shapes = {tuple(v.shape) for v in (self.lam, self.ell, self.kappa)}
        if len(shapes) != 1 or len(self.lam.shape) != 1 or len(self.lam) < 3 or not bool((self.lam.diff() > 0).all()):
            raise ValueError(f"analytic_precond.Stats needs lam, ell, kappa of one 1-D shape with >= 3 points and lam "
                             f"increasing, got shapes {[tuple(v.shape) for v in (self.lam, self.ell, self.kappa)]}")
        self._tables = {}  # device -> Tables, built on first use; not a field, so asdict and replace leave it out


def lambda_grid(cfg):
    """J + 1 points uniform in λ = −ln t from −ln σ_max to −ln σ_min (ascending λ, descending t), docs §4."""
    if cfg.num_intervals < 2:  # ℓ'(λ) is a second-order finite difference, which needs three grid points
        raise ValueError(f"analytic_precond.Config.num_intervals must be >= 2, got {cfg.num_intervals}")
    return torch.linspace(-math.log(cfg.sigma_max), -math.log(cfg.sigma_min), cfg.num_intervals + 1,
                          dtype=torch.float64)


# ---- the statistics (docs §4) ---------------------------------------------------------------------------------

@torch.no_grad()
def estimate_ell(cfg, teacher, x0, z, v, labels=None):
    """ℓ_t = E_{q_t} tr(∇_x D_φ(x_t, t)) / d, the minimiser of E‖∇_x N_φ‖_F² over scalars (docs §4), by Hutchinson
    vᵀ(∇_x D_φ)v with Rademacher v and one forward-mode JVP per sample (reviews: autodiff)."""
    ts = (-lambda_grid(cfg)).exp()
    ell = torch.zeros_like(ts)
    for j, t in enumerate(ts.tolist()):
        acc = 0.0
        for x0_b, z_b, v_b, y_b in _batches(cfg, x0, z, v, labels):
            x = x0_b + t * z_b                                                      # x_t ~ q_t (forward noising)
            sigma = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            _, Jv = torch.func.jvp(lambda x_, s=sigma, y=y_b: teacher(x_, s, y), (x,), (v_b,))  # (∇_x D_φ)·v
            acc += (v_b * Jv).to(torch.float64).sum().item()                       # Σ vᵀ J v
        ell[j] = acc / x0.numel()                                                   # / (K·d)
    return ell


@torch.no_grad()
def estimate_kappa(cfg, teacher, x0, z, ell, labels=None):
    """κ_t = E⟨N_φ, N_φ^{(1)}⟩ / E‖N_φ‖², the least-squares fit of dN_φ/dλ by κ·N_φ (docs §4). The total derivative
    along the teacher ODE is one JVP of (x, t) ↦ D_φ along (dx/dλ, dt/dλ) = (D_φ − x, −t)."""
    lam = lambda_grid(cfg)
    dell = torch.gradient(ell, spacing=(lam,), edge_order=2)[0]                     # ℓ'(λ), finite differences
    kappa = torch.zeros_like(ell)
    for j, t in enumerate((-lam).exp().tolist()):
        num = den = size = 0.0
        for x0_b, z_b, _, y_b in _batches(cfg, x0, z, z, labels):
            x = x0_b + t * z_b
            sigma = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            D = teacher(x, sigma, y_b)
            _, D1 = torch.func.jvp(lambda x_, s_, y=y_b: teacher(x_, s_, y), (x, sigma), (D - x, -sigma))  # dD/dλ
            N = (D - ell[j] * x).to(torch.float64)                                     # N_φ = D_φ − ℓx
            N1 = (D1 - dell[j] * x - ell[j] * (D - x)).to(torch.float64)               # dN_φ/dλ
            num, den = num + (N * N1).sum().item(), den + N.square().sum().item()
            size += D.to(torch.float64).square().sum().item()
        # Where ‖N_φ‖ is below sqrt(machine ε)·‖D_φ‖ (Gaussian data: N_φ ≡ 0), κ is a ratio of rounding errors
        # that would blow up e^{K}; take κ = 0 there, the CTM value.
        kappa[j] = num / den if den > torch.finfo(x0.dtype).eps * size else 0.0
    return kappa


def _batches(cfg, x0, z, v, labels):
    for i in range(0, x0.shape[0], cfg.batch_size):
        b = slice(i, i + cfg.batch_size)
        yield x0[b], z[b], v[b], None if labels is None else labels[b]


def compute_stats(cfg, teacher, x0, labels=None, generator=None):
    """Both statistics for one teacher from cfg.num_samples data samples x0 [K, ...] (and their labels).

    The same noise z and probes v serve every grid time (common random numbers), so ℓ_j is a smooth function of t
    and its finite difference in κ is not swamped by Monte Carlo noise. Forward-mode AD runs under the math
    attention kernel: CUDA's flash and memory-efficient kernels have no forward-AD formula."""
    if x0.shape[0] < cfg.num_samples:
        raise ValueError(f"compute_stats needs cfg.num_samples={cfg.num_samples} samples, got {x0.shape[0]}")
    x0 = x0[:cfg.num_samples]
    labels = None if labels is None else labels[:cfg.num_samples]
    z = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    v = torch.randint(0, 2, x0.shape, device=x0.device, generator=generator).to(x0) * 2 - 1   # Rademacher
    with sdpa_kernel(SDPBackend.MATH):
        ell = estimate_ell(cfg, teacher, x0, z, v, labels)
        kappa = estimate_kappa(cfg, teacher, x0, z, ell, labels)
    return Stats(lambda_grid(cfg), ell, kappa, cfg.sigma_data)


# ---- integrals (docs §3) ---------------------------------------------------------------------------------------

class Tables(NamedTuple):
    lam: torch.Tensor    # [J+1] grid
    ell: torch.Tensor    # ℓ_j
    Lam: torch.Tensor    # Λ_j = ∫_{λ_0}^{λ_j} (1 − ℓ)
    K: torch.Tensor      # K_j = ∫_{λ_0}^{λ_j} κ
    I: torch.Tensor      # ∫_{λ_0}^{λ_j} e^{E − m}, E = Λ + K, m = max E
    I0: torch.Tensor     # ∫_{λ_0}^{λ_j} e^{Λ − m0}, m0 = max Λ (the κ ≡ 0 reading)
    m: torch.Tensor
    m0: torch.Tensor


def tables(stats, device):
    """The integral tables on `device`, computed once per (statistics, device) in float64 (docs §3): Λ and K by the
    cumulative trapezoid, I and I0 exactly for the piecewise-linear exponents, max-shifted against overflow. So
    ℓ ≡ κ ≡ 0 reproduces CTM to rounding."""
    key = str(torch.device(device))
    if key not in stats._tables:
        lam, ell, kappa = (v.to(device, torch.float64) for v in (stats.lam, stats.ell, stats.kappa))
        h, zero = lam.diff(), lam.new_zeros(1)
        Lam = torch.cat([zero, (h * (1 - (ell[1:] + ell[:-1]) / 2)).cumsum(0)])     # Λ = ∫ (1 − ℓ) dλ
        K = torch.cat([zero, (h * (kappa[1:] + kappa[:-1]) / 2).cumsum(0)])         # K = ∫ κ dλ
        cum = lambda A, mA: torch.cat([zero, (A[:-1] - mA).exp().mul(_phi(A.diff(), h)).cumsum(0)])
        E = Lam + K
        stats._tables[key] = Tables(lam, ell, Lam, K, cum(E, E.max()), cum(Lam, Lam.max()), E.max(), Lam.max())
    return stats._tables[key]


def _phi(dE, h):
    """∫_0^h e^{(dE/h)·u} du = h·(e^{dE} − 1)/dE, stable as dE -> 0."""
    safe = torch.where(dE == 0, torch.ones_like(dE), dE)
    return torch.where(dE == 0, h, h * torch.expm1(safe) / safe)


class At(NamedTuple):
    Lam: torch.Tensor
    K: torch.Tensor
    I: torch.Tensor
    I0: torch.Tensor
    ell: torch.Tensor


def _at(tab, t):
    """Λ, K, ℓ linear in λ = −ln t between grid points, I and I0 integrated exactly; the end intervals extend
    linearly outside [σ_min, σ_max]. (DPM-Solver-v3 snaps to grid points instead; docs §3.)"""
    lam = -t.log()
    j = (torch.searchsorted(tab.lam, lam, right=True) - 1).clamp(0, tab.lam.numel() - 2)
    u = lam - tab.lam[j]                                                            # offset inside interval j
    w = u / (tab.lam[j + 1] - tab.lam[j])
    lin = lambda A: A[j] + (A[j + 1] - A[j]) * w
    cum = lambda C, A, mA: C[j] + (A[j] - mA).exp() * _phi((A[j + 1] - A[j]) * w, u)
    E = tab.Lam + tab.K
    return At(lin(tab.Lam), lin(tab.K), cum(tab.I, E, tab.m), cum(tab.I0, tab.Lam, tab.m0), lin(tab.ell))


class Jump(NamedTuple):
    f: torch.Tensor      # e^{Λ_t − Λ_s}: the exact flow of the linear part
    g_bwd: torch.Tensor  # ∫ e^{E(r) − E_s} dr: weight of N_φ frozen at the target s
    g_fwd: torch.Tensor  # ∫ e^{Λ(r) − Λ_s + K(r) − K_t} dr: weight of N_φ frozen at the start t
    g_0: torch.Tensor    # ∫ e^{Λ(r) − Λ_s} dr: weight of N_φ with κ ≡ 0
    ell_t: torch.Tensor
    ell_s: torch.Tensor


def jump(stats, t, s):
    """f and the three weights g of docs §2 for float64 t ≥ s [B], on t's device."""
    tab = tables(stats, t.device)
    a_t, a_s = _at(tab, t), _at(tab, s)
    E_s = a_s.Lam + a_s.K
    g_bwd = (tab.m - E_s).exp() * (a_s.I - a_t.I)                                   # docs (2.2)
    return Jump(f=(a_t.Lam - a_s.Lam).exp(),                                         # docs (1.3)
                g_bwd=g_bwd,
                g_fwd=g_bwd * (a_s.K - a_t.K).exp(),                                 # docs (2.1)
                g_0=(tab.m0 - a_s.Lam).exp() * (a_s.I0 - a_t.I0),                    # docs (2.3)
                ell_t=a_t.ell, ell_s=a_s.ell)


# ---- the readings: (β, α) of G_θ = β·x_t + α·F_θ (Fig. 1), float64 [B] for t ≥ s ------------------------------

def _explicit(stats, t, g, ell_t, f):
    """G = f·x_t + g·(D_θ − ℓ_t·x_t) with D_θ = c_skip(t)·x_t + c_out(t)·F_θ."""
    c_skip, c_out, _, _ = edm.precond(t, stats.sigma_data)                         # EDM Table 1
    return f + g * (c_skip - ell_t), g * c_out


def backward_explicit(stats, t, s):
    """Target-anchored weight on the start's nonlinear term (docs §2, reading A).

    G = f·x_t + g_bwd·(D_θ − ℓ_t·x_t): the network's D_θ stands for D_φ(x_t, t), ℓ is taken at t, but g_bwd is the
    weight of N_φ frozen at the target s. The two ends disagree: where N_φ shrinks along the path (κ < 0), g_bwd is
    sized for a smaller N_φ than the one it multiplies. Sourced: the form, l_t, s_t, "backward". Reconstructed: the
    rest. Unbounded on narrow-mode data (ring8: α(80, ε) in the hundreds)."""
    J = jump(stats, t, s)
    return _explicit(stats, t, J.g_bwd, J.ell_t, J.f)


def start_anchored(stats, t, s):
    """Exponential-integrator forward Euler (docs §2, reading B): N_φ frozen at the start t, with its κ-trend.

    G = f·x_t + g_fwd·(D_θ − ℓ_t·x_t): D_θ stands for D_φ(x_t, t), ℓ at t, κ anchored at t. Self-consistent, and the
    teacher-initialised student is the first-order step. Sourced: the form, l_t, s_t. Reconstructed: the rest.
    Against the (second-hand) report that the forward form is unstable for long jumps: e^{K_s − K_t} can be huge."""
    J = jump(stats, t, s)
    return _explicit(stats, t, J.g_fwd, J.ell_t, J.f)


def kappa_zero(stats, t, s):
    """First-order step of the generalized ODE without the κ-trend (docs §2, reading C).

    G = f·x_t + g_0·(D_θ − ℓ_t·x_t): D_θ stands for D_φ(x_t, t), ℓ at t, κ ≡ 0 (so no anchor). Bounded by
    construction for 0 ≤ ℓ ≤ 1 (f ≤ 1, g_0 ≤ ln(t/s)). Drops the sourced s_t: an ablation, not the paper's method."""
    J = jump(stats, t, s)
    return _explicit(stats, t, J.g_0, J.ell_t, J.f)


def implicit_backward(stats, t, s):
    """Backward (implicit) Euler of the generalized ODE (docs §2, reading D): N_φ frozen at the target s.

    x_s ≈ f·x_t + g_bwd·(D_φ(x_s, s) − ℓ_s·x_s). The network's D_θ stands for D_φ(x_s, s), the denoiser at the end
    of the jump; the linear term −ℓ_s·x_s is solved for G = x_s:

        G = (f·x_t + g_bwd·D_θ) / (1 + g_bwd·ℓ_s),  D_θ = c_skip(t)·x_t + c_out(t)·F_θ,

    so β = (f + g_bwd·c_skip(t)) / (1 + g_bwd·ℓ_s), α = g_bwd·c_out(t) / (1 + g_bwd·ℓ_s). Sourced: the form, l_t,
    s_t, "backward". Reconstructed: reading "backward Euler" as implicit, ℓ at s, c_skip/c_out at t. The
    denominator is ≥ 1 for ℓ ≥ 0, so α ≤ c_out(t)/ℓ_s wherever g_bwd grows. Gaussian data: the optimal student
    (D_θ = D_φ(x_s, s)) is exact, the teacher-initialised one (D_θ = D_φ(x_t, t)) is not."""
    J = jump(stats, t, s)
    c_skip, c_out, _, _ = edm.precond(t, stats.sigma_data)                         # EDM Table 1
    den = 1 + J.g_bwd * J.ell_s
    return (J.f + J.g_bwd * c_skip) / den, J.g_bwd * c_out / den


READINGS = (backward_explicit, start_anchored, kappa_zero, implicit_backward)


def coefficients(stats, t, s):
    """The default reading, β(t,s) and α(t,s) float64 [B] for t ≥ s: `implicit_backward`.

    Why (docs §5): no reading meets every sourced statement. This one keeps both sourced parameters, is a backward
    step ("backward Euler" in its usual numerical meaning is the implicit one), is bounded for all t > s on every
    teacher measured, its single-jump coefficients are within a few per cent of CTM's (Fig. 2), and in CTM training
    it is no worse than CTM's own coefficients (docs/results.md, claim 1). It does not shrink the consistency gap
    (κ ≡ 0 does, but its single jumps are far from CTM's). What would change the choice: the paper's text showing
    an explicit or κ-free step, or a teacher on which this reading trains worse than CTM, or κ ≡ 0 better."""
    return implicit_backward(stats, t, s)


def check_bounded(stats, sigma_min=edm.SIGMA_MIN, sigma_max=edm.SIGMA_MAX, reading=coefficients, points=200):
    """None if `reading`'s coefficients are finite and inside the envelope of docs §3 for every pair t > s of a
    λ-uniform grid on [σ_min, σ_max]: |β| ≤ 1 + ln(t/s) and |α| ≤ σ_d·max(1, ln(t/s)), the larger of the bounds
    that CTM's jumper and every κ-free first-order step with 0 ≤ ℓ ≤ 1 obey. Otherwise a message that says where
    it fails and what to do."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"check_bounded needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    t_grid = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), points, dtype=torch.float64)
    i, j = torch.triu_indices(points, points, 1)
    t, s = t_grid[j], t_grid[i]                                                     # every pair with t > s
    beta, alpha = reading(stats, t, s)
    span = (t / s).log()
    beta_max, alpha_max = 1 + span, stats.sigma_data * span.clamp(min=1)
    bad = ~(beta.isfinite() & alpha.isfinite() & (beta.abs() <= beta_max) & (alpha.abs() <= alpha_max))
    if not bool(bad.any()):
        return None
    k = int(torch.where(bad, alpha.abs().nan_to_num(float("inf")), torch.zeros_like(alpha)).argmax())
    return (f"Analytic-Precond coefficients out of bounds ({getattr(reading, '__name__', reading)}) at "
            f"{int(bad.sum())} of {len(t)} (t, s) pairs, e.g. β({t[k]:.3g}, {s[k]:.3g}) = {beta[k]:.3g}, "
            f"α = {alpha[k]:.3g} (bounds {beta_max[k]:.3g}, {alpha_max[k]:.3g}); training would "
            f"amplify the network's output without limit. Use the default reading (analytic_precond.coefficients), "
            f"recompute the statistics with more samples, or train with CTM's own coefficients (--precond paper).")
