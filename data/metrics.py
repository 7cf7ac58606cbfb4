"""Metrics for flat sample sets, each with its uncertainty. The one entry point for a generator's record is `report`.

A generator (a student at some NFE) and the exact teacher ODE are run from the same noise z_1..z_n, giving x_i and
x_ode_i. Three kinds of number describe the result (the derivations are in docs/metrics.md):

    paired teacher gap   g_i = ‖x_i − x_ode_i‖²/d: mean ± standard error, median, and the fraction of samples that
                         end in another mode than the ODE's (`assign`), which is what makes the mean heavy-tailed
    energy distance      E(P, Q) = 2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ ≥ 0, zero iff P = Q (Székely & Rizzo), as the
                         unbiased U-statistic, so its expectation is exactly 0 when P = Q: it has no floor; with a
                         permutation test's p-value and the permutation null's standard deviation as its scale
    distance to data     sliced Wasserstein-2 and energy distance to held-out data, only with ≥ 16384 samples
                         and always beside the same distance between two independent data sets (the floor)

The energy distance is computed through 1D projections: for unit θ uniform on the sphere, E_θ|θᵀz| = ‖z‖/c_d with
c_d = √π Γ((d+1)/2)/Γ(d/2), so E = c_d E_θ E(θᵀP, θᵀQ), and each 1D U-statistic costs one sort of the pooled set.
The permutation test re-labels the pooled set, which leaves every projection's sort unchanged: it costs one
cumulative sum per permutation and projection. The directions are fixed (evenly spaced in 2D, seeded otherwise), so
the statistic is a fixed function of the two sets and the test is exact for it.
"""
import math

import torch

MIN_DATA_SAMPLES = 16384  # below this, distances to data are set by the sampling noise of the data (docs/metrics.md)


def sliced_wasserstein(x, y, num_projections=256, seed=0):
    """Sliced Wasserstein-2 distance between sample sets x [N, d] and y [M, d].

    SW₂(p, q)² = E_θ W₂(θᵀp, θᵀq)² over random unit directions θ; each 1D W₂ is computed exactly from matched
    quantiles (sorted samples; the larger set is interpolated to the smaller one's quantile levels). The
    directions come from a private generator seeded with `seed`, so the value is repeatable."""
    x, y = x.flatten(1).to(torch.float64), y.flatten(1).to(torch.float64)
    theta = _directions(x.shape[1], num_projections, seed).to(x.device)           # [d, P] unit directions
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values        # [N, P], [M, P]
    n = min(len(px), len(py))
    q = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n          # quantile levels
    qx, qy = _quantiles(px, q), _quantiles(py, q)
    return (qx - qy).square().mean().sqrt().item()


def _directions(d, num, seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, num, dtype=torch.float64, generator=g)
    return theta / theta.norm(dim=0, keepdim=True)


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


def paired_gap(x, x_ref, assign=None):
    """The teacher gap per sample, g_i = ‖x_i − x_ref_i‖²/d for pairs from the same noise, summarised.

    Returns gap_mean, gap_se (the standard error std(g)/√n), gap_median, and, if `assign` (x [n, d] -> cluster
    index [n]) is given, mode_switch_fraction (the fraction with assign(x_i) ≠ assign(x_ref_i)), its binomial
    standard error, and gap_mean_same_mode (the mean gap over the other samples); else those three are None."""
    if x.shape != x_ref.shape or len(x) < 2:
        raise ValueError(f"paired_gap needs two equal-shaped sets of >= 2 samples, got {tuple(x.shape)} and "
                         f"{tuple(x_ref.shape)}")
    g = (x.to(torch.float64) - x_ref.to(torch.float64)).flatten(1).square().mean(1)  # [n]
    n = len(g)
    out = dict(gap_mean=g.mean().item(), gap_se=(g.std() / math.sqrt(n)).item(), gap_median=g.median().item(),
               mode_switch_fraction=None, mode_switch_se=None, gap_mean_same_mode=None)
    if assign is not None:
        switched = torch.as_tensor(assign(x)).cpu() != torch.as_tensor(assign(x_ref)).cpu()  # [n] bool
        p = switched.double().mean().item()
        same = g[~switched.to(g.device)]
        out.update(mode_switch_fraction=p, mode_switch_se=math.sqrt(p * (1 - p) / n),
                   gap_mean_same_mode=same.mean().item() if len(same) else None)
    return out


def energy_test(x, y, num_permutations=200, num_projections=16, seed=0):
    """The energy distance between independent samples x [n, d] and y [m, d] (unbiased U-statistic; module
    docstring) and a permutation test of P = Q.

    Returns energy (the statistic), energy_null_sd (its standard deviation over random re-labellings of the pooled
    set: the size of differences the test cannot see) and energy_p = (1 + #{permuted ≥ observed})/(1 + P), which
    is uniform on {1/(P+1), …, 1} when P = Q (exact: the pooled samples are exchangeable). With P = 0 only the
    statistic is computed (the other two are None)."""
    x, y = x.flatten(1).to(torch.float64).cpu(), y.flatten(1).to(torch.float64).cpu()
    n, m, d = len(x), len(y), x.shape[1]
    if n < 2 or m < 2 or y.shape[1] != d:
        raise ValueError(f"energy_test needs two sets of >= 2 samples of one dimension, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    N = n + m
    g = torch.Generator().manual_seed(seed + 1)
    # Column 0: the observed labelling (the first n pooled samples are x); then random subsets of size n.
    is_x = torch.zeros(N, 1 + num_permutations, dtype=torch.float64)
    is_x[:n, 0] = 1
    is_x[:, 1:] = (torch.rand(N, num_permutations, generator=g, dtype=torch.float64).argsort(0).argsort(0) < n).double()
    c_d = math.exp(0.5 * math.log(math.pi) + math.lgamma((d + 1) / 2) - math.lgamma(d / 2))  # ‖z‖ = c_d E_θ|θᵀz|
    if d == 2:  # evenly spaced angles on the half circle: a midpoint rule for E_θ, far more accurate than random θ
        a = (torch.arange(num_projections, dtype=torch.float64) + 0.5) * (math.pi / num_projections)
        theta = torch.stack([a.cos(), a.sin()])                                     # [2, K]
    else:
        theta = _directions(d, num_projections, seed) if d > 1 else torch.ones(1, 1, dtype=torch.float64)
    proj = torch.cat([x, y]) @ theta                                                # [N, K]
    k = torch.arange(1, N + 1, dtype=torch.float64)                                 # [N] pooled ranks
    stats = torch.zeros(1 + num_permutations, dtype=torch.float64)
    for j in range(theta.shape[1]):
        v, order = proj[:, j].sort()                                                # [N] sorted projections
        lx = is_x[order]                                                            # [N, 1+P] labels in that order
        rx = lx.cumsum(0)                                                           # rank among x (at x entries)
        # Σ_{i<i'} |v_i − v_i'| over sorted values is Σ_k (2k − N − 1) v_k. Within x the ranks among x replace k:
        # S_x = Σ lx(2rx − n − 1)v; within y the ranks k − rx: S_y = Σ (1 − lx)(2(k − rx) − m − 1)v, expanded
        # below into products of v with lx, rx and lx·rx, so that each costs one matrix-vector product.
        v_lxrx, v_lx, v_rx = v @ (lx * rx), v @ lx, v @ rx                          # [1+P] each
        W = ((2 * k - N - 1) * v).sum()
        S_x = 2 * v_lxrx - (n + 1) * v_lx
        S_y = ((2 * k - m - 1) * v).sum() - ((2 * k - m - 1) * v) @ lx - 2 * v_rx + 2 * v_lxrx
        cross = W - S_x - S_y                                                       # Σ_{i,j} |x_i − y_j|
        stats += 2 * cross / (n * m) - 2 * S_x / (n * (n - 1)) - 2 * S_y / (m * (m - 1))
    stats *= c_d / theta.shape[1]
    obs, null = stats[0].item(), stats[1:]
    if num_permutations == 0:
        return dict(energy=obs, energy_null_sd=None, energy_p=None)
    return dict(energy=obs, energy_null_sd=null.std().item() if num_permutations > 1 else None,
                energy_p=(1 + (null >= obs).sum().item()) / (1 + num_permutations))


def report(x, x_ode, assign=None, x_data=None, x_data_fresh=None, num_permutations=200, seed=0):
    """Every metric of one generator's samples x [n, d] against the exact ODE's x_ode [n, d] from the same noise:
    a JSON-safe dict of floats (None where not computed).

    - gap_*, mode_switch_*: `paired_gap(x, x_ode, assign)` over all n pairs.
    - energy_to_ode, energy_to_ode_null_sd, energy_to_ode_p: `energy_test` of x[:n//2] against x_ode[n//2:]. The
      two halves start from disjoint noise, so they are independent and the permutation test is exact; on pairs
      from the same noise it would not be.
    - sw2_to_data, energy_to_data and the floors sw2_data_floor, energy_data_floor: only when
      x_data (held-out data, ≥ 16384 samples) is given, with x_data_fresh (len(x) more data samples, independent of
      both): the floors are the same distances from x_data_fresh to x_data, i.e. what a perfect generator scores.
    Bad input raises ValueError before anything is computed."""
    n = len(x)
    if x.shape != x_ode.shape or n < 4:
        raise ValueError(f"report needs x and x_ode of one shape with >= 4 samples, got {tuple(x.shape)} and "
                         f"{tuple(x_ode.shape)}")
    if (x_data is None) != (x_data_fresh is None):
        raise ValueError("distances to data need both x_data and x_data_fresh (the floor), or neither")
    if x_data is not None:
        if n < MIN_DATA_SAMPLES or len(x_data) < MIN_DATA_SAMPLES:
            raise ValueError(f"distances to data need >= {MIN_DATA_SAMPLES} samples on each side (got {n} generated, "
                             f"{len(x_data)} data); below that they measure the sampling noise, not the generator")
        if x_data_fresh.shape != x.shape or x_data.shape[1:] != x.shape[1:]:
            raise ValueError(f"x_data_fresh must have the shape of x, {tuple(x.shape)}, and x_data its sample shape; "
                             f"got {tuple(x_data_fresh.shape)} and {tuple(x_data.shape)}")
    out = dict(n=n, **paired_gap(x, x_ode, assign))
    h = n // 2
    e = energy_test(x[:h], x_ode[h:2 * h], num_permutations, seed=seed)
    out.update(energy_to_ode=e["energy"], energy_to_ode_null_sd=e["energy_null_sd"], energy_to_ode_p=e["energy_p"])
    out.update(sw2_to_data=None, sw2_data_floor=None, energy_to_data=None, energy_data_floor=None)
    if x_data is not None:
        out.update(sw2_to_data=sliced_wasserstein(x, x_data), sw2_data_floor=sliced_wasserstein(x_data_fresh, x_data),
                   energy_to_data=energy_test(x, x_data, 0, seed=seed)["energy"],
                   energy_data_floor=energy_test(x_data_fresh, x_data, 0, seed=seed)["energy"])
    return out
