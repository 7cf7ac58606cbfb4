"""Metrics for 2D (or any flat) sample sets: a distance between distributions, and the teacher gap."""
import torch


def sliced_wasserstein(x, y, num_projections=256, seed=0):
    """Sliced Wasserstein-2 distance between sample sets x [N, d] and y [M, d].

    SW₂(p, q)² = E_θ W₂(θᵀp, θᵀq)² over random unit directions θ; each 1D W₂ is computed exactly from matched
    quantiles (sorted samples; the larger set is interpolated to the smaller one's quantile levels). The
    directions come from a private generator seeded with `seed`, so the value is repeatable."""
    x, y = x.flatten(1).to(torch.float64), y.flatten(1).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, dtype=torch.float64, generator=g)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)                 # [d, P] unit directions
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values        # [N, P], [M, P]
    n = min(len(px), len(py))
    q = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n          # quantile levels
    qx, qy = _quantiles(px, q), _quantiles(py, q)
    return (qx - qy).square().mean().sqrt().item()


def _quantiles(sorted_proj, q):
    """Linear interpolation of sorted samples [N, P] at quantile levels q [n] -> [n, P]."""
    N = sorted_proj.shape[0]
    pos = (q * N - 0.5).clamp(0, N - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=N - 1)
    frac = (pos - lo)[:, None]
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


def teacher_gap(x_gen, x_teacher):
    """Mean squared distance per dimension, E‖x_gen − x_teacher‖²/d, between a generator's outputs and the exact
    teacher ODE solutions started from the same noise (0 for a perfect distillation)."""
    return (x_gen.to(torch.float64) - x_teacher.to(torch.float64)).square().mean().item()
