"""Multistep Consistency Models (MCM): Alg. 1 (CD and CT) and Alg. 2 (sampling).

J. Heek, E. Hoogeboom, T. Salimans, "Multistep Consistency Models", arXiv:2403.06807v3 (19 Nov 2024), Sec. 2–3,
Alg. 1, Alg. 2, App. A.1. Equation numbers refer to v3. DDIM / invDDIM / aDDIM live in `algorithms/addim.py`.
Lines of Alg. 1–3 are cited by the quantity they compute, not by line number.

Time t ∈ [0, 1] is split into S equal segments; segment `step` is (t_step, t_step + 1/S] with t_step = step/S.
Within it the student is a consistency model for the segment start: its jump is DDIM_{t→t_step}(x̂_θ(x_t), x_t).
Training (Alg. 1) takes one teacher step t → s = t − 1/T on a grid of T = S·round(N(i)/S) teacher steps, where
N(i) anneals log-linearly from 64 to 1280, lets the stop-gradient student jump from s to t_step, and regresses
x̂_θ(x_t) on the x for which DDIM_{t→t_step} lands on that point (Eq. 7):

    x_s   = aDDIM_{t→s}(x̂_teacher, x_t; x_var = η‖x̂_teacher − x‖²/d)    (CD; CT: x̂_teacher = x, DDIM)
    x_ref = DDIM_{s→t_step}(sg x̂_θ(x_s, s), x_s)
    L     = (SNR(t) + 1)·ρ(x̂_θ(x_t, t) − invDDIM_{t→t_step}(x_ref, x_t)),   ρ(δ) = sqrt(‖δ‖²/d + ε²) − ε

Sampling (Alg. 2) is S DDIM steps from t = k/S to (k − 1)/S with the student's x̂, one network call each.

Choices. The paper's VP quantities map to EDM's VE ones as in docs/mcm_vp_ve.md. Time: VP t with
σ(t) = tan(t·atan σ_max) (`addim.sigma_of_t`): the paper's cosine schedule, stretched so t = 1 is EDM's σ_max = 80
and t = 0 is σ = 0 exactly, which makes the last segment an exact CM boundary (σ_0 = 0, the classic CM loss of
Eqs. 2–3). The student's x̂_θ is EDM's preconditioned D_θ(x; σ) (`edm.denoise`) around the raw `net`, so a student
loaded with an EDM teacher's weights starts as that teacher; the paper's v-prediction is the same form with
σ_data = 1 (docs/mcm_vp_ve.md). The target is the online network under stop-gradient (Alg. 1's nograd f(z_s, s);
the paper has no EMA). ρ is pseudo-Huber on the per-example RMS norm, sqrt(‖δ‖²/d + ε²) − ε: the paper gives no
formula, and only this reading makes both of its statements true (ε = 1e-4 is nearly the ℓ2 distance, ε = 1 nearly
a scaled ℓ2² on [−1, 1] data). The weight is Alg. 1's literal SNR + 1 = 1/σ² + 1; the unsquared v-loss would be
sqrt(SNR + 1) (docs/mcm_vp_ve.md), behind `sqrt_snr_weight`.

| code          | paper                                     |
|---------------|-------------------------------------------|
| `S`           | student_steps                             |
| `step`, `t_step` | step ~ U{0..S−1}, t_step = step/S      |
| `n_rel`, `T`  | n_rel ~ U{1..N/S}, T (teacher steps on [0,1]) |
| `x_t`, `x_s`  | z_t/α_t, z_s/α_s (VE states, σ = σ_t/α_t)  |
| `x_teacher`   | x_teacher = f_teacher(z_t, t) (CD), x (CT) |
| `x_ref`       | ẑ_ref/α_{t_step}                           |
| `x_target`    | invDDIM_{t→t_step}(ẑ_ref, z_t)             |
| `eta`, `huber_eps` | xvar_frac η, huber epsilon             |
"""
import math
from dataclasses import dataclass

import torch

from algorithms import addim, edm
from algorithms.edm import bcast


@dataclass(frozen=True)
class Config:
    S: int = 8                      # student_steps; Table 1 headline (S ∈ {1, 2, 4, 8, 16})
    N_start: int = 64               # App. A.1: teacher steps annealed 64 → 1280
    N_end: int = 1280               # App. A.1
    anneal_iters: int = 100_000     # App. A.1: over 100k iterations (of 200k)
    eta: float = 0.75               # App. A.1: xvar_frac
    huber_eps: float = 1e-4         # App. A.1: huber epsilon (ImageNet)
    addim_teacher: bool = True      # Alg. 1: aDDIM teacher step; False = DDIM (Table 4 ablation)
    sqrt_snr_weight: bool = False   # w = sqrt(SNR + 1), the unsquared v-loss, instead of Alg. 1's SNR + 1
    sigma_data: float = edm.SIGMA_DATA  # EDM preconditioning of the student (module docstring)
    sigma_max: float = edm.SIGMA_MAX    # σ at t = 1


def teacher_steps(cfg, i):
    """N(i) = exp(log N_start + clip(i/anneal_iters, 0, 1)(log N_end − log N_start)), App. A.1 (log-linear)."""
    frac = min(max(i / cfg.anneal_iters, 0.0), 1.0)
    return math.exp(math.log(cfg.N_start) + frac * (math.log(cfg.N_end) - math.log(cfg.N_start)))  # App. A.1


def sample_times(cfg, B, i=0, generator=None, device=None):
    """Alg. 1: per example a segment and a teacher step inside it. Returns t_step, t, s as float64 [B] VP
    times with t ∈ (t_step, t_step + 1/S] and s = t − 1/T ∈ [t_step, t): t never equals a segment start."""
    N_seg = max(1, round(teacher_steps(cfg, i) / cfg.S))                       # Alg. 1: steps per segment
    T = N_seg * cfg.S                                                          # Alg. 1's T (undefined there): S·N/S
    step = torch.randint(0, cfg.S, (B,), generator=generator, device=device)   # Alg. 1: step ~ U{0..S−1}
    n_rel = torch.randint(1, N_seg + 1, (B,), generator=generator, device=device)  # Alg. 1: n_rel ~ U{1..N/S}
    # Integer numerators over T, so t_step, t and s are exact grid points (t − t_step ≥ 1/T exactly).
    t_step = (step * N_seg).to(torch.float64) / T                              # Alg. 1: t_step = step/S
    t = (step * N_seg + n_rel).to(torch.float64) / T                           # t = t_step + n_rel/T
    s = (step * N_seg + n_rel - 1).to(torch.float64) / T                       # s = t − 1/T
    return t_step, t, s


def denoise(cfg, net, x, sigma, labels=None):
    """The student's x̂_θ(x; σ) = EDM's D_θ around the raw `net` (module docstring). Where σ = 0 (only for s = t_step
    = 0, where Alg. 1 discards the value) the network is called at a dummy σ = 1 to avoid c_noise = ln 0."""
    sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return edm.denoise(net, x, safe.to(x.dtype), labels, cfg.sigma_data)


def consistency_loss(cfg, net, x_t, x_s, t_step, t, s, labels=None):
    """Alg. 1 for given times and given teacher point x_s: the per-example MCM loss [B]."""
    sigma_step, sigma_t = addim.sigma_of_t(t_step, cfg.sigma_max), addim.sigma_of_t(t, cfg.sigma_max)
    sigma_s = addim.sigma_of_t(s, cfg.sigma_max)
    with torch.no_grad():  # stop-gradient target: the same online weights, no EMA (Alg. 1: nograd f(z_s, s))
        x_hat_ref = denoise(cfg, net, x_s, sigma_s, labels)                    # Alg. 1: nograd f(z_s, s)
        # Where s = t_step, DDIM_{s→t_step} is the identity, so the target does not depend on the student (Eq. 8,
        # the boundary anchor); written as a `where` because σ_s = σ_step = 0 would give 0/0 in the last segment.
        anchor = bcast(s == t_step, x_s).bool()
        x_ref = torch.where(anchor, x_s, addim.ddim(x_hat_ref, x_s, sigma_s, sigma_step))  # Alg. 1: ẑ_ref
        x_target = addim.inverse_ddim(x_ref, x_t, sigma_t, sigma_step)         # Alg. 1, Eq. 7
    x_hat = denoise(cfg, net, x_t, sigma_t, labels)                            # Alg. 1: the only gradient path
    d = x_t[0].numel()
    rho = ((x_hat - x_target).flatten(1).square().sum(1) / d + cfg.huber_eps**2).sqrt() - cfg.huber_eps  # Alg. 1: ρ
    w = 1 / sigma_t**2 + 1                                                     # Alg. 1: SNR(t) + 1, SNR = 1/σ²
    w = w.sqrt() if cfg.sqrt_snr_weight else w                                 # unsquared v-loss (docs/mcm_vp_ve.md)
    return w.to(rho.dtype) * rho


def loss(cfg, net, teacher, x, labels=None, step=0, generator=None):
    """Multistep consistency distillation, Alg. 1 (CD): per-example loss [B] at training iteration `step`.
    `teacher` is a frozen denoiser D(x; σ, labels); its aDDIM step uses x_var from the true x (Alg. 1)."""
    t_step, t, s = sample_times(cfg, x.shape[0], step, generator, x.device)
    sigma_t, sigma_s = addim.sigma_of_t(t, cfg.sigma_max), addim.sigma_of_t(s, cfg.sigma_max)
    eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    x_t = x + bcast(sigma_t, x) * eps                                          # Alg. 1: z_t = α_t x + σ_t ε
    with torch.no_grad():
        x_teacher = teacher(x_t, sigma_t.to(x.dtype), labels)                 # Alg. 1 (CD)
        # Alg. 1's x_var, with the η of App. A.1 and Alg. 3 (Alg. 1 itself writes no η); DDIM if not addim_teacher
        x_var = addim.x_var_empirical(x, x_teacher, cfg.eta) if cfg.addim_teacher else 0.0
        x_s = addim.addim(x_teacher, x_t, sigma_t, sigma_s, x_var)            # Alg. 1: aDDIM_{t→s}
    return consistency_loss(cfg, net, x_t, x_s, t_step, t, s, labels)


def loss_ct(cfg, net, x, labels=None, step=0, generator=None):
    """Multistep consistency training, Alg. 1 (CT): no teacher, x_teacher = x, so x_var = 0 and the teacher step is
    DDIM with the true x, x_s = x + σ_s ε. Meant to fine-tune a diffusion model, as in the paper."""
    t_step, t, s = sample_times(cfg, x.shape[0], step, generator, x.device)
    sigma_t, sigma_s = addim.sigma_of_t(t, cfg.sigma_max), addim.sigma_of_t(s, cfg.sigma_max)
    eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    x_t = x + bcast(sigma_t, x) * eps                                          # Alg. 1: z_t
    x_s = addim.ddim(x, x_t, sigma_t, sigma_s)                                 # Alg. 1 with x_teacher = x
    return consistency_loss(cfg, net, x_t, x_s, t_step, t, s, labels)


@torch.no_grad()
def sample(cfg, net, noise, labels=None, nfe=None, path=None):
    """Alg. 2: S deterministic DDIM steps t = k/S → (k − 1)/S with the student's x̂, NFE = S (`nfe` defaults to and
    must equal cfg.S). No noise is injected. `path`, if a list, receives every state."""
    nfe = cfg.S if nfe is None else nfe
    if nfe != cfg.S:
        raise ValueError(f"an MCM student with S={cfg.S} samples in exactly S steps, got nfe={nfe}")
    sigmas = addim.time_grid(cfg.S, cfg.sigma_max)                             # σ(k/S), k = S..0; σ(0) = 0
    x = noise.to(torch.float64) * sigmas[0]                                    # Alg. 2: z_1 ~ N(0, I)
    if path is not None:
        path.append(x.to(noise.dtype))
    for k in range(cfg.S):                                                     # Alg. 2: t = 1, …, 1/S
        x_hat = denoise(cfg, net, x.to(noise.dtype), sigmas[k], labels).to(torch.float64)  # Alg. 2: f(z, t)
        x = addim.ddim(x_hat, x, sigmas[k], sigmas[k + 1])                     # Alg. 2: DDIM_{t→s}
        if path is not None:
            path.append(x.to(noise.dtype))
    return x.to(noise.dtype)
