"""Claim 4 of issue 8: consistency distillation, 1 and 2 steps, against the teacher's 35-NFE Heun sampler.

Y. Song, P. Dhariwal, M. Chen, I. Sutskever, "Consistency Models", ICML 2023, arXiv:2303.01469v2
(../shared/papers/cd.md §8). The paper's statement: a CD student samples in 1 step (CIFAR-10 FID 3.55) and better
in 2 (2.93), close to its EDM teacher at 35 NFE (2.04). Here the teacher is exact, so we measure

    teacher gap  E‖x_gen − x_ODE‖²/d against the exact PF-ODE solution from the same noise (data.metrics), and
    SW2 to data  the sliced Wasserstein-2 distance of the samples to fresh data, next to the teacher's own.

The 1-step gap measures distillation. CM's 2-step sampler (Alg. 1) re-noises with fresh noise, so its output is not
a function of the initial noise and its gap to the ODE solution is not a distillation measure; for 2 steps the
distance to data is the meaningful number. The teacher's Heun at 35 NFE (EDM Alg. 1, 18 levels) is the reference
sampler; the exact ODE (RK4 to float64 accuracy, data.toy.ode_solve) is the reference for the gap.

Main run on ring8 with the algorithm engineers' toy setting (μ = 0.95, lr 1e-3); students start from random weights,
as train.py's toy runs do (an exact teacher has no network to copy; CM initialises from its teacher's weights). Side run on the spiral point set:
CD with CM's own c_skip, c_out against CD with Analytic-Precond's β(t, ε), α(t, ε) — the paper (Zheng et al.,
arXiv:2502.02922v3, analytic_precond.md §5.3) says these perform the same, as the coefficients nearly coincide at
s = ε.

    python -m benchmarks.cd            # full mode
    python -m benchmarks.cd --quick    # smoke test, seconds
"""
import argparse
import json
import math
import os
import time

import matplotlib
import torch

from algorithms import analytic_precond, cd, edm
from benchmarks import common
from data import metrics, toy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# ring8: the algorithm engineers' setting (1-step gap 0.0034, SW2 0.048 after ~4000 steps at batch 512). The spiral
# side-run compares two preconditionings at a smaller budget (1500 steps at batch 256) to fit the 15 minutes.
FULL = dict(data="ring8", seeds=(0, 1, 2), iters=4000, batch=512, lr=1e-3, n_eval=4000,
            side_data="spiral", side_seeds=(0, 1, 2), side_iters=1500, side_batch=256, stat_samples=1024)
QUICK = dict(data="ring8", seeds=(0,), iters=30, batch=64, lr=1e-3, n_eval=256,
             side_data="spiral", side_seeds=(0,), side_iters=20, side_batch=64, stat_samples=128)
NFES = (1, 2)


def mean_std(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5


def references(ds, n, cfg):
    """The fixed evaluation noise, the exact ODE solution from it, the teacher's 35-NFE Heun samples from it, and
    two independent data sets (SW2 between those is the finite-sample floor of the metric)."""
    g = torch.Generator().manual_seed(12345)
    noise = torch.randn(n, ds.dim, dtype=torch.float64, generator=g)
    x_ode = ds.ode(noise * cfg.sigma_max, cfg.sigma_max, cfg.sigma_min)        # exact teacher
    x_heun = edm.sample(edm.Config(num_steps=18), ds.denoiser, noise)           # EDM Alg. 1, 35 NFE
    data_a, _ = ds.sample(n, g)
    data_b, _ = ds.sample(n, g)
    return noise, x_ode, x_heun, data_a, data_b


def train_cd(ds, cfg, precond, seed, s, iters, batch):
    def loss_fn(net, net_ema, x, step, g):
        return cd.loss(cfg, net, net_ema, ds.denoiser, x, generator=g, precond=precond)
    net, log = common.train(loss_fn, ds, iters, seed=seed, batch=batch, lr=s["lr"], target_mu=cfg.mu)
    return net, log


def evaluate(cfg, net, precond, noise, x_ode, data, seed):
    """Teacher gap and SW2 to data at NFE 1 and 2 (Alg. 1 with CTM's intermediate τ_1 ≈ 2.52, cd.default_taus)."""
    res, samples = {}, {}
    for nfe in NFES:
        x = cd.sample(cfg, net, noise, nfe=nfe, generator=torch.Generator().manual_seed(seed + 7), precond=precond)
        samples[nfe] = x
        res[nfe] = dict(teacher_gap=metrics.teacher_gap(x, x_ode), sw2_to_data=metrics.sliced_wasserstein(x, data))
    return res, samples


def main(quick=False, out="docs/results/cd"):
    torch.set_num_threads(1)                                # BENCH.md: shared cores
    s = QUICK if quick else FULL
    t_start = time.time()
    cfg = cd.Config(mu=0.95)                                # toy target rate (train.py, measured by the engineers)

    # ---- main run: ring8, CM's own preconditioning
    ds = toy.DATASETS[s["data"]]()
    noise, x_ode, x_heun, data, data_b = references(ds, s["n_eval"], cfg)
    ref = dict(ode_sw2_to_data=metrics.sliced_wasserstein(x_ode, data),
               heun35_sw2_to_data=metrics.sliced_wasserstein(x_heun, data),
               heun35_teacher_gap=metrics.teacher_gap(x_heun, x_ode),
               data_sw2_floor=metrics.sliced_wasserstein(data_b, data))
    main_runs, pictures = [], {}
    for seed in s["seeds"]:
        net, log = train_cd(ds, cfg, None, seed, s, s["iters"], s["batch"])
        res, samples = evaluate(cfg, net, None, noise, x_ode, data, seed)
        main_runs.append(dict(seed=seed, by_nfe=res, s_per_iter=log["s_per_iter"], loss=log["loss"]))
        pictures.setdefault("main", samples)
        print(f"{s['data']} seed {seed}: " + "  ".join(f"NFE {k}: gap {r['teacher_gap']:.2e} SW2 {r['sw2_to_data']:.4f}"
                                                      for k, r in res.items()) + f"  {log['s_per_iter']:.3f} s/iter",
              flush=True)

    # ---- side run: spiral, CM's coefficients against Analytic-Precond's
    side_ds = toy.DATASETS[s["side_data"]]()
    s_noise, s_ode, s_heun, s_data, s_data_b = references(side_ds, s["n_eval"], cfg)
    x0, _ = side_ds.sample(s["stat_samples"], torch.Generator().manual_seed(1))
    stats = analytic_precond.compute_stats(analytic_precond.Config(num_samples=s["stat_samples"]), side_ds.denoiser,
                                           x0, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([cfg.sigma_max, 2.0, 0.1], dtype=torch.float64)
    c_cm = cd.cm_scalings(cfg, t)
    c_ap = analytic_precond.coefficients(stats, t, torch.full_like(t, cfg.sigma_min))
    side = dict(ode_sw2_to_data=metrics.sliced_wasserstein(s_ode, s_data),
                heun35_sw2_to_data=metrics.sliced_wasserstein(s_heun, s_data),
                heun35_teacher_gap=metrics.teacher_gap(s_heun, s_ode),
                data_sw2_floor=metrics.sliced_wasserstein(s_data_b, s_data),
                coefficients=dict(t=t.tolist(), cm_c_skip=c_cm[0].tolist(), cm_c_out=c_cm[1].tolist(),
                                  ap_beta=c_ap[0].tolist(), ap_alpha=c_ap[1].tolist()),
                runs={"cm": [], "analytic": []})
    for seed in s["side_seeds"]:
        for name, precond in (("cm", None), ("analytic", stats)):
            net, log = train_cd(side_ds, cfg, precond, seed, s, s["side_iters"], s["side_batch"])
            res, samples = evaluate(cfg, net, precond, s_noise, s_ode, s_data, seed)
            side["runs"][name].append(dict(seed=seed, by_nfe=res, s_per_iter=log["s_per_iter"]))
            pictures.setdefault(name, samples)
            print(f"{s['side_data']} {name:8s} seed {seed}: " + "  ".join(
                f"NFE {k}: gap {r['teacher_gap']:.2e} SW2 {r['sw2_to_data']:.4f}" for k, r in res.items()), flush=True)

    # ---- table
    def row(label, nfe, runs):
        gap = mean_std([r["by_nfe"][nfe]["teacher_gap"] for r in runs])
        sw2 = mean_std([r["by_nfe"][nfe]["sw2_to_data"] for r in runs])
        return f"  {label:38s} {nfe:4d} | {gap[0]:.2e} ± {gap[1]:.1e} | {sw2[0]:.4f} ± {sw2[1]:.4f}"

    head = "  method                                  NFE | teacher gap (mean ± std) | SW2 to data (mean ± std)"
    for name, d, runs, iters, batch, ns in (
            (s["data"], ref, {"CD (CM's c_skip, c_out)": main_runs}, s["iters"], s["batch"], len(s["seeds"])),
            (s["side_data"], side, {"CD (CM's c_skip, c_out)": side["runs"]["cm"],
                                    "CD + Analytic-Precond": side["runs"]["analytic"]},
             s["side_iters"], s["side_batch"], len(s["side_seeds"]))):
        print(f"\n{name}: CD, μ {cfg.mu}, lr {s['lr']}, batch {batch}, {iters} iterations, {ns} seeds, "
              f"{s['n_eval']} samples")
        print(head)
        print(f"  {'exact teacher ODE (RK4)':38s}    - | {0:.2e}                 | {d['ode_sw2_to_data']:.4f}")
        print(f"  {'teacher Heun (EDM Alg. 1)':38s} {35:4d} | {d['heun35_teacher_gap']:.2e}                 | "
              f"{d['heun35_sw2_to_data']:.4f}")
        for label, runs in runs.items():
            for nfe in NFES:
                print(row(label + (" (re-noised)" if nfe > 1 else ""), nfe, runs))
        print(f"  {'data vs data (metric floor)':38s}    - |                          | {d['data_sw2_floor']:.4f}")
    c = side["coefficients"]
    print("\nspiral, s = ε: CM's (c_skip, c_out) against Analytic-Precond's (β, α)")
    for i, tt in enumerate(c["t"]):
        print(f"  t {tt:6.2f}: CM {c['cm_c_skip'][i]:.4f} {c['cm_c_out'][i]:.4f} | "
              f"AP {c['ap_beta'][i]:.4f} {c['ap_alpha'][i]:.4f}")

    # ---- picture: samples from the same noise
    n_show = min(1000, s["n_eval"])
    panels = [("data", data, s["data"]), ("teacher Heun, 35 NFE", x_heun, s["data"]),
              ("CD, 1 NFE", pictures["main"][1], s["data"]), ("CD, 2 NFE (re-noised)", pictures["main"][2], s["data"]),
              ("teacher Heun, 35 NFE", s_heun, s["side_data"]), ("CD, 1 NFE", pictures["cm"][1], s["side_data"]),
              ("CD + Analytic-Precond, 1 NFE", pictures["analytic"][1], s["side_data"]),
              ("CD + Analytic-Precond, 2 NFE", pictures["analytic"][2], s["side_data"])]
    fig, ax = plt.subplots(2, 4, figsize=(16, 8))
    for a, (title, x, name) in zip(ax.flat, panels):
        a.scatter(x[:n_show, 0], x[:n_show, 1], s=2, alpha=0.5)
        a.set(title=f"{name}: {title}", aspect="equal", xlim=(-2, 2), ylim=(-2, 2))
    fig.suptitle(f"Consistency distillation (seed {s['seeds'][0]}), samples from the same noise")
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "cd.png")
    fig.savefig(png, dpi=90)
    result = dict(settings=s, cd_config=vars(cfg), main=dict(reference=ref, runs=main_runs), side=side,
                  wall_time_s=time.time() - t_start)
    with open(os.path.join(out, "cd.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {png} and the JSON; total {time.time() - t_start:.0f}s")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test in seconds (numbers are not meaningful)")
    p.add_argument("--out", default="docs/results/cd")
    a = p.parse_args()
    main(a.quick, a.out)
