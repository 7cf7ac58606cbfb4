"""Consistency Trajectory Models (CTM): learning the PF-ODE solution operator G(x_t, t, s) for every s ≤ t.

D. Kim, C.-H. Lai, W.-H. Liao, N. Murata, Y. Takida, T. Uesaka, Y. He, Y. Mitsufuji, S. Ermon, "Consistency
Trajectory Models: Learning Probability Flow ODE Trajectory of Diffusion", ICLR 2024, arXiv:2310.02279v3.
Comments cite the paper by the names it gives its pieces (the G_θ/g_θ parametrisation, soft consistency matching,
the DSM term, γ-sampling) and the official code (sony/ctm) by its option names. Where the paper and the code
differ, this file follows the code; docs/ctm_choices.md lists each such choice and why.

    G(x_t, t, s) = x_t + ∫_t^s (x_u − E[x|x_u])/u du                  PF-ODE jump from t to s ≤ t
    G_θ(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g_θ(x_t, t, s)             so G_θ(x, t, t) = x for any network
    g_θ(x_t, t, s) = c_skip(t)·x_t + c_out(t)·NN_θ(c_in(t)·x_t, c_noise(t), c_noise(s))     EDM in t only
    L_CTM = E d( G_θ⁻(G_θ(x_t, t, s), s, σ_min),  G_θ⁻(G_sg(θ)(Solver_φ(x_t, t → u), u, s), s, σ_min) )
    L_DSM = E w(σ)·‖g_θ(x_0 + σz, σ, σ) − x_0‖²                        the student's own denoiser
    L = L_CTM + λ_DSM·L_DSM,  λ_DSM = ‖∇_{θ_L} L_CTM‖ / (‖∇_{θ_L} L_DSM‖ + 1e-4)   adaptive balance (VQGAN-style)

Swappable preconditioning: the jumper is G_θ = β(t,s)·x_t + α(t,s)·NN_θ with the outer coefficients a function
`outer(t, s) -> (β, α)`. `outer=None` is CTM's own β = s/t + (1 − s/t)·c_skip(t), α = (1 − s/t)·c_out(t); any
other preconditioning is passed in as such a function. The inner EDM denoiser g_θ, hence the DSM term, is the same
under all. The distance d is a function too (`edm.squared_l2`, `edm.l2`, `edm.pseudo_huber`).

Not here: CTM's GAN term, and LPIPS as d (it needs ImageNet VGG weights); see docs/ctm_choices.md.

| code                    | paper                                            |
|-------------------------|--------------------------------------------------|
| `G`, `g`, `F`           | G_θ(x_t,t,s), g_θ(x_t,t,s), NN_θ (raw network)    |
| `net`, `net_ema`        | online θ, EMA target θ⁻ (μ = `cfg.mu`)            |
| `teacher`               | the teacher denoiser φ inside Solver_φ           |
| `t`, `u`, `s`           | t, u, s with σ_min ≤ s ≤ u < t                   |
| `n`, `k`, `m`           | grid indices of t, u = σ_{n+k}, s; k teacher steps |
| `beta`, `alpha`         | the outer coefficients of G_θ on x_t and NN_θ    |
| `gamma`, `t_tilde`      | γ, t̃ of γ-sampling                              |
| `last_layer`            | θ_L, the last layer's weight                     |
"""
import math
from dataclasses import dataclass

import torch

from algorithms import edm
from algorithms.edm import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, bcast, sigma_grid


@dataclass(frozen=True)
class Config:
    sigma_data: float = SIGMA_DATA     # EDM's σ_d = 0.5, inherited from the teacher
    sigma_min: float = SIGMA_MIN       # "jump to 0" is a jump to σ_min (sony/ctm)
    sigma_max: float = SIGMA_MAX       # T = 80
    rho: float = RHO                   # Karras grid, ρ = 7 (EDM Eq. 5)
    N: int = 18                        # sony/ctm: grid size for CIFAR-10 (40 for ImageNet-64)
    K_max: int = 17                    # sony/ctm: num_heun_step = N − 1 for CIFAR-10
    mu: float = 0.999                  # sony/ctm: target EMA θ⁻ ← μθ⁻ + (1−μ)θ, start_ema
    use_dsm: bool = True               # the DSM term is on by default (sony/ctm)
    dsm_weight: float = 1.0            # sony/ctm: denoising_weight, multiplied by the adaptive balance
    P_mean: float = -1.2               # sony/ctm: lognormal half of the DSM σ sampler (EDM Table 1)
    P_std: float = 1.2                 # sony/ctm (EDM Table 1)
    diffusion_mult: float = 0.7        # sony/ctm: Karras-ramp half, r ∈ [0, 0.7]
    gamma: float = 0.0                 # γ-sampling: γ = 0, deterministic long jumps, is the paper's default


# ---- the jumper: G_θ and g_θ ----------------------------------------------------------------------------------

def per_example(v, x):
    """A noise level (a float or a [B] tensor) as a float64 [B] tensor on x's device: coefficient maths runs in
    float64 and is cast to x's dtype only by `bcast`, at the end. A float is filled in on the device, not copied
    from the host (which would wait for the device)."""
    if isinstance(v, torch.Tensor):
        return v.to(x.device, torch.float64).expand(x.shape[0])
    return torch.full((x.shape[0],), float(v), dtype=torch.float64, device=x.device)


def ctm_outer(t, s, sigma_data=SIGMA_DATA):
    """CTM's outer coefficients (β, α) of G_θ = β·x_t + α·NN_θ, float64 [B]: G_θ = (s/t)·x_t + (1 − s/t)·g_θ with
    g_θ = c_skip(t)·x_t + c_out(t)·NN_θ gives β = s/t + (1 − s/t)·c_skip(t), α = (1 − s/t)·c_out(t). At s = t
    they are exactly (1, 0), so G_θ(x, t, t) = x."""
    c_skip, c_out, _, _ = edm.precond(t, sigma_data)                   # EDM Table 1, of t only
    r = s / t
    return r + (1 - r) * c_skip, (1 - r) * c_out


def F(net, x, t, s, labels=None, sigma_data=SIGMA_DATA):
    """NN_θ(c_in(t)·x_t, c_noise(t), c_noise(s)): the raw network, preconditioned in t only; s enters only as the
    second noise label (sony/ctm: inner_parametrization='edm')."""
    t, s = per_example(t, x), per_example(s, x)
    _, _, c_in, c_noise = edm.precond(t, sigma_data)                   # EDM Table 1 of t, no ε-shift, no s
    return net(bcast(c_in, x) * x, c_noise.to(x.dtype), labels,
               noise_labels_s=(s.log() / 4).to(x.dtype)).to(x.dtype)  # c_noise(s) = ¼ ln s, EDM Table 1


def g(net, x, t, s, labels=None, sigma_data=SIGMA_DATA):
    """g_θ(x_t, t, s) = c_skip(t)·x_t + c_out(t)·NN_θ. At s = t it is the student's denoiser."""
    c_skip, c_out, _, _ = edm.precond(per_example(t, x), sigma_data)  # EDM Table 1
    return bcast(c_skip, x) * x + bcast(c_out, x) * F(net, x, t, s, labels, sigma_data)


def G(net, x, t, s, labels=None, sigma_data=SIGMA_DATA, outer=None):
    """G_θ(x_t, t, s) = β(t,s)·x_t + α(t,s)·NN_θ, the jump from t to s ≤ t. `outer(t, s) -> (β, α)` on float64 [B]
    tensors; None is CTM's `ctm_outer`, i.e. G_θ = (s/t)·x_t + (1 − s/t)·g_θ."""
    t, s = per_example(t, x), per_example(s, x)
    beta, alpha = ctm_outer(t, s, sigma_data) if outer is None else outer(t, s)
    return bcast(beta, x) * x + bcast(alpha, x) * F(net, x, t, s, labels, sigma_data)


def frozen(net):
    """`net` with its parameters detached: they get no gradient, but the gradient still flows through the input
    (the estimate's outer jump; wrapping that call in no_grad would cut the gradient path)."""
    params = {name: p.detach() for name, p in net.named_parameters()}
    return lambda *args, **kwargs: torch.func.functional_call(net, params, args, kwargs)


# ---- (t, u, s) and the teacher's solver ------------------------------------------------------------------------

def sample_indices(N, K_max, B, generator=None, device=None):
    """Grid indices of (t, u, s) = (σ_n, σ_{n+k}, σ_m) on the descending Karras grid of N points: one k per
    iteration with P(k) ∝ k on {1, …, K_max}; per example n ~ U{0, …, N−1−k} and m ~ U{n+k, …, N−1}, so
    σ_min ≤ s ≤ u < t (s = u allowed). The paper's L_CTM is an expectation over continuous t, s, u; this follows
    sony/ctm's default discrete grid (`heun_step_strategy='weighted'`, `sample_s_strategy='uniform'`)."""
    if not 1 <= K_max <= N - 1:
        raise ValueError(f"need 1 <= K_max <= N-1, got K_max={K_max}, N={N}")
    w = torch.arange(1, K_max + 1, dtype=torch.float64, device=device)
    # k is the teacher's number of Heun steps, a Python loop count: reading it back from the device is the one
    # host sync a CTM step needs.
    k = int(torch.multinomial(w / w.sum(), 1, generator=generator)) + 1               # P(k) ∝ k
    n = torch.randint(0, N - k, (B,), generator=generator, device=device)             # index of t
    r = torch.rand(B, dtype=torch.float64, generator=generator, device=device)
    m = n + k + (r * (N - n - k)).floor().long()                                      # index of s, uniform
    return n, k, m


@torch.no_grad()
def teacher_solver(teacher, x, grid, n, k, labels=None):
    """Solver_φ(x_t, t → u): k teacher Heun steps along the grid, index n → n + k per example. 2k NFE."""
    for j in range(k):
        x = edm.heun_step(teacher, x, grid[n + j], grid[n + j + 1], labels)  # EDM Alg. 1 l. 4–8; u ≥ σ_min > 0
    return x


# ---- losses: soft consistency matching and DSM -------------------------------------------------------------------

def ctm_distance(cfg, net, net_ema, teacher, x_t, n, k, m, labels=None, outer=None, distance=edm.squared_l2):
    """d(x_est, x_target) per example for given grid indices (soft consistency matching). Only the estimate's inner
    call G_θ(x_t,t,s) trains θ; the estimate's outer call is θ⁻ frozen but differentiable in its input; the rest is
    no_grad (docs/ctm_choices.md)."""
    grid = sigma_grid(cfg.N, cfg.sigma_min, cfg.sigma_max, cfg.rho, device=x_t.device)  # float64, [0] = σ_max
    t, u, s = grid[n], grid[n + k], grid[m]
    jump = lambda net_, x_, t_, s_: G(net_, x_, t_, s_, labels, cfg.sigma_data, outer)
    with torch.no_grad():
        x_u = teacher_solver(teacher, x_t, grid, n, k, labels)                        # Solver_φ(x_t, t → u)
        # The paper writes G_sg(θ), sg(θ) the EMA θ⁻, for this inner jump u → s; sony/ctm's default
        # (ctm_target_inner_type='model_sg') uses the online θ under no_grad. We follow the code.
        y_target = jump(net, x_u, u, s)
        x_target = jump(net_ema, y_target, s, cfg.sigma_min)                          # θ⁻, jump to σ_min
    y_est = jump(net, x_t, t, s)                                                      # online θ: the gradient path
    x_est = jump(frozen(net_ema), y_est, s, cfg.sigma_min)                            # θ⁻ frozen, grad via input
    return distance(x_est, x_target)                                                  # d, weight ≡ 1


def dsm_sigma(cfg, B, generator=None, device=None):
    """sony/ctm's `halflognormal` σ sampler for the DSM term: the first B//2 with ln σ ~ N(P_mean, P_std²), the rest
    uniform in the Karras-ρ coordinate r ∈ [0, diffusion_mult], i.e. σ ∈ [0.318, 80] at the defaults."""
    h = B // 2
    z = torch.randn(h, dtype=torch.float64, generator=generator, device=device)
    r = cfg.diffusion_mult * torch.rand(B - h, dtype=torch.float64, generator=generator, device=device)
    a, b = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    return torch.cat([(cfg.P_mean + cfg.P_std * z).exp(), (a + r * (b - a)) ** cfg.rho])  # EDM Table 1; Eq. 5


def dsm_loss(cfg, net, x, labels=None, generator=None):
    """L_DSM per example: w(σ)·mean_pixels(g_θ(x_0 + σz, σ, σ) − x_0)², w(σ) = (σ² + σ_d²)/(σσ_d)² (EDM's λ)."""
    sigma = dsm_sigma(cfg, x.shape[0], generator, x.device)                            # float64 [B]
    z = torch.randn(x.shape, dtype=x.dtype, generator=generator, device=x.device)
    D_x = g(net, x + bcast(sigma, x) * z, sigma, sigma, labels, cfg.sigma_data)        # s = t = σ: the denoiser
    w = ((sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2).to(x.dtype)  # EDM Table 1: λ(σ)
    return w * (D_x - x).square().flatten(1).mean(1)


def adaptive_weight(L_ctm, L_dsm, last_layer, grad_scale=1.0):
    """‖∇_{θ_L} L_CTM‖ / (‖∇_{θ_L} L_DSM‖ + 1e-4), clamped to [0, 1e4] and detached (VQGAN-style, as in CTM).

    Under fp16 autocast the gradients of the unscaled losses underflow in the half-precision backward pass, as
    the training step's own gradients would without a GradScaler. So both losses are multiplied by the scaler's
    current `grad_scale` S before differentiating, and the 1e-4 by S too: ‖S∇L_CTM‖ / (‖S∇L_DSM‖ + S·1e-4) is the
    same ratio, computed where fp16 can represent it."""
    grad_ctm, = torch.autograd.grad(L_ctm * grad_scale, last_layer, retain_graph=True)
    grad_dsm, = torch.autograd.grad(L_dsm * grad_scale, last_layer, retain_graph=True)
    return (grad_ctm.norm() / (grad_dsm.norm() + 1e-4 * grad_scale)).clamp(0, 1e4).detach()


def loss(cfg, net, net_ema, teacher, x, labels=None, generator=None, outer=None, distance=edm.squared_l2,
         last_layer=None, grad_scale=1.0):
    """CTM training loss per example [B], without the GAN term: soft consistency matching L_CTM plus, if
    `cfg.use_dsm`, λ_DSM·L_DSM. `last_layer` is θ_L, the weight of `net`'s last layer (for networks/mlp.py,
    `net.out[-1].weight`); the adaptive balance differentiates both batch means with respect to it, so it is
    required when DSM is on. `grad_scale` is the loss scale of fp16 training (GradScaler.get_scale()), 1 otherwise.
    `generator` drives every random draw: k, the indices, z, then DSM's σ and noise."""
    if cfg.use_dsm and last_layer is None:
        raise ValueError("ctm.loss with cfg.use_dsm=True needs last_layer (the weight of net's last layer)")
    n, k, m = sample_indices(cfg.N, cfg.K_max, x.shape[0], generator, x.device)
    t = sigma_grid(cfg.N, cfg.sigma_min, cfg.sigma_max, cfg.rho, device=x.device)[n]
    x_t = x + bcast(t, x) * torch.randn(x.shape, dtype=x.dtype, generator=generator, device=x.device)  # x_0 + t·z
    L_ctm = ctm_distance(cfg, net, net_ema, teacher, x_t, n, k, m, labels, outer, distance)
    if not cfg.use_dsm:
        return L_ctm
    L_dsm = dsm_loss(cfg, net, x, labels, generator)
    lambda_dsm = cfg.dsm_weight * adaptive_weight(L_ctm.mean(), L_dsm.mean(), last_layer, grad_scale)
    return L_ctm + lambda_dsm * L_dsm                                                  # L, λ_GAN = 0


# ---- γ-sampling ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(cfg, net, noise, labels=None, nfe=1, generator=None, path=None, outer=None):
    """CTM's γ-sampler (sony/ctm: `sample_gamma_multistep`) with γ = `cfg.gamma` on a Karras grid of nfe + 1 levels
    from σ_max to σ_min; one jump (one network call) per NFE. γ = 0: deterministic long jumps along the PF-ODE;
    γ = 1: CM's multistep sampler (Song et al., arXiv:2303.01469v2, Alg. 1); in between: stochastic. `noise` is
    unit-variance. Unlike the image code, outputs are not clipped to [-1, 1]."""
    t_steps = sigma_grid(nfe + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()    # t_0 = T > … > t_nfe = σ_min
    x = noise * cfg.sigma_max                                                          # x ~ N(0, T²I)
    if path is not None:
        path.append(x)
    for n in range(nfe):
        # The paper's t̃ = sqrt(1−γ²)·t_{n+1}; we follow the code's σ_min shift, so γ = 1 jumps to σ_min, as CM does.
        t_tilde = math.sqrt(1 - cfg.gamma**2) * (t_steps[n + 1] - cfg.sigma_min) + cfg.sigma_min
        x = G(net, x, t_steps[n], t_tilde, labels, cfg.sigma_data, outer)             # jump t_n → t̃
        if n < nfe - 1:                                                                # no noise after the last jump
            z = edm.randn_like(x, generator)
            # renoise t̃ → t_{n+1}: sqrt(t_{n+1}² − t̃²), factored so that it is exactly 0 at γ = 0
            std = math.sqrt((1 - math.sqrt(1 - cfg.gamma**2)) * (t_steps[n + 1] - cfg.sigma_min)
                            * (t_steps[n + 1] + t_tilde))
            x = x + std * z
        if path is not None:
            path.append(x)
    return x
