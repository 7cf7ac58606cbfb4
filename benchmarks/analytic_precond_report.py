"""Analytic-Precond coefficients on a toy teacher, against CM's and CTM's (cf. the paper's Fig. 2).

Computes ℓ_t, κ_t for the exact denoiser of a data.toy dataset, then prints and plots β (on x_t) and α (on the
network output) for single jumps s = ε and for intermediate jumps t -> s on the N = 18 Karras grid, together with
the teacher-initialised jumper G = f·x_t + g·(D_φ − ℓ·x_t) against the reference ODE: its consistency gap
E‖D* − D_φ‖²/d (analytic_precond.md §3.4, in denoiser units, i.e. divided by g²) and its jump error E‖G − x_s‖²/d.

    python -m benchmarks.analytic_precond_report --dataset ring8 --out runs/analytic_precond.png
"""
import argparse
import dataclasses
import os

import matplotlib
import torch

from algorithms import analytic_precond as ap, cd, edm
from data import toy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ring8", choices=sorted(toy.DATASETS))
    p.add_argument("--intervals", type=int, default=120)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--stats", default=None, help="load/save the statistics here")
    p.add_argument("--out", default="runs/analytic_precond.png")
    a = p.parse_args()
    ds = toy.DATASETS[a.dataset]()
    g = torch.Generator().manual_seed(0)
    if a.stats and os.path.exists(a.stats):
        stats = ap.load(a.stats, teacher=ds.denoiser)
    else:
        x0, _ = ds.sample(a.samples, g)
        stats = ap.compute_stats(ap.Config(num_intervals=a.intervals, num_samples=a.samples), ds.denoiser, x0,
                                 generator=g)
        if a.stats:
            ap.save(stats, a.stats)
    fwd = dataclasses.replace(stats, backward_anchor=False)
    sd, eps = stats.sigma_data, edm.SIGMA_MIN

    t_lam = (-stats.lam).exp()
    print(f"{a.dataset}: statistics on {len(t_lam)} λ-grid times")
    print("      t       ℓ_t       κ_t")
    for j in range(0, len(t_lam), max(1, len(t_lam) // 12)):
        print(f"{t_lam[j]:9.4g} {stats.ell[j]:9.4f} {stats.kappa[j]:9.3f}")

    t = edm.sigma_grid(18)
    s = torch.full_like(t, eps)
    cm_b, cm_a = cd.cm_scalings(cd.Config(), t)
    ctm_b, ctm_a = (sd**2 + s * t) / (sd**2 + t**2), sd * (t - s) / (sd**2 + t**2).sqrt()
    bb, ba = ap.coefficients(stats, t, s)
    fb, fa = ap.coefficients(fwd, t, s)
    print("\nsingle jumps s = ε: β / α")
    print("      t |        CM         |       CTM         |    AP backward    |    AP forward")
    for i in range(len(t)):
        print(f"{t[i]:7.3f} | {cm_b[i]:8.4f} {cm_a[i]:8.4f} | {ctm_b[i]:8.4f} {ctm_a[i]:8.4f} | "
              f"{bb[i]:8.3f} {ba[i]:8.3f} | {fb[i]:8.3f} {fa[i]:8.3f}")

    t_mid = float(t[6])
    s_mid = t[7:-1]
    tm = torch.full_like(s_mid, t_mid)
    mid = {"CTM": ((sd**2 + s_mid * tm) / (sd**2 + tm**2), sd * (tm - s_mid) / (sd**2 + tm**2).sqrt()),
           "AP backward": ap.coefficients(stats, tm, s_mid), "AP forward": ap.coefficients(fwd, tm, s_mid)}
    x_eval, _ = ds.sample(1024, g)
    x_t = x_eval + t_mid * torch.randn(x_eval.shape, dtype=torch.float64, generator=g)
    D = ds.denoiser(x_t, t_mid)
    zero = dataclasses.replace(stats, ell=torch.zeros_like(stats.ell), kappa=torch.zeros_like(stats.kappa))
    print(f"\nintermediate jumps from t = {t_mid:.3f}: β, α, consistency gap E‖D* − D_φ‖²/d (§3.4), jump error")
    print("      s |        CTM                           |    AP backward                       |    AP forward")
    gaps = {}
    for j, s_j in enumerate(s_mid.tolist()):
        x_s = ds.ode(x_t, t_mid, s_j)
        row = []
        for name, S in (("CTM", zero), ("AP backward", stats), ("AP forward", fwd)):
            tt, ss = torch.full((1024,), t_mid, dtype=torch.float64), torch.full((1024,), s_j, dtype=torch.float64)
            f, gg, ell = (c[:, None] for c in ap.f_and_g(S, tt, ss))
            gap = ((ell * x_t + (x_s - f * x_t) / gg) - D).square().mean().item()
            jump = (f * x_t + gg * (D - ell * x_t) - x_s).square().mean().item()
            gaps.setdefault(name, []).append(gap)
            row.append(f"{mid[name][0][j]:8.4f} {mid[name][1][j]:8.3f} {gap:8.2e} {jump:8.2e}")
        print(f"{s_j:7.4f} | " + " | ".join(row))

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    for name, (b_, a_), style in (("CM", (cm_b, cm_a), "k-"), ("CTM", (ctm_b, ctm_a), "k--"),
                                  ("AP backward", (bb, ba), "r-"), ("AP forward", (fb, fa), "b-")):
        ax[0, 0].plot(t, b_, style, label=name)
        ax[0, 1].plot(t, a_, style, label=name)
    ax[0, 2].plot(t_lam, stats.ell, "r-", label="ℓ_t")
    ax[0, 2].plot(t_lam, stats.kappa, "g-", label="κ_t")
    for name, style in (("CTM", "k--"), ("AP backward", "r-"), ("AP forward", "b-")):
        ax[1, 0].plot(s_mid, mid[name][0], style, label=name)
        ax[1, 1].plot(s_mid, mid[name][1], style, label=name)
        ax[1, 2].plot(s_mid, gaps[name], style, label=name)
    titles = ["β(t, ε)", "α(t, ε)", f"statistics ({a.dataset})", f"β({t_mid:.2f}, s)", f"α({t_mid:.2f}, s)",
              f"consistency gap, t = {t_mid:.2f}"]
    for axis, title in zip(ax.flat, titles):
        axis.set_xscale("log")
        axis.set_title(title)
        axis.legend()
        axis.set_xlabel("t" if title in titles[:3] else "s")
    ax[0, 1].set_yscale("symlog")
    ax[0, 0].set_yscale("symlog")
    ax[1, 2].set_yscale("log")
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
