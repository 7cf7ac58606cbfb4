"""DDIM, inverse DDIM and adjusted DDIM (aDDIM), in the EDM σ convention of this project.

J. Heek, E. Hoogeboom, T. Salimans, "Multistep Consistency Models", arXiv:2403.06807v3 (19 Nov 2024), Sec. 3
(Eqs. 4, 5, 10–14) and Alg. 3. Equation numbers refer to v3.

The paper writes the variance-preserving (VP) process z_t = α_t x + σ_t ε. This project writes EDM's variance-
exploding (VE) x_σ = x + σ ε. They are the same process with σ = σ_t/α_t and x_σ = z_t/α_t (docs/mcm_vp_ve.md), so
every VE update below is the paper's VP update divided by α_s (ε̂ is the same vector in both forms). With r = σ_s/σ_t
(VE σ's):

    DDIM_{t→s}(x̂, x_t)      = x̂ + r (x_t − x̂)               VP Eq. 4: α_s x̂ + (σ_s/σ_t)(z_t − α_t x̂)
    invDDIM_{t→s}(x_s, x_t) = (x_s − r x_t) / (1 − r)        VP Eq. 5: (z_s − (σ_s/σ_t) z_t)/(α_s − α_t σ_s/σ_t)
    aDDIM_{t→s}(x̂, x_t)     = x̂ + sqrt(σ_s² + (d/‖ε̂‖²)(1 − r)² x_var) ε̂,   ε̂ = (x_t − x̂)/σ_t
                              VP Eq. 14: α_s x̂ + sqrt(σ_s² + (d/‖ε̂‖²)(α_s − α_t σ_s/σ_t)² x_var) ε̂

DDIM is one Euler step of the PF-ODE dx/dσ = (x − x̂)/σ. Because x̂ = E[x|x_t] is a mean, DDIM's iterates are
short by tr Var[x_s|x_t] = d (1 − r)² x_var in squared norm (Eqs. 12–13, VE form). aDDIM adds exactly that much
along ε̂ (assumed ⟂ x̂), deterministically, with one network call per step. x_var estimates the per-dimension
posterior variance Var[x|x_t]: empirically η·E‖x − x̂‖²/d precomputed per t on data (Alg. 3, η = 0.75), or
analytically 0.1/(2 + SNR) (Sec. 3), i.e. 0.1 σ²/(1 + 2σ²) in VE terms with SNR = 1/σ².

Time grid. The paper samples on a cosine schedule (App. A.1, A.4: aDDIM works best there). We use VP time
t ∈ [0, 1] with σ(t) = tan(t·atan σ_max): the cosine schedule σ = tan(πt'/2) with t' rescaled so that t = 1 is
EDM's σ_max = 80 (simple diffusion's log-SNR clip, at the noisy end only) and t = 0 is σ = 0 exactly.

| code             | paper                                   |
|------------------|-----------------------------------------|
| `x_t`, `x_s`     | z_t/α_t, z_s/α_s (VE states)            |
| `sigma_t`        | σ_t/α_t (= σ_E; SNR = 1/σ_E²)           |
| `x_hat`          | x̂ = f(z_t, t)                          |
| `eps_hat`        | ε̂ = (z_t − α_t x̂)/σ_t                 |
| `x_var`          | x_var,t (per-dimension variance)        |
| `eta`            | η, "xvar_frac"                          |
| `d`              | d, data dimension                       |
"""
import math
from dataclasses import dataclass

import torch

from algorithms.edm import SIGMA_MAX, bcast


@dataclass(frozen=True)
class Config:
    eta: float = 0.75            # App. A.1: xvar_frac = 0.75 (Alg. 3: η ∈ (0, 1))
    num_steps: int = 512         # Table 1: the diffusion teacher is sampled with aDDIM, 512 steps
    sigma_max: float = SIGMA_MAX # σ at t = 1 (EDM Table 1; our rescaled cosine grid, module docstring)


def sigma_of_t(t, sigma_max=SIGMA_MAX):
    """VE noise level of VP time t ∈ [0, 1]: the cosine schedule σ = tan(πt'/2) (App. A.1) with t' = t·(2/π)atan σ_max,
    so σ(0) = 0 and σ(1) = σ_max. Float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.tan(t * math.atan(sigma_max))


def _ratio(x, sigma_t, sigma_s):
    """r = σ_s/σ_t in float64, shaped [B, 1, ..., 1]: the coefficient of every update here."""
    x64 = x.to(torch.float64)
    return bcast(sigma_s, x64) / bcast(sigma_t, x64)


def ddim(x_hat, x_t, sigma_t, sigma_s):
    """DDIM_{t→s}: the deterministic step from σ_t to σ_s ≤ σ_t given the denoised x̂ (Eq. 4). σ_s = 0 gives x̂."""
    r = _ratio(x_t, sigma_t, sigma_s)
    x_hat64 = x_hat.to(torch.float64)
    return (x_hat64 + r * (x_t.to(torch.float64) - x_hat64)).to(x_t.dtype)  # Eq. 4 / α_s (Euler step)


def inverse_ddim(x_s, x_t, sigma_t, sigma_s):
    """invDDIM_{t→s}: the x̂ for which DDIM_{t→s}(x̂, x_t) = x_s (Eq. 5). Needs σ_s < σ_t; 1/(1 − r) amplifies
    rounding as s → t, hence float64."""
    r = _ratio(x_t, sigma_t, sigma_s)
    return ((x_s.to(torch.float64) - r * x_t.to(torch.float64)) / (1 - r)).to(x_t.dtype)  # Eq. 5 / α_s


def addim(x_hat, x_t, sigma_t, sigma_s, x_var):
    """aDDIM_{t→s} (Eq. 14, Alg. 3): DDIM with the noise direction stretched so that the squared norm gains
    d (1 − σ_s/σ_t)² x_var. `x_var` is a float or a per-example [B] tensor; x_var = 0 is DDIM."""
    x64, x_hat64 = x_t.to(torch.float64), x_hat.to(torch.float64)
    sigma_t, sigma_s = bcast(sigma_t, x64), bcast(sigma_s, x64)
    d = x_t[0].numel()
    eps_hat = (x64 - x_hat64) / sigma_t                                        # Alg. 3: ε̂
    z_var = (1 - sigma_s / sigma_t) ** 2 * bcast(x_var, x64)                   # Eq. 13 / α_s²: per-dim Var[x_s|x_t]
    eps_norm2 = eps_hat.flatten(1).square().sum(1).reshape(sigma_t.shape)      # ‖ε̂‖² per example (Eq. 14)
    return (x_hat64 + (sigma_s**2 + d / eps_norm2 * z_var).sqrt() * eps_hat).to(x_t.dtype)  # Eq. 14 / α_s


def x_var_empirical(x, x_hat, eta=0.75):
    """Per-example η‖x − x̂‖²/d (Alg. 1 with App. A.1's η): x_var from the true x. Returns [B], float64."""
    return eta * (x.to(torch.float64) - x_hat.to(torch.float64)).flatten(1).square().mean(1)


def x_var_analytic(sigma):
    """0.1/(2 + SNR) (Sec. 3): 10 % of the posterior variance under a N(0, 0.5 I) prior; = 0.1σ²/(1 + 2σ²) in VE."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 0.1 / (2 + 1 / sigma**2)                                            # Sec. 3, SNR = α²/σ² = 1/σ_E²


def time_grid(num_steps, sigma_max=SIGMA_MAX):
    """Alg. 3: the N + 1 noise levels σ(k/N), k = N..0, descending; the last is exactly 0. Float64."""
    return sigma_of_t(torch.arange(num_steps, -1, -1, dtype=torch.float64) / num_steps, sigma_max)


@torch.no_grad()
def estimate_x_var(D, x, sigmas, eta=0.75, labels=None, generator=None):
    """The empirical x_var,t = η·E‖x − D(x + σε; σ)‖²/d for each σ in `sigmas` (Alg. 3, precomputed on data `x`).
    Returns a float64 tensor shaped like `sigmas`; pass it to `sample` as `x_var`."""
    out = []
    for sigma in sigmas.tolist():
        eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        x_hat = D(x + sigma * eps, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), labels)
        out.append(x_var_empirical(x, x_hat, eta).mean())                      # Alg. 3: E over data, per t
    return torch.stack(out)


@torch.no_grad()
def sample(cfg, D, noise, labels=None, num_steps=None, x_var=None):
    """aDDIM sampler, Alg. 3, on the cosine grid `time_grid`: NFE = num_steps. Same call as `edm.sample`, so it runs
    with any denoiser D (an `edm.Denoiser` teacher, a toy's exact denoiser). `x_var` = per-step values for the
    grid's first num_steps levels (from `estimate_x_var`, η applied); None uses the analytic 0.1/(2 + SNR)."""
    num_steps = num_steps or cfg.num_steps
    sigmas = time_grid(num_steps, cfg.sigma_max)
    x_var = x_var_analytic(sigmas[:-1]) if x_var is None else torch.as_tensor(x_var, dtype=torch.float64)
    if x_var.shape != (num_steps,):
        raise ValueError(f"x_var needs one value per step ({num_steps}), got shape {tuple(x_var.shape)}")
    x = noise.to(torch.float64) * sigmas[0]                                    # Alg. 3: z_1 ~ N(0, I)
    for i in range(num_steps):                                                 # Alg. 3: t = 1, …, 1/N
        sigma_t = sigmas[i].expand(x.shape[0])
        x_hat = D(x.to(noise.dtype), sigma_t.to(noise.dtype), labels).to(torch.float64)  # Alg. 3: x̂ = f(z_t, t)
        x = addim(x_hat, x, sigmas[i], sigmas[i + 1], x_var[i])                # Alg. 3: z_s, Eq. 14
    return x.to(noise.dtype)
