"""EDM, the teacher every student here distils from.

T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
NeurIPS 2022, arXiv:2206.00364v2. Equation/table numbers below refer to that version.

Variance-exploding process with σ(t) = t, s(t) = 1 (Table 1, "EDM" column):

    x_σ = x_0 + σ·z,                         z ~ N(0, I)
    D_θ(x; σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x; c_noise(σ))                        (Eq. 7)
    PF-ODE:  dx/dσ = (x − D(x; σ)) / σ                                                  (Eq. 1 with Eq. 3)
    loss:    E_{σ,y,n} [ λ(σ)·‖D_θ(y + n; σ) − y‖² ],  ln σ ~ N(P_mean, P_std²)          (Eq. 8, Table 1)

Every student reuses these pieces: the σ grid, the preconditioning, the Euler and Heun steps, the target-network
average and the distances d(a, b) of the consistency losses. None copies them.

| code        | paper            |
|-------------|------------------|
| `sigma`     | σ (= t)          |
| `D`         | D_θ(x; σ)        |
| `net`       | F_θ (the raw network, see `networks/`) |
| `c_skip`, `c_out`, `c_in`, `c_noise` | Table 1, "Network and preconditioning" |
| `P_mean`, `P_std` | Table 1, "Training" |
| `t_cur`, `t_next`, `d_cur`, `d_prime` | Alg. 1 |

Shapes: per-example noise levels are `[B]` tensors; `bcast` reshapes them to `[B, 1, ..., 1]` for use against x.
"""
from dataclasses import dataclass

import torch
from torch import nn

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0  # Table 1 (and Sec. 5: σ_data = 0.5)


@dataclass(frozen=True)
class Config:
    sigma_data: float = SIGMA_DATA  # Table 1
    P_mean: float = -1.2            # Table 1, "Training": ln σ ~ N(P_mean, P_std²)
    P_std: float = 1.2              # Table 1
    num_steps: int = 18             # Sec. 5 / Table 2: CIFAR-10 uses N = 18 (35 NFE)
    sigma_min: float = SIGMA_MIN    # Table 1
    sigma_max: float = SIGMA_MAX    # Table 1
    rho: float = RHO                # Table 1, Eq. 5


def bcast(v, x):
    """Reshape a per-example `[B]` tensor (or a float) to `[B, 1, ..., 1]` in x's dtype so it broadcasts against `x`.
    A float is filled in on x's device rather than copied from the host, which would wait for the device."""
    if isinstance(v, torch.Tensor):
        v = v.to(x.device, x.dtype)
    else:
        v = torch.full((), v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def sigma_grid(N, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, dtype=torch.float64, device=None):
    """The Karras grid, Eq. 5, descending: index 0 is σ_max, index N−1 is σ_min. Float64 by default. Built on
    `device` directly: a host-to-device copy inside a training step would wait for the device."""
    if N < 2:
        raise ValueError(f"sigma_grid needs N >= 2 points, got N={N}")
    i = torch.arange(N, dtype=torch.float64, device=device)
    # Eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ
    s = (sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # exact endpoints: the power above is off by an ulp
    return s.to(dtype)


def precond(sigma, sigma_data=SIGMA_DATA):
    """The EDM preconditioning of Table 1 as functions of σ (any shape); returns c_skip, c_out, c_in, c_noise."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)              # Table 1, Eq. 7
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()   # Table 1
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()                     # Table 1
    c_noise = sigma.log() / 4                                        # Table 1: c_noise = ¼ ln σ
    return c_skip, c_out, c_in, c_noise


def denoise(net, x, sigma, labels=None, sigma_data=SIGMA_DATA):
    """D_θ(x; σ) = c_skip·x + c_out·F_θ(c_in·x; c_noise), Eq. 7. `sigma` is `[B]` (or a float)."""
    sigma = bcast(sigma, x)
    c_skip, c_out, c_in, c_noise = precond(sigma, sigma_data)
    F_x = net(c_in * x, c_noise.flatten(), labels)
    return c_skip * x + c_out * F_x.to(x.dtype)


class Denoiser(nn.Module):
    """D(x; σ, labels) around any network. The network sits in the attribute `model`, as in the published EDM
    checkpoints, so their `model.`-prefixed state_dict keys load without remapping. `fp16`: on CUDA the network
    runs under fp16 autocast, as the published `use_fp16` flag (ImageNet-64 ADM) asks; elsewhere it does nothing."""

    def __init__(self, model, sigma_data=SIGMA_DATA, fp16=False):
        super().__init__()
        self.model, self.sigma_data, self.fp16 = model, sigma_data, fp16

    def forward(self, x, sigma, labels=None):
        with torch.autocast("cuda", torch.float16, enabled=self.fp16 and x.is_cuda):
            return denoise(self.model, x, sigma, labels, self.sigma_data).to(x.dtype)


def loss(cfg, net, x, labels=None, generator=None):
    """EDM training loss, Eq. 8 with Table 1's p_train and λ; returns the per-example loss `[B]`.

    As in EDM's training loop the squared error is *summed* over the non-batch dimensions (not averaged).
    With Adam this is only a rescaling of the gradient."""
    rnd = torch.randn(x.shape[0], device=x.device, dtype=x.dtype, generator=generator)
    sigma = (rnd * cfg.P_std + cfg.P_mean).exp()                              # Table 1: ln σ ~ N(P_mean, P_std²)
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2  # Table 1: λ(σ) = 1/c_out(σ)²
    n = bcast(sigma, x) * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    D_yn = denoise(net, x + n, sigma, labels, cfg.sigma_data)
    return weight * (D_yn - x).square().flatten(1).sum(1)                  # Eq. 8, summed over pixels


def euler_step(D, x, t_cur, t_next, labels=None):
    """One Euler step of the PF-ODE dx/dσ = (x − D)/σ from σ = t_cur to t_next (Alg. 1 l. 4–5). 1 NFE."""
    t_cur, t_next = bcast(t_cur, x), bcast(t_next, x)
    d_cur = (x - D(x, t_cur.flatten(), labels)) / t_cur                     # Alg. 1 l. 4
    return x + (t_next - t_cur) * d_cur                                    # Alg. 1 l. 5


def heun_step(D, x, t_cur, t_next, labels=None):
    """One Heun step (Alg. 1 l. 4–8): Euler predictor, then the trapezoid correction. 2 NFE. Needs t_next > 0;
    the step to σ = 0 is an Euler step (Alg. 1 l. 6), see `sample`."""
    t_cur, t_next = bcast(t_cur, x), bcast(t_next, x)
    d_cur = (x - D(x, t_cur.flatten(), labels)) / t_cur                     # Alg. 1 l. 4
    x_next = x + (t_next - t_cur) * d_cur                                  # Alg. 1 l. 5
    d_prime = (x_next - D(x_next, t_next.flatten(), labels)) / t_next      # Alg. 1 l. 7
    return x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)            # Alg. 1 l. 8


# ---- distances d(a, b) of the consistency losses (CM Sec. 4; iCT) ---------------------------------------------------
# Per example [B]. The students take one of these as an argument (`distance=`); none is looked up by name.

def squared_l2(a, b):
    """CM's "l2" (Song et al., arXiv:2303.01469v2, Sec. 4): the mean over the non-batch dimensions of (a − b)²,
    a mean, not a sum, as in CM's code."""
    return (a - b).square().flatten(1).mean(1)


def l2(a, b):
    """The Euclidean distance ‖a − b‖₂ (not squared)."""
    return (a - b).flatten(1).norm(dim=1)


def pseudo_huber(a, b, c=None):
    """iCT's pseudo-Huber sqrt(‖a − b‖² + c²) − c (Song & Dhariwal, arXiv:2310.14189), by default with iCT's
    c = 0.00054·sqrt(d), d the dimension of one example: ≈ ‖a − b‖²/(2c) near 0 and ≈ ‖a − b‖ far away, so
    outliers weigh less than under squared l2."""
    c = 0.00054 * a[0].numel() ** 0.5 if c is None else c
    return ((a - b).flatten(1).square().sum(1) + c**2).sqrt() - c


def randn_like(x, generator=None):
    """N(0, I) shaped like x. `generator` is a torch.Generator, or a list of them, one per example (one random stream
    per seed, as EDM's generate.py draws): then row i depends on its own seed only, not on the batch around it."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], dtype=x.dtype, device=g.device, generator=g)
                            for g in generator]).to(x.device)
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def ema_beta(batch, halflife, seen=None, rampup=None):
    """EDM's EMA decay per optimizer step, β = 0.5^(batch / H) for a half-life of H training samples (EDM's training
    configuration: H = 0.5 Mimg on CIFAR-10). With `rampup`, the half-life is min(H, rampup·seen) after `seen`
    samples (EDM's public training code uses 0.05), so that the average soon forgets the random start."""
    if rampup is not None and seen is not None:
        halflife = min(halflife, rampup * seen)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def ema_update_(avg, net, rate):
    """avg ← rate·avg + (1 − rate)·net over every parameter, in place: EDM's evaluation EMA with rate β, and the
    consistency models' target network θ⁻ ← stopgrad(μ·θ⁻ + (1 − μ)·θ) with rate μ (Song et al. Alg. 2). One
    fused `_foreach_lerp_` instead of a Python loop over parameters."""
    targets, sources = list(avg.parameters()), list(net.parameters())
    if len(targets) != len(sources):
        raise ValueError(f"EMA over {len(targets)} parameters from a network with {len(sources)}")
    torch._foreach_lerp_(targets, sources, 1.0 - rate)


@torch.no_grad()
def sample(cfg, D, noise, labels=None, num_steps=None):
    """Deterministic Heun sampler, Alg. 1 with σ(t) = t, s(t) = 1: `num_steps` Karras levels plus σ_N = 0, so
    NFE = 2·num_steps − 1 (35 for the default 18). `noise` is unit-variance; it is scaled by σ_max here."""
    num_steps = num_steps or cfg.num_steps
    t_steps = sigma_grid(num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho, device=noise.device)  # Alg. 1 l. 1
    # The ODE state stays in float64, as in EDM's sampler; the denoiser runs in the dtype of `noise`.
    D64 = lambda x_, sigma, labels_: D(x_.to(noise.dtype), sigma.to(noise.dtype), labels_).to(torch.float64)
    x = noise.to(torch.float64) * t_steps[0]                               # Alg. 1 l. 2: x_0 ~ N(0, σ_max² I)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):                   # Alg. 1 l. 3, while t_{i+1} > 0
        x = heun_step(D64, x, t_cur, t_next, labels)                      # Alg. 1 l. 4–8
    return euler_step(D64, x, t_steps[-1], 0.0, labels).to(noise.dtype)   # Alg. 1 l. 4–6: t_N = 0, no correction
