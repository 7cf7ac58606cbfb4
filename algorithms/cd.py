"""Consistency distillation (CD) and multistep consistency sampling.

Y. Song, P. Dhariwal, M. Chen, I. Sutskever, "Consistency Models", ICML 2023, arXiv:2303.01469v2.
`§x` refers to ../shared/papers/cd.md, which rebuilds the paper's App. C hyperparameters from the released code.

A consistency function maps any point of a teacher PF-ODE trajectory to its end at ε = σ_min (§3):

    f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)),        f_θ(x, ε) = x       (boundary, §1)
    c_skip(t) = σ_d² / ((t − ε)² + σ_d²),    c_out(t) = σ_d (t − ε) / sqrt(σ_d² + t²)           (App. C)

CD (§4, the paper's Alg. 2) takes adjacent levels t_n < t_{n+1} of the Karras grid, noises data to t_{n+1}, moves it to
t_n by one Heun step of the teacher φ, and pulls the student's output at t_{n+1} towards the target's at t_n:

    L_CD = E[ λ(t_n) · d( f_θ(x + t_{n+1} z, t_{n+1}),  f_{θ⁻}(x̂^φ_{t_n}, t_n) ) ],   θ⁻ ← sg(μ θ⁻ + (1 − μ) θ)

Sampling (Alg. 1): x ← f_θ(T·z, T), then for each τ_k: x ← f_θ(x + sqrt(τ_k² − ε²)·z_k, τ_k). One NFE per step.
The outer coefficients (c_skip, c_out) are a function `outer(t, s) -> (β, α)` with s = ε, so that another
preconditioning (e.g. Analytic-Precond's β(t, ε), α(t, ε)) can replace them; None means CM's.

| code                | paper                       | code         | paper                          |
|---------------------|-----------------------------|--------------|--------------------------------|
| `net`               | F_θ (online student θ)      | `net_ema`    | F_{θ⁻} (target θ⁻, EMA rate μ) |
| `teacher`           | D_φ (EDM denoiser)          | `f`          | f_θ(x, t)                      |
| `sigma_min`, `sigma_max` | ε, T                   | `N`          | N (grid levels)                |
| `t_n1`, `t_n`       | t_{n+1} > t_n               | `x_hat`      | x̂^φ_{t_n}                      |
| `taus`              | τ_1 > … > τ_{K−1}           | `outer`      | (t, s) ↦ (β, α), or None (CM's c_skip, c_out) |
"""
from dataclasses import dataclass

import torch

from algorithms import edm


@dataclass
class Config:
    sigma_min: float = edm.SIGMA_MIN    # ε, §1 / App. C
    sigma_max: float = edm.SIGMA_MAX    # T, §1
    sigma_data: float = edm.SIGMA_DATA  # σ_d, §1
    rho: float = edm.RHO                # §2: Karras grid, ρ = 7
    N: int = 18                         # §6 / App. C: CIFAR-10 N = 18 (ImageNet-64, LSUN: N = 40)
    mu: float = 0.0                     # §5: CIFAR-10 CD μ = 0, i.e. θ⁻ = sg(θ) (ImageNet-64, LSUN: μ = 0.95)
    # §4: the headline runs use LPIPS; it is left out here (needs ImageNet VGG weights). Of the distances below
    # CM's own "l2" runs use the pixel mean of the squared difference, i.e. `squared_l2`.
    distance: str = "squared_l2"
    huber_c: float = 0.00054            # pseudo-Huber c = 0.00054·sqrt(d): iCT (Song & Dhariwal, arXiv:2310.14189)


def squared_l2(a, b, cfg):
    """§4 "l2": mean over the non-batch dimensions of (a − b)², as in CM's code (a mean, not a sum)."""
    return (a - b).square().flatten(1).mean(1)


def l2(a, b, cfg):
    """The Euclidean distance ‖a − b‖₂ (not squared)."""
    return (a - b).flatten(1).norm(dim=1)


def pseudo_huber(a, b, cfg):
    """iCT's pseudo-Huber sqrt(‖a − b‖² + c²) − c with c = huber_c·sqrt(d): ≈ ‖a − b‖²/(2c) near 0, ≈ ‖a − b‖
    far away, so outliers weigh less than under squared l2."""
    c = cfg.huber_c * a[0].numel() ** 0.5
    return ((a - b).flatten(1).square().sum(1) + c**2).sqrt() - c


DISTANCES = {"squared_l2": squared_l2, "l2": l2, "pseudo_huber": pseudo_huber}


def cm_scalings(cfg, t):
    """CM's boundary-shifted c_skip, c_out (§1, App. C); float64 [B]. c_skip(ε) = 1 and c_out(ε) = 0 exactly."""
    c_skip = cfg.sigma_data**2 / ((t - cfg.sigma_min) ** 2 + cfg.sigma_data**2)              # App. C
    c_out = cfg.sigma_data * (t - cfg.sigma_min) / (cfg.sigma_data**2 + t**2).sqrt()          # App. C
    return c_skip, c_out


def f(cfg, net, x, t, labels=None, outer=None):
    """f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)) (§1, the paper's §3) with t a float64
    [B] tensor. With `outer`, a function (t, s) -> (β, α) of float64 [B] tensors, c_skip, c_out become
    β(t, ε), α(t, ε); the boundary condition f_θ(x, ε) = x then holds if β(ε, ε) = 1 and α(ε, ε) = 0."""
    if outer is None:
        c_skip, c_out = cm_scalings(cfg, t)
    else:
        c_skip, c_out = outer(t, torch.full_like(t, cfg.sigma_min))
    _, _, c_in, c_noise = edm.precond(t, cfg.sigma_data)                                      # §1: EDM's c_in, c_noise
    F_x = net(edm.bcast(c_in, x) * x, c_noise.to(x.dtype), labels)
    # The coefficients are float64; cast them (not x) so the result keeps the network's dtype.
    return edm.bcast(c_skip, x) * x + edm.bcast(c_out, x) * F_x.to(x.dtype)


def loss(cfg, net, net_ema, teacher, x, labels=None, generator=None, outer=None):
    """Per-example CD loss [B] (Alg. 2) with λ(t_n) ≡ 1 ("uniform", §4) and one teacher Heun step (§3)."""
    t_grid = edm.sigma_grid(cfg.N, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(x.device)  # descending, [0] = T (§2)
    # §2: n ~ U{1, …, N−1} on the paper's ascending grid = an adjacent pair (idx, idx + 1) on the descending one;
    # the student gets the larger level t_{n+1}, the target the smaller t_n.
    idx = torch.randint(0, cfg.N - 1, (x.shape[0],), generator=generator, device=x.device)        # Alg. 2 l. 4
    t_n1, t_n = t_grid[idx], t_grid[idx + 1]                                                   # [B] float64
    z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    x_t_n1 = x + edm.bcast(t_n1, x) * z                                                        # Alg. 2 l. 5
    with torch.no_grad():  # §4: the teacher step and the target branch f_{θ⁻} get no gradient (stop-gradient)
        x_hat = edm.heun_step(teacher, x_t_n1, t_n1, t_n, labels)                            # Alg. 2 l. 6, §3
        # fork_rng restores the RNG afterwards, so the student pass below sees the same dropout masks (§4).
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            target = f(cfg, net_ema, x_hat, t_n, labels, outer)                                # f_{θ⁻}(x̂, t_n)
    pred = f(cfg, net, x_t_n1, t_n1, labels, outer)                                    # f_θ(x_{t_{n+1}}, t_{n+1})
    return DISTANCES[cfg.distance](pred, target, cfg)                                          # Alg. 2 l. 7, λ ≡ 1


def default_taus(cfg, nfe):
    """τ_1 > … > τ_{nfe−1} for Alg. 1: the inner levels of a Karras grid with nfe + 1 levels from T to ε (nfe = 2:
    τ_1 ≈ 2.52). CM picked its τ's by FID search per dataset (§7: CIFAR-10 notebook τ_1 ≈ 0.585, ImageNet-64
    τ_1 ≈ 1.382), which a toy cannot reproduce; this grid has no free parameter and is CTM's deterministic NFE-n
    grid, so CD and CTM are compared at identical intermediate times."""
    return edm.sigma_grid(nfe + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho)[1:-1].tolist()


@torch.no_grad()
def sample(cfg, net, noise, labels=None, nfe=1, generator=None, path=None, outer=None, taus=None):
    """Multistep consistency sampling, Alg. 1; `noise` is unit-variance N(0, I) and nfe = len(taus) + 1.
    `path`, if a list, receives x̂_T and then every noised input x̂_τ and every output f_θ(·)."""
    taus = default_taus(cfg, nfe) if taus is None else list(taus)
    if len(taus) != nfe - 1:
        raise ValueError(f"nfe={nfe} needs {nfe - 1} τ's, got {len(taus)}")
    B = noise.shape[0]
    t = lambda v: torch.full((B,), v, dtype=torch.float64, device=noise.device)
    x_hat = noise * cfg.sigma_max                                                 # Alg. 1 l. 1: x̂_T ~ N(0, T² I)
    x = f(cfg, net, x_hat, t(cfg.sigma_max), labels, outer)                      # Alg. 1 l. 2: x ← f_θ(x̂_T, T)
    if path is not None:
        path.extend([x_hat, x])
    for tau in taus:                                                              # Alg. 1 l. 3
        z = torch.randn(noise.shape, dtype=noise.dtype, device=noise.device, generator=generator)  # Alg. 1 l. 4
        x_hat = x + (tau**2 - cfg.sigma_min**2) ** 0.5 * z                        # Alg. 1 l. 5
        x = f(cfg, net, x_hat, t(tau), labels, outer)                             # Alg. 1 l. 6
        if path is not None:
            path.extend([x_hat, x])
    return x
