"""Analytic-Precond: the preconditioning of a consistency/trajectory jumper derived from the teacher ODE.

K. Zheng, G. He, J. Chen, F. Bao, J. Zhu, "Elucidating the Preconditioning in Consistency Distillation",
ICLR 2025, arXiv:2502.02922v3. Section numbers `§x` below refer to ../shared/papers/analytic_precond.md.

RECONSTRUCTION. The paper body could not be confirmed. Every line carries the tag of analytic_precond.md:
[S] sourced (abstract, Fig. 1, reviews), [R] reconstructed after DPM-Solver-v3, [C] sony/ctm default, [U] unknown.
Reconstructed [R]: the generalized ODE, both closed forms (ℓ_t, κ_t), the integrals f, g, the anchoring and
β, α. Sourced [S]: the jumper form β·x_t + α·F_θ, the free parameters l_t, s_t (here ℓ_t, κ_t), f(t,s) and
g(t,s), 120 times × 4096 samples, autodiff for the trace, EDM setting, backward Euler preferred.

In λ = −ln t the teacher PF-ODE is dx/dλ = D_φ(x, t) − x. Split off a linear part ℓ(λ)·x and let the nonlinear
rest N_φ = D_φ − ℓ·x scale like e^{K(λ)}; freezing the rescaled rest gives the first-order jump      (§3.3)

    x_s ≈ f(t,s)·x_t + g(t,s)·N_φ,     f = e^{−(Λ(λ_s) − Λ(λ_t))},   g_bwd = ∫_{λ_t}^{λ_s} e^{E(r) − E(λ_s)} dr,
    Λ(λ) = ∫_{λ_T}^{λ} (1 − ℓ),   K(λ) = ∫_{λ_T}^{λ} κ,   E = Λ + K,   g_fwd = g_bwd·e^{K(λ_s) − K(λ_t)}.

The student's EDM denoiser D_θ = c_skip·x + c_out·F_θ stands in for D_φ, so G_θ = β·x_t + α·F_θ with
β = f + g·(c_skip(t) − ℓ(t)), α = g·c_out(t). ℓ ≡ κ ≡ 0 gives f = s/t, g = 1 − s/t: CTM's jumper.
The statistics are ℓ_t = E tr(∇_x D_φ)/d (Hutchinson) and κ_t = E⟨N, dN/dλ⟩ / E‖N‖² (least squares),
on a grid uniform in λ, computed once per teacher from forward-noised data.

| code              | symbol (analytic_precond.md)      | code            | symbol                       |
|-------------------|-----------------------------------|-----------------|------------------------------|
| `lam`             | λ = −ln t, grid λ_0..λ_J          | `ell`, `kappa`  | ℓ_t ("l_t"), κ_t ("s_t")     |
| `Lam`, `K`, `E`   | Λ(λ), K(λ), Λ + K                 | `I`             | ∫ e^{E − max E} dλ           |
| `f`, `g`          | f(t,s), g(t,s)                    | `beta`, `alpha` | β_{s,t} on x_t, α_{s,t} on F |
| `D`, `N`, `N1`    | D_φ, N_φ, N_φ^{(1)} = dN_φ/dλ      | `teacher`       | D_φ                          |
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

from algorithms import edm


@dataclass
class Config:
    num_intervals: int = 120            # [S] reviews: "120 different times"; [U] 120 or 121 points -> 121 here
    num_samples: int = 4096             # [S] reviews: "4096 samples to estimate expectations"
    batch_size: int = 4096              # memory only: samples per teacher call
    sigma_min: float = edm.SIGMA_MIN    # [S] EDM setting, t ∈ [0.002, 80]
    sigma_max: float = edm.SIGMA_MAX
    sigma_data: float = edm.SIGMA_DATA  # [C]
    # [S, moderate] the paper found the forward form unstable for long jumps. [R] Why: forward scales the network
    # term by e^{K(λ_s)−K(λ_t)}, which for t = 80 -> 0.002 (a λ-span of 10.6) is huge or tiny, so F_θ would have
    # to output badly scaled values; anchored at the target s, the weight e^{E(r)−E(λ_s)} stays O(1), and the
    # noisy κ at t ≈ T (where N_φ ≈ 0 for zero-mean data) barely enters. On ring8 the teacher-initialised backward
    # jumper beats CTM's jump error for every intermediate jump from t = 8.4; forward loses for s < 0.3
    # (benchmarks/analytic_precond_report.py).
    backward_anchor: bool = True


@dataclass
class Stats:
    """ℓ and κ on the λ-grid (float64, [J+1]) plus what turns them into coefficients. `fingerprint` holds a few
    teacher inputs and outputs so that `load` can check that the statistics belong to the teacher at hand."""
    lam: torch.Tensor
    ell: torch.Tensor
    kappa: torch.Tensor
    sigma_data: float = edm.SIGMA_DATA
    backward_anchor: bool = True
    fingerprint: dict | None = None


def lambda_grid(cfg):
    """[R] §3.6: J + 1 points uniform in λ = −ln t from λ_T = −ln σ_max to −ln σ_min (ascending λ, descending t)."""
    if cfg.num_intervals < 2:  # ℓ'(λ) is a second-order finite difference, which needs three grid points
        raise ValueError(f"analytic_precond.Config.num_intervals must be >= 2, got {cfg.num_intervals}")
    return torch.linspace(-math.log(cfg.sigma_max), -math.log(cfg.sigma_min), cfg.num_intervals + 1,
                          dtype=torch.float64)


@torch.no_grad()
def estimate_ell(cfg, teacher, x0, z, v, labels=None):
    """[R] Eq. 15 (§3.5): ℓ_t = E_{q_t} tr(∇_x D_φ(x_t, t)) / d, by Hutchinson vᵀ(∇_x D_φ)v with Rademacher v."""
    ts = (-lambda_grid(cfg)).exp()
    ell = torch.zeros_like(ts)
    for j, t in enumerate(ts.tolist()):
        acc = 0.0
        for x0_b, z_b, v_b, y_b in _batches(cfg, x0, z, v, labels):
            x = x0_b + t * z_b                                                      # [R] §3.6 step 2: x_t ~ q_t
            sigma = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            _, Jv = torch.func.jvp(lambda x_: teacher(x_, sigma, y_b), (x,), (v_b,))  # [S] autodiff: J·v
            acc += (v_b * Jv).to(torch.float64).sum().item()                       # [R] §3.6 step 3: Σ vᵀ J v
        ell[j] = acc / x0.numel()                                                   # Eq. 15: / (K·d)
    return ell


@torch.no_grad()
def estimate_kappa(cfg, teacher, x0, z, ell, labels=None):
    """[R] Eq. 17 (§3.5): κ_t = E⟨N_φ, N_φ^{(1)}⟩ / E‖N_φ‖², the least-squares fit of dN_φ/dλ by κ·N_φ.

    The total derivative along the teacher ODE is one JVP of (x, t) ↦ D_φ along (dx/dλ, dt/dλ) = (D_φ − x, −t)."""
    lam = lambda_grid(cfg)
    dell = torch.gradient(ell, spacing=(lam,), edge_order=2)[0]                     # [R] §3.6 step 4: ℓ'(λ)
    kappa = torch.zeros_like(ell)
    for j, t in enumerate((-lam).exp().tolist()):
        num = den = size = 0.0
        for x0_b, z_b, _, y_b in _batches(cfg, x0, z, z, labels):
            x = x0_b + t * z_b
            sigma = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            D = teacher(x, sigma, y_b)
            _, D1 = torch.func.jvp(lambda x_, s_: teacher(x_, s_, y_b), (x, sigma), (D - x, -sigma))  # dD_φ/dλ
            N = (D - ell[j] * x).to(torch.float64)                                     # [R] §3.3: N_φ = D_φ − ℓx
            N1 = (D1 - dell[j] * x - ell[j] * (D - x)).to(torch.float64)               # [R] §3.5: N_φ^{(1)}
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

    The same noise z and probes v serve every grid time (common random numbers): ℓ_j is then a smooth function
    of t and its finite difference ℓ' in κ is not swamped by Monte Carlo noise."""
    if x0.shape[0] < cfg.num_samples:
        raise ValueError(f"compute_stats needs cfg.num_samples={cfg.num_samples} samples, got {x0.shape[0]}")
    x0 = x0[:cfg.num_samples]
    labels = None if labels is None else labels[:cfg.num_samples]
    z = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    v = torch.randint(0, 2, x0.shape, device=x0.device, generator=generator).to(x0) * 2 - 1   # [R] §3.6: Rademacher
    ell = estimate_ell(cfg, teacher, x0, z, v, labels)
    kappa = estimate_kappa(cfg, teacher, x0, z, ell, labels)
    return Stats(lambda_grid(cfg), ell, kappa, cfg.sigma_data, cfg.backward_anchor,
                 _teacher_probe(teacher, x0[:4], None if labels is None else labels[:4]))


@torch.no_grad()
def _teacher_probe(teacher, x0, labels):
    x = x0 + torch.linspace(-1.0, 1.0, x0.numel()).reshape(x0.shape).to(x0)         # fixed probe inputs
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])[: x0.shape[0]].to(x0)
    cpu = lambda v: None if v is None else v.cpu()
    return {"x": cpu(x), "sigma": cpu(sigma), "labels": cpu(labels), "D": cpu(teacher(x, sigma, labels))}


def save(stats, path):
    """Plain tensors and floats only, so `load` works with torch.load(weights_only=True)."""
    torch.save({"lam": stats.lam, "ell": stats.ell, "kappa": stats.kappa, "sigma_data": stats.sigma_data,
                "backward_anchor": stats.backward_anchor, "fingerprint": stats.fingerprint}, path)


def load(path, teacher=None, device="cpu"):
    """Inverse of `save`. With `teacher` (running on `device`), raise if the stored teacher outputs do not match
    this teacher's."""
    d = torch.load(path, weights_only=True)
    stats = Stats(d["lam"], d["ell"], d["kappa"], d["sigma_data"], d["backward_anchor"], d["fingerprint"])
    fp = stats.fingerprint
    if teacher is not None and fp is not None:
        to = lambda v: None if v is None else v.to(device)
        D = teacher(to(fp["x"]), to(fp["sigma"]), to(fp["labels"])).cpu()
        if not torch.allclose(D.to(torch.float64), fp["D"].to(torch.float64), rtol=1e-4, atol=1e-5):
            raise ValueError(f"{path}: these Analytic-Precond statistics were computed for a different teacher")
    return stats


def integrals(stats):
    """[R] §3.7: Λ_j, K_j by cumulative trapezoid on the grid (float64), E = Λ + K, and the max-shifted
    I_j = ∫_{λ_0}^{λ_j} e^{E(r) − m} dr with m = max E. Between grid points Λ and K are linear in λ, and I is the
    exact integral of e^{E} for that piecewise-linear E, so ℓ ≡ κ ≡ 0 reproduces CTM to rounding error."""
    h = stats.lam.diff()                                                            # [J]
    zero = stats.lam.new_zeros(1)
    Lam = torch.cat([zero, (h * (1 - (stats.ell[1:] + stats.ell[:-1]) / 2)).cumsum(0)])   # Λ = ∫ (1 − ℓ) dλ
    K = torch.cat([zero, (h * (stats.kappa[1:] + stats.kappa[:-1]) / 2).cumsum(0)])       # K = ∫ κ dλ
    E = Lam + K
    m = E.max()                                                                     # max-shift against overflow
    I = torch.cat([zero, (E[:-1] - m).exp().mul(_phi(E.diff(), h)).cumsum(0)])     # ∫ e^{E − m} over each interval
    return Lam, K, E, I, m


def _phi(dE, h):
    """∫_0^h e^{(dE/h)·u} du = h·(e^{dE} − 1)/dE, stable as dE -> 0."""
    safe = torch.where(dE == 0, torch.ones_like(dE), dE)
    return torch.where(dE == 0, h, h * torch.expm1(safe) / safe)


def _at(stats, tables, t):
    """Interpolate Λ, K, ℓ linearly in λ = −ln t, and I exactly (piecewise-linear E), at t [B]; outside [ε, T]
    the end intervals are extended linearly. [U] DPM-Solver-v3 snaps to grid points instead (§3.7)."""
    Lam, K, E, I, m = tables
    lam = -t.log()
    j = (torch.searchsorted(stats.lam, lam, right=True) - 1).clamp(0, stats.lam.numel() - 2)
    u = lam - stats.lam[j]                                                          # offset inside interval j
    h = stats.lam[j + 1] - stats.lam[j]
    lin = lambda A: A[j] + (A[j + 1] - A[j]) * u / h
    dE = (E[j + 1] - E[j]) * u / h
    return lin(Lam), lin(K), lin(E), I[j] + (E[j] - m).exp() * _phi(dE, u), lin(stats.ell)


def f_and_g(stats, t, s):
    """[R] §3.3 Eq. 13 (first-order): f(t,s) = e^{−(Λ_s − Λ_t)} and g(t,s) (backward or forward anchoring) for
    float64 t ≥ s of shape [B]; also ℓ(t), which `coefficients` needs."""
    stats = dataclasses.replace(stats, lam=stats.lam.to(t.device), ell=stats.ell.to(t.device),
                                kappa=stats.kappa.to(t.device))
    tables = integrals(stats)
    Lam_t, K_t, _, I_t, ell_t = _at(stats, tables, t)
    Lam_s, K_s, E_s, I_s, _ = _at(stats, tables, s)
    f = (Lam_t - Lam_s).exp()                                                       # [R] §3.3: f(t,s)
    g = (tables[4] - E_s).exp() * (I_s - I_t)                                       # [R] §3.3: g_bwd(t,s)
    if not stats.backward_anchor:
        g = g * (K_s - K_t).exp()                                        # [R] §3.3: g_fwd = g_bwd·e^{K_s−K_t}
    return f, g, ell_t


def coefficients(stats, t, s):
    """β(t,s) on x_t and α(t,s) on the network output, float64 [B], for t ≥ s (both [B] float64), such that

        G_θ(x_t, t, s) = β·x_t + α·F_θ(c_in(t)·x_t, c_noise(t), c_noise(s))             [S] Fig. 1

    with β = f + g·(c_skip(t) − ℓ(t)), α = g·c_out(t) [R] §3.3 (EDM c_skip, c_out [C]); [U] ℓ(t) rather than ℓ(s)."""
    f, g, ell_t = f_and_g(stats, t, s)
    c_skip, c_out, _, _ = edm.precond(t, stats.sigma_data)
    return f + g * (c_skip - ell_t), g * c_out                                     # [R] §2 Table 1, last row
