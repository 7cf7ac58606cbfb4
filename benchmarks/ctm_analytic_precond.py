"""Claim 1 of issue 8: Analytic-Precond speeds up CTM's multi-step training.

K. Zheng, G. He, J. Chen, F. Bao, J. Zhu, "Elucidating the Preconditioning in Consistency Distillation",
ICLR 2025, arXiv:2502.02922v3 (../shared/papers/analytic_precond.md §5.3). The paper's statements tested here:

    (a) CTM + Analytic-Precond reaches a given 2-step quality in 2–3× fewer training iterations (abstract, Fig. 3);
    (b) for 1-step generation the training curves of CTM and CTM + Analytic-Precond "pretty much overlap" (Fig. 2).

The paper measures FID against iterations on images; here the teacher is exact, so quality is the teacher gap
E‖x_gen − x_ODE‖²/d against the exact PF-ODE solution from the same noise (data.metrics.teacher_gap), with CTM's
deterministic γ = 0 sampler (ctm.md §9.1). Both variants train from the same exact teacher, initial weights, data
stream, noise and budget; they differ only in the outer coefficients β(t,s), α(t,s) of the jumper.

As in CTM and in the paper (analytic_precond.md §4.2 [C]), every student starts as a denoiser: an MLP trained
once with EDM's loss on the same data (its s-path starts at zero, networks/mlp.py), so that a jumper starts near
the first-order step its preconditioning encodes — the mechanism the paper gives for the speed-up (§3.1, item 3).
Only the distillation target is the exact teacher.

The data is a finite point set (spiral): there Analytic-Precond's reconstructed coefficients are well behaved (α(80, ε)
≈ 0.49 against CTM's 0.5, as the paper says of single jumps). A short side-run on ring8 documents the failure mode
the algorithm engineers found: its Gaussian modes make N_φ = D_φ − ℓx vanish like σ² at low noise, κ ≈ −2, and the
coefficients blow up (α(80, ε) in the hundreds).

    python -m benchmarks.ctm_analytic_precond            # full mode (see FULL for the budget)
    python -m benchmarks.ctm_analytic_precond --quick    # smoke test, seconds
"""
import argparse
import json
import math
import os
import time

import matplotlib
import torch

from algorithms import analytic_precond, ctm, edm
from benchmarks import common
from data import metrics, toy
from networks.checkpoint import load_teacher_into_student
from networks.mlp import MLP

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# Toy CTM settings from the algorithm engineers (train.py's toy defaults: lr 2e-3, μ 0.99, N 18, K_max 17, DSM on).
# Batch 128 rather than 256 to fit three seeds of both variants into the 15-minute budget on two CPU cores.
FULL = dict(data="spiral", seeds=(0, 1, 2), iters=2000, init_iters=2000, batch=128, lr=2e-3, eval_every=100, n_eval=2000,
            stat_intervals=120, stat_samples=4096, side_data="ring8", side_iters=300)
QUICK = dict(data="spiral", seeds=(0,), iters=40, init_iters=10, batch=64, lr=2e-3, eval_every=20, n_eval=256,
             stat_intervals=16, stat_samples=256, side_data="ring8", side_iters=10)
NFES = (1, 2, 4)
VARIANTS = ("vanilla", "analytic")   # CTM's own (β, α), and Analytic-Precond's


def stats_for(ds, s, seed=1):
    """Analytic-Precond statistics ℓ_t, κ_t of the exact teacher, once per dataset (analytic_precond.md §3.6)."""
    x0, _ = ds.sample(s["stat_samples"], torch.Generator().manual_seed(seed), torch.float64)
    cfg = analytic_precond.Config(num_intervals=s["stat_intervals"], num_samples=s["stat_samples"])
    t0 = time.time()
    stats = analytic_precond.compute_stats(cfg, ds.denoiser, x0, generator=torch.Generator().manual_seed(seed))
    return stats, time.time() - t0


def coefficient_table(stats, cfg):
    """β(t, s), α(t, s) of CTM (§1) and of Analytic-Precond at s = ε and at the 2-step sampler's jumps."""
    t_mid = float(edm.sigma_grid(3, cfg.sigma_min, cfg.sigma_max, cfg.rho)[1])        # ≈ 2.52, ctm.md §9.1
    t = torch.tensor([cfg.sigma_max, t_mid, cfg.sigma_max], dtype=torch.float64)
    s = torch.tensor([cfg.sigma_min, cfg.sigma_min, t_mid], dtype=torch.float64)
    sd = cfg.sigma_data
    beta_ctm, alpha_ctm = (sd**2 + s * t) / (sd**2 + t**2), sd * (t - s) / (sd**2 + t**2).sqrt()   # ctm.md §1
    beta_ap, alpha_ap = analytic_precond.coefficients(stats, t, s)
    return [dict(t=float(t[i]), s=float(s[i]), beta_ctm=float(beta_ctm[i]), alpha_ctm=float(alpha_ctm[i]),
                 beta_ap=float(beta_ap[i]), alpha_ap=float(alpha_ap[i])) for i in range(len(t))]


def pretrain_denoiser(ds, s, noise, x_ref):
    """The students' starting point: an EDM denoiser MLP on the data (EDM Eq. 8, train.py's toy lr and batch), and
    how close its own 35-NFE Heun sampler comes to the exact teacher."""
    def loss_fn(net, net_ema, x, step, g):
        return edm.loss(edm.Config(), net, x, generator=g)
    net, log = common.train(loss_fn, ds, s["init_iters"], seed=100, batch=256, lr=1e-3)
    x = edm.sample(edm.Config(), lambda x_, sigma, y: edm.denoise(net, x_, sigma, y), noise)
    return net, dict(iters=s["init_iters"], heun35_teacher_gap=metrics.teacher_gap(x, x_ref),
                     s_per_iter=log["s_per_iter"])


def run_ctm(ds, cfg, precond, seed, s, iters, noise, x_ref, init=None):
    """One CTM training run; the teacher gap at every NFE of NFES, every eval_every iterations."""
    def loss_fn(net, net_ema, x, step, g):
        return ctm.loss(cfg, net, net_ema, ds.denoiser, x, generator=g, precond=precond,
                        last_layer=net.out[-1].weight)  # θ_L of §6: the MLP's output layer

    def evaluate(net):
        return {nfe: metrics.teacher_gap(ctm.sample(cfg, net, noise, nfe=nfe, precond=precond), x_ref)
                for nfe in NFES}

    # Evaluation-EMA half-life of 20 iterations: short against the run, so the curves lag the weights by little
    # (train.py's 20k samples would be ~150 iterations here; the papers' 0.999 EMA is ~1% of their runs).
    # Iteration 0: the denoiser-initialised jumper itself, where the two preconditionings differ most (§3.1).
    log0 = None
    if init is not None:
        net0 = MLP(dim=ds.dim, s_embedding=True)
        load_teacher_into_student(net0, init)
        log0 = (0, evaluate(net0.to(torch.float64).eval()))
    _, log = common.train(loss_fn, ds, iters, seed=seed, batch=s["batch"], lr=s["lr"], target_mu=cfg.mu,
                          ema_halflife=20 * s["batch"], s_embedding=True, evaluate=evaluate,
                          eval_every=s["eval_every"], init=init)
    log["evals"] = ([log0] if log0 else []) + log["evals"]
    return log


def iters_to_reach(its, gaps, target):
    """The first iteration at which a gap curve reaches `target`, interpolated linearly in log(gap) between the
    checkpoints around the crossing; None if it never does."""
    for i, gap in enumerate(gaps):
        if gap <= target:
            if i == 0:
                return float(its[0])
            g0, g1 = math.log(gaps[i - 1]), math.log(gap)
            return its[i - 1] + (its[i] - its[i - 1]) * (g0 - math.log(target)) / (g0 - g1)
    return None


def mean_std(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5


def main(quick=False, out="docs/results/ctm_analytic_precond"):
    torch.set_num_threads(1)                                 # BENCH.md: shared cores
    s = QUICK if quick else FULL
    t_start = time.time()
    ds = toy.DATASETS[s["data"]]()
    cfg = ctm.Config(mu=0.99)                                # toy target rate (train.py); DSM on, γ = 0 (§6, §9.1)
    stats, stat_time = stats_for(ds, s)
    noise = torch.randn(s["n_eval"], ds.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(12345))
    x_ref = ds.ode(noise * cfg.sigma_max, cfg.sigma_max, cfg.sigma_min)   # the exact teacher's PF-ODE solution

    init, init_info = pretrain_denoiser(ds, s, noise, x_ref)
    print(f"initial denoiser: {init_info['iters']} EDM iterations, its 35-NFE Heun teacher gap "
          f"{init_info['heun35_teacher_gap']:.2e}", flush=True)
    curves = {v: [] for v in VARIANTS}                      # per variant, per seed: {nfe: [gap at checkpoint]}
    its, times = None, {v: [] for v in VARIANTS}
    for seed in s["seeds"]:
        for v in VARIANTS:
            log = run_ctm(ds, cfg, stats if v == "analytic" else None, seed, s, s["iters"], noise, x_ref, init)
            its = [it for it, _ in log["evals"]]
            curves[v].append({nfe: [e[nfe] for _, e in log["evals"]] for nfe in NFES})
            times[v].append(log["s_per_iter"])
            print(f"seed {seed} {v:8s}: final gap " + "  ".join(
                f"NFE {nfe} {curves[v][-1][nfe][-1]:.3e}" for nfe in NFES) + f"   {log['s_per_iter']:.3f} s/iter",
                flush=True)

    def mean_curve(v, nfe):
        return [mean_std([c[nfe][i] for c in curves[v]])[0] for i in range(len(its))]

    # Targets: the vanilla mean 2-step gap at 1/4, 1/2 and all of the budget. The ratio is the iterations vanilla
    # needs over the iterations Analytic-Precond needs to reach it (the paper's "2–3× faster"), from the mean curves
    # and, for a spread, seed by seed (same seed paired).
    van2 = mean_curve("vanilla", 2)
    ratios = []
    for frac in (0.25, 0.5, 1.0):
        i = max(0, min(len(its) - 1, round(frac * len(its)) - 1))
        target = van2[i]
        reach = {v: iters_to_reach(its, mean_curve(v, 2), target) for v in VARIANTS}
        per_seed = []
        for cv, ca in zip(curves["vanilla"], curves["analytic"]):
            rv, ra = iters_to_reach(its, cv[2], target), iters_to_reach(its, ca[2], target)
            per_seed.append(None if rv is None or ra is None else rv / max(ra, 1e-9))   # huge if reached at init
        ratio = None if None in reach.values() else reach["vanilla"] / max(reach["analytic"], 1e-9)
        ratios.append(dict(target_from_vanilla_at=its[i], target_gap=target, iters_vanilla=reach["vanilla"],
                           iters_analytic=reach["analytic"], ratio_mean_curves=ratio,
                           ratio_per_seed=per_seed, ratio_per_seed_mean_std=mean_std(per_seed)))

    # Side-run: ring8, where the coefficients blow up. Statistics, coefficients, and a short run of each variant.
    side_ds = toy.DATASETS[s["side_data"]]()
    side_stats, side_stat_time = stats_for(side_ds, s)
    side_noise = noise[:min(len(noise), 1000)]
    side_ref = side_ds.ode(side_noise * cfg.sigma_max, cfg.sigma_max, cfg.sigma_min)
    # No denoiser initialisation here: the side-run only shows whether training survives the coefficients.
    side = {"coefficients": coefficient_table(side_stats, cfg), "stat_time_s": side_stat_time,
            "kappa_min": float(side_stats.kappa.min()), "kappa_max": float(side_stats.kappa.max())}
    for v in VARIANTS:
        log = run_ctm(side_ds, cfg, side_stats if v == "analytic" else None, 0, dict(s, eval_every=s["side_iters"]),
                      s["side_iters"], side_noise, side_ref)
        side[v] = {"losses": log["loss"], "final_gap": log["evals"][-1][1]}

    # ---- table
    print(f"\nCTM vs CTM + Analytic-Precond on {s['data']}, students initialised from an EDM denoiser "
          f"(Heun-35 gap {init_info['heun35_teacher_gap']:.1e}): {len(s['seeds'])} seeds x {s['iters']} iterations, "
          f"batch {s['batch']}, lr {s['lr']}, μ {cfg.mu}, DSM on, γ = 0 sampler; teacher gap (mean ± std over seeds)")
    print("  iter | " + " | ".join(f"{v} NFE {nfe}".rjust(22) for nfe in (2, 1) for v in VARIANTS))
    for i, it in enumerate(its):
        if quick or it % (4 * s["eval_every"]) == 0 or i in (1, len(its) - 1):
            cells = []
            for nfe in (2, 1):
                for v in VARIANTS:
                    m, sd = mean_std([c[nfe][i] for c in curves[v]])
                    cells.append(f"{m:.2e} ± {sd:.1e}".rjust(22))
            print(f"{it:6d} | " + " | ".join(cells))
    for v in VARIANTS:
        m = [mean_std([c[nfe][-1] for c in curves[v]]) for nfe in NFES]
        print(f"final {v:8s}: " + "   ".join(f"NFE {nfe}: {a:.2e} ± {b:.1e}" for nfe, (a, b) in zip(NFES, m)))
    print("\n2-step iterations to reach the vanilla gap at a fraction of the budget (ratio = vanilla / analytic):")
    for r in ratios:
        fmt = lambda x: "never" if x is None else f"{x:.0f}"
        m, sd = r["ratio_per_seed_mean_std"]
        rm = "n/a" if r["ratio_mean_curves"] is None else f"{r['ratio_mean_curves']:.2f}"
        print(f"  target {r['target_gap']:.2e} (vanilla @ {r['target_from_vanilla_at']}): vanilla "
              f"{fmt(r['iters_vanilla'])}, analytic {fmt(r['iters_analytic'])}, ratio {rm} "
              f"(per seed {m:.2f} ± {sd:.2f})")
    coeff = coefficient_table(stats, cfg)
    print(f"\ncoefficients β, α (CTM | Analytic-Precond); statistics {stat_time:.1f}s on {s['data']}, "
          f"{side_stat_time:.1f}s on {s['side_data']}")
    for name, rows in ((s["data"], coeff), (s["side_data"], side["coefficients"])):
        for r in rows:
            print(f"  {name:8s} t {r['t']:6.2f} -> s {r['s']:6.3f}: CTM {r['beta_ctm']:8.4f} {r['alpha_ctm']:8.4f} | "
                  f"AP {r['beta_ap']:10.4g} {r['alpha_ap']:10.4g}")
    print(f"  {s['side_data']}: κ_t in [{side['kappa_min']:.2f}, {side['kappa_max']:.2f}]")
    for v in VARIANTS:
        print(f"  {s['side_data']} {v:8s} after {s['side_iters']} iterations: loss {side[v]['losses'][-1][1]:.3g}, "
              "gap " + "  ".join(f"NFE {k} {g:.3g}" for k, g in side[v]["final_gap"].items()))

    # ---- picture: 2-step and 1-step gap against iterations (mean ± std bands), and the coefficients
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"vanilla": "k", "analytic": "r"}
    for panel, nfe in zip(ax[:2], (2, 1)):
        for v in VARIANTS:
            m = torch.tensor(mean_curve(v, nfe))
            sd = torch.tensor([mean_std([c[nfe][i] for c in curves[v]])[1] for i in range(len(its))]).nan_to_num()
            panel.plot(its, m, colours[v], label=f"CTM {'+ Analytic-Precond' if v == 'analytic' else '(vanilla)'}")
            panel.fill_between(its, (m - sd).clamp(min=m.min() * 0.3), m + sd, color=colours[v], alpha=0.15)
        if nfe == 2:
            for r in ratios:
                panel.axhline(r["target_gap"], color="grey", lw=0.6, ls=":")
        panel.set_yscale("log")
        panel.set_xlabel("training iteration")
        panel.set_ylabel("teacher gap E‖x − x_ODE‖²/d")
        panel.set_title(f"{nfe}-step (γ = 0) on {s['data']}, {len(s['seeds'])} seeds")
        panel.legend()
    t = edm.sigma_grid(40, cfg.sigma_min, cfg.sigma_max, cfg.rho)[:-1]
    eps = torch.full_like(t, cfg.sigma_min)
    sd_ = cfg.sigma_data
    ax[2].plot(t, sd_ * (t - eps) / (sd_**2 + t**2).sqrt(), "k--", label="CTM")
    ax[2].plot(t, analytic_precond.coefficients(stats, t, eps)[1].abs(), "r-", label=f"AP, {s['data']}")
    ax[2].plot(t, analytic_precond.coefficients(side_stats, t, eps)[1].abs(), "b-", label=f"AP, {s['side_data']}")
    ax[2].set(xscale="log", yscale="log", xlabel="t", title="|α(t, ε)|: the coefficient on the network output")
    ax[2].legend()
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "ctm_analytic_precond.png")
    fig.savefig(png, dpi=100)

    result = dict(settings=s, ctm_config=vars(cfg), initial_denoiser=init_info, nfes=NFES, iters=its, curves=curves, ratios=ratios,
                  s_per_iter={v: mean_std(t_) for v, t_ in times.items()}, stat_time_s=stat_time,
                  coefficients=coeff, side=side, wall_time_s=time.time() - t_start)
    with open(os.path.join(out, "ctm_analytic_precond.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {png} and the JSON; total {time.time() - t_start:.0f}s")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test in seconds (numbers are not meaningful)")
    p.add_argument("--out", default="docs/results/ctm_analytic_precond")
    a = p.parse_args()
    main(a.quick, a.out)
