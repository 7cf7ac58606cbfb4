"""The property table of Analytic-Precond's readings (docs/analytic_precond.md §2) on exact teachers.

For each reading of `algorithms.analytic_precond.READINGS` and CTM's own coefficients: the boundary G(x,t,t) = x
and the reduction to CTM at ℓ = κ = 0 (largest deviation over random pairs), exactness on Gaussian data of the
teacher-initialised and of the optimal student (largest relative error), the single-jump distance to CTM's
coefficients (the paper's Fig. 2), boundedness for all t > s (`check_bounded`), and, for intermediate jumps, the
consistency gap of the optimal student and the jump error of the teacher-initialised one, relative to CTM's, on
ring8 (narrow modes), the spiral (a point set) and the 8x8 digits (64 dimensions). Prints a markdown table and
writes the numbers as JSON.

    python -m benchmarks.analytic_precond_report                # full statistics budget (121 × 4096; ~5 min)
    python -m benchmarks.analytic_precond_report --quick        # seconds
"""
import argparse
import json
import os
import time

import torch

from algorithms import analytic_precond as ap
from algorithms import ctm, edm
from data import images, toy

f64 = torch.float64
SD = edm.SIGMA_DATA
FULL = dict(intervals=120, samples=4096, digits_samples=1024, eval=512)
QUICK = dict(intervals=20, samples=128, digits_samples=32, eval=32)
COEFFS = {"ctm": None, **{r.__name__: r for r in ap.READINGS}}


def coeffs_of(name, stats):
    return ctm.ctm_outer if COEFFS[name] is None else (lambda t, s: COEFFS[name](stats, t, s))


def statistics(data, s):
    """An exact teacher (toy mixture, or the digits' empirical denoiser) and its statistics."""
    g = torch.Generator().manual_seed(0)
    if data == "digits":
        dataset = images.digits_dataset()
        teacher = images.EmpiricalTeacher(dataset)
        x0 = dataset.batch(torch.randperm(len(dataset), generator=g)[:s["digits_samples"]].numpy())[0].double()
        cfg = ap.Config(num_intervals=s["intervals"], num_samples=s["digits_samples"])
        return None, ap.compute_stats(cfg, teacher, x0, generator=g)
    ds = toy.DATASETS[data]()
    cfg = ap.Config(num_intervals=s["intervals"], num_samples=s["samples"])
    return ds, ap.compute_stats(cfg, ds.denoiser, ds.sample(s["samples"], g)[0], generator=g)


def identities(name):
    """Largest |β − 1|, |α| at t = s (random statistics) and largest deviation from CTM at ℓ = κ = 0."""
    g = torch.Generator().manual_seed(0)
    lam = ap.lambda_grid(ap.Config(num_intervals=40))
    wiggly = ap.Stats(lam, (1.7 * lam).sin().abs(), 2 * (0.9 * lam).cos())
    zero = ap.Stats(lam, torch.zeros_like(lam), torch.zeros_like(lam))
    a, b = (torch.rand(2, 1000, dtype=f64, generator=g) * (edm.SIGMA_MAX - edm.SIGMA_MIN) + edm.SIGMA_MIN)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    beta, alpha = coeffs_of(name, wiggly)(t, t)
    boundary = max(float((beta - 1).abs().max()), float(alpha.abs().max()))
    beta, alpha = coeffs_of(name, zero)(t, s)
    beta_ctm, alpha_ctm = (SD**2 + s * t) / (SD**2 + t**2), SD * (t - s) / (SD**2 + t**2).sqrt()   # CTM, written out
    return boundary, max(float((beta - beta_ctm).abs().max()), float((alpha - alpha_ctm).abs().max()))


def gaussian(name, s):
    """N(0, 0.3² I): relative error of the teacher-initialised (D_θ = D_φ(x_t, t)) and of the optimal-for-D
    (D_θ = D_φ(x_s, s)) jumper against the exact flow, largest over a few jumps."""
    std, dsg = 0.3, toy.gaussian(std=0.3, dim=3)
    stats = ap.compute_stats(ap.Config(num_intervals=60, num_samples=64), dsg.denoiser,
                             dsg.sample(64, torch.Generator().manual_seed(0))[0])
    t = torch.tensor([80.0, 10.0, 3.3, 1.0, 0.5, 0.2, 0.05], dtype=f64)
    u = torch.tensor([0.002, 0.7, 0.003, 0.9, 0.011, 0.1, 0.002], dtype=f64)
    x_t = torch.randn(7, 3, dtype=f64, generator=torch.Generator().manual_seed(2)) * t[:, None]
    x_s = ((u**2 + std**2) / (t**2 + std**2)).sqrt()[:, None] * x_t
    c_skip, c_out, _, _ = edm.precond(t, SD)
    beta, alpha = (c[:, None] for c in coeffs_of(name, stats)(t, u))
    err = lambda D: float(((beta * x_t + alpha * (D - c_skip[:, None] * x_t) / c_out[:, None] - x_s).abs()
                           / x_s.abs()).max())
    return err(std**2 / (std**2 + t[:, None] ** 2) * x_t), err(std**2 / (std**2 + u[:, None] ** 2) * x_s)


def one_step(name, stats):
    """max |α − α_CTM| / max α_CTM and max |β − β_CTM| for s = ε on the 18-level grid; α(T, ε)/α_CTM(T, ε)."""
    t = edm.sigma_grid(18)[:-1]
    s = torch.full_like(t, edm.SIGMA_MIN)
    beta, alpha = coeffs_of(name, stats)(t, s)
    beta_ctm, alpha_ctm = ctm.ctm_outer(t, s)
    return (float((alpha - alpha_ctm).abs().max() / alpha_ctm.max()), float((beta - beta_ctm).abs().max()),
            float(alpha[0] / alpha_ctm[0]))


def intermediate(ds, stats, n):
    """Summed over the intermediate jumps of a 9-level grid: consistency gap E‖D* − D_φ(x_t, t)‖²/d of the optimal
    student and jump error E‖G − x_s‖²/d of the teacher-initialised one, for CTM and every reading."""
    g = torch.Generator().manual_seed(3)
    x0 = ds.sample(n, g)[0]
    grid = edm.sigma_grid(9).tolist()
    gap, err = dict.fromkeys(COEFFS, 0.0), dict.fromkeys(COEFFS, 0.0)
    for i, t in enumerate(grid):
        x_t = x0 + t * torch.randn(x0.shape, dtype=f64, generator=g)
        D_t = ds.denoiser(x_t, t)
        c_skip, c_out, _, _ = edm.precond(torch.tensor(t, dtype=f64), SD)
        F_phi = (D_t - c_skip * x_t) / c_out
        x_s, u = x_t, t
        for s in grid[i + 1:-1]:
            x_s, u = ds.ode(x_s, u, s), s
            for k in COEFFS:
                beta, alpha = coeffs_of(k, stats)(torch.tensor([t], dtype=f64), torch.tensor([s], dtype=f64))
                gap[k] += float((c_skip * x_t + c_out * (x_s - beta * x_t) / alpha - D_t).square().mean())
                err[k] += float((beta * x_t + alpha * F_phi - x_s).square().mean())
    return {k: gap[k] / gap["ctm"] for k in COEFFS}, {k: err[k] / err["ctm"] for k in COEFFS}


def main(quick=False, out="docs/results/analytic_precond_report"):
    torch.set_num_threads(1)
    s = QUICK if quick else FULL
    t0 = time.time()
    table = {k: dict(zip(("boundary", "ctm_reduction"), identities(k))) for k in COEFFS}
    for k in COEFFS:
        table[k]["gaussian_teacher_init"], table[k]["gaussian_optimal"] = gaussian(k, s)
    stat_times = {}
    for data in ("ring8", "spiral", "digits"):
        t1 = time.time()
        ds, stats = statistics(data, s)
        stat_times[data] = time.time() - t1
        for k in COEFFS:
            table[k][f"one_step_{data}"] = one_step(k, stats)
            table[k][f"bounded_{data}"] = (True if COEFFS[k] is None else
                                           ap.check_bounded(stats, reading=COEFFS[k]) is None)
        if ds is not None:
            gap, err = intermediate(ds, stats, s["eval"])
            for k in COEFFS:
                table[k][f"gap_ratio_{data}"], table[k][f"init_err_ratio_{data}"] = gap[k], err[k]
        print(f"{data}: statistics {stat_times[data]:.1f}s", flush=True)
    print_table(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "analytic_precond_report.json"), "w") as f:
        json.dump(dict(settings=s, table=table, stat_time_s=stat_times, wall_time_s=time.time() - t0), f, indent=1)
    return table


def print_table(table):
    ok = lambda b: "yes" if b else "**no**"
    print("\n| reading | G(x,t,t) = x | CTM at ℓ = κ = 0 | Gaussian: teacher-init / optimal exact | one step vs CTM: "
          "ring8 / spiral / digits (Δα, Δβ) | bounded: ring8 / spiral / digits | consistency gap vs CTM: ring8 / "
          "spiral | teacher-init jump error vs CTM: ring8 / spiral |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in table.items():
        steps = " / ".join(f"{r[f'one_step_{d}'][0]:.3g}, {r[f'one_step_{d}'][1]:.3g}" for d in ("ring8", "spiral",
                                                                                                  "digits"))
        print(f"| {k} | {r['boundary']:.0e} | {r['ctm_reduction']:.0e} | {r['gaussian_teacher_init']:.1e} / "
              f"{r['gaussian_optimal']:.1e} | {steps} | " +
              " / ".join(ok(r[f"bounded_{d}"]) for d in ("ring8", "spiral", "digits")) +
              f" | {r['gap_ratio_ring8']:.3g} / {r['gap_ratio_spiral']:.3g} | "
              f"{r['init_err_ratio_ring8']:.3g} / {r['init_err_ratio_spiral']:.3g} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="docs/results/analytic_precond_report")
    a = p.parse_args()
    main(a.quick, a.out)
