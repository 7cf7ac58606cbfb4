"""Consistency distillation (CD) and multistep consistency sampling.

Y. Song, P. Dhariwal, M. Chen, I. Sutskever, "Consistency Models", ICML 2023, arXiv:2303.01469v2. Section and
algorithm numbers below refer to that version. Hyperparameters the paper leaves to its released code
(openai/consistency_models, openai/consistency_models_cifar10) are cited as "CM's code".

A consistency function maps any point of a teacher PF-ODE trajectory to its end at ε = σ_min (Sec. 3):

    f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)),        f_θ(x, ε) = x       (Sec. 3, App. C)
    c_skip(t) = σ_d² / ((t − ε)² + σ_d²),    c_out(t) = σ_d (t − ε) / sqrt(σ_d² + t²)           (App. C)

CD (Sec. 4, Alg. 2) takes adjacent levels t_n < t_{n+1} of the Karras grid, noises data to t_{n+1}, moves it to
t_n by one Heun step of the teacher φ, and pulls the student's output at t_{n+1} towards the target's at t_n:

    L_CD = E[ λ(t_n) · d( f_θ(x + t_{n+1} z, t_{n+1}),  f_{θ⁻}(x̂^φ_{t_n}, t_n) ) ],   θ⁻ ← sg(μ θ⁻ + (1 − μ) θ)

Sampling (Alg. 1): x ← f_θ(T·z, T), then for each τ_k: x ← f_θ(x + sqrt(τ_k² − ε²)·z_k, τ_k). One NFE per step.
The outer coefficients (c_skip, c_out) are a function `outer(t, s) -> (β, α)` with s = ε, so that another
preconditioning can replace them; None means CM's. The distance d is a function too (`edm.squared_l2`, ...).

| code                | paper                       | code         | paper                          |
|---------------------|-----------------------------|--------------|--------------------------------|
| `net`               | F_θ (online student θ)      | `net_ema`    | F_{θ⁻} (target θ⁻, EMA rate μ) |
| `teacher`           | D_φ (EDM denoiser)          | `f`          | f_θ(x, t)                      |
| `sigma_min`, `sigma_max` | ε, T                   | `N`          | N (grid levels)                |
| `t_n1`, `t_n`       | t_{n+1} > t_n               | `x_hat`      | x̂^φ_{t_n}                      |
| `taus`              | τ_1 > … > τ_{K−1}           | `outer`      | (t, s) ↦ (β, α), or None (CM's c_skip, c_out) |
| `distance`          | d(·, ·)                     |              |                                |
"""
from dataclasses import dataclass

import torch

from algorithms import edm


@dataclass(frozen=True)
class Config:
    sigma_min: float = edm.SIGMA_MIN    # ε, Sec. 3 / App. C
    sigma_max: float = edm.SIGMA_MAX    # T, App. C
    sigma_data: float = edm.SIGMA_DATA  # σ_d, App. C
    rho: float = edm.RHO                # the Karras grid, ρ = 7 (EDM Eq. 5)
    N: int = 18                         # CM's code: CIFAR-10 N = 18 (ImageNet-64, LSUN: N = 40)
    mu: float = 0.0                     # CM's code: CIFAR-10 CD μ = 0, i.e. θ⁻ = sg(θ) (ImageNet-64, LSUN: 0.95)


def cm_scalings(cfg, t):
    """CM's boundary-shifted c_skip, c_out (App. C); float64 [B]. c_skip(ε) = 1 and c_out(ε) = 0 exactly."""
    c_skip = cfg.sigma_data**2 / ((t - cfg.sigma_min) ** 2 + cfg.sigma_data**2)              # App. C
    c_out = cfg.sigma_data * (t - cfg.sigma_min) / (cfg.sigma_data**2 + t**2).sqrt()          # App. C
    return c_skip, c_out


def f(cfg, net, x, t, labels=None, outer=None):
    """f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)) (Sec. 3, App. C) with t a float64 [B] tensor.
    With `outer`, a function (t, s) -> (β, α) of float64 [B] tensors, c_skip, c_out become β(t, ε), α(t, ε); the
    boundary condition f_θ(x, ε) = x then holds if β(ε, ε) = 1 and α(ε, ε) = 0."""
    if outer is None:
        c_skip, c_out = cm_scalings(cfg, t)
    else:
        c_skip, c_out = outer(t, torch.full_like(t, cfg.sigma_min))
    _, _, c_in, c_noise = edm.precond(t, cfg.sigma_data)                        # App. C: EDM's c_in, c_noise
    F_x = net(edm.bcast(c_in, x) * x, c_noise.to(x.dtype), labels)
    # The coefficients are float64; cast them (not x) so the result keeps the network's dtype.
    return edm.bcast(c_skip, x) * x + edm.bcast(c_out, x) * F_x.to(x.dtype)


def loss(cfg, net, net_ema, teacher, x, labels=None, generator=None, outer=None, distance=edm.squared_l2):
    """Per-example CD loss [B] (Alg. 2) with λ(t_n) ≡ 1 ("uniform" in CM's code), one teacher Heun step and the
    distance d = `distance(a, b) -> [B]`."""
    t_grid = edm.sigma_grid(cfg.N, cfg.sigma_min, cfg.sigma_max, cfg.rho, device=x.device)  # descending, [0] = T
    # Alg. 2: n ~ U{1, …, N−1} on the paper's ascending grid = an adjacent pair (idx, idx + 1) on the descending
    # one; the student gets the larger level t_{n+1}, the target the smaller t_n.
    idx = torch.randint(0, cfg.N - 1, (x.shape[0],), generator=generator, device=x.device)   # Alg. 2: n
    t_n1, t_n = t_grid[idx], t_grid[idx + 1]                                                 # [B] float64
    z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    x_t_n1 = x + edm.bcast(t_n1, x) * z                                               # Alg. 2: x_{t_{n+1}}
    with torch.no_grad():  # Sec. 4: the teacher step and the target branch f_{θ⁻} get no gradient (stop-gradient)
        x_hat = edm.heun_step(teacher, x_t_n1, t_n1, t_n, labels)                     # Alg. 2: x̂^φ_{t_n}, Heun
        # fork_rng restores the RNG afterwards, so the student pass below sees the same dropout masks, as in
        # CM's code.
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            target = f(cfg, net_ema, x_hat, t_n, labels, outer)                       # f_{θ⁻}(x̂, t_n)
    pred = f(cfg, net, x_t_n1, t_n1, labels, outer)                                   # f_θ(x_{t_{n+1}}, t_{n+1})
    return distance(pred, target)                                                     # Alg. 2: L, λ ≡ 1


def default_taus(cfg, nfe):
    """τ_1 > … > τ_{nfe−1} for Alg. 1: the inner levels of a Karras grid with nfe + 1 levels from T to ε (nfe = 2:
    τ_1 ≈ 2.52). CM picked its τ's by an FID search per dataset (CM's code: CIFAR-10 τ_1 ≈ 0.585, ImageNet-64
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
    x_hat = noise * cfg.sigma_max                                                 # Alg. 1: x̂_T ~ N(0, T² I)
    x = f(cfg, net, x_hat, t(cfg.sigma_max), labels, outer)                      # Alg. 1: x ← f_θ(x̂_T, T)
    if path is not None:
        path.extend([x_hat, x])
    for tau in taus:                                                              # Alg. 1: for τ_1, …, τ_{K−1}
        z = edm.randn_like(noise, generator)                                     # Alg. 1: z
        x_hat = x + (tau**2 - cfg.sigma_min**2) ** 0.5 * z                        # Alg. 1: x̂_τ
        x = f(cfg, net, x_hat, t(tau), labels, outer)                             # Alg. 1: x ← f_θ(x̂_τ, τ)
        if path is not None:
            path.extend([x_hat, x])
    return x
