"""Claim 1: Analytic-Precond speeds up CTM's multi-step training (and leaves CD as it is).

K. Zheng, G. He, J. Chen, F. Bao, J. Zhu, "Elucidating the Preconditioning in Consistency Distillation",
ICLR 2025, arXiv:2502.02922v3. The paper's statements tested here:

    (a) CTM + Analytic-Precond reaches a given 2-step quality in 2–3× fewer training iterations (abstract, Fig. 3);
    (b) for 1-step generation the curves of CTM and CTM + Analytic-Precond "pretty much overlap" (Fig. 2);
    (c) CM with Analytic-Precond performs as vanilla CM does.

Set-up as in the papers: the teacher is an EDM network (an MLP trained with EDM's loss on the toy), every student
starts as that network (CTM's s-path at zero), the statistics are the network teacher's, and quality is measured
against the teacher network's own PF-ODE from the same noise (how well it distils) and against the exact PF-ODE
of the data (how good the result is). Per sample the gap is ‖x − x_ref‖²/d; per run its mean with standard error
and its median; over seeds, the mean ± standard error of the runs' means. Both arms share teacher, initial
weights, data stream, noise and budget; they differ only in the outer coefficients β(t,s), α(t,s)
(`algorithms.analytic_precond.coefficients`, the default reading; docs/analytic_precond.md §5).

    python -m benchmarks.ctm_analytic_precond            # full mode (see FULL for the budget)
    python -m benchmarks.ctm_analytic_precond --quick    # smoke test, seconds
"""
import argparse
import copy
import json
import math
import os
import time

import matplotlib
import torch

from algorithms import analytic_precond, cd, ctm, edm
from benchmarks import common
from data import toy
from networks.checkpoint import load_teacher_into_student
from networks.mlp import MLP

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

FULL = dict(datasets=("ring8", "spiral"), seeds=(0, 1, 2), teacher_iters=3000, ctm_iters=1200, cd_iters=1000,
            batch=128, eval_every=100, done_at=400, n_eval=4096, stat_intervals=120, stat_samples=4096)
QUICK = dict(datasets=("ring8",), seeds=(0,), teacher_iters=20, ctm_iters=20, cd_iters=20, batch=32, eval_every=10,
             done_at=10, n_eval=128, stat_intervals=8, stat_samples=64)
NFES = (1, 2, 4)
ARMS = ("vanilla", "analytic")
ALGOS = {"ctm": dict(lr=2e-3, mu=0.99), "cd": dict(lr=1e-3, mu=0.95)}  # train.py's toy defaults


def mean_se(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1) / len(v)) ** 0.5


def paired_gap(x, x_ref):
    """Per-sample ‖x − x_ref‖²/d from the same noise: mean, its standard error, and median."""
    d = (x.double() - x_ref.double()).square().mean(1)
    return dict(mean=d.mean().item(), se=(d.std() / len(d) ** 0.5).item(), median=d.median().item())


def train_teacher(ds, s):
    """The EDM teacher network on the toy (EDM Eq. 8, Table 1), its evaluation EMA as a float32 denoiser."""
    loss_fn = lambda net, net_ema, x, step, g: edm.loss(edm.Config(), net, x, generator=g)
    net, log = common.train(loss_fn, ds, s["teacher_iters"], seed=100, batch=256, lr=1e-3)
    return net.float(), log["s_per_iter"] * s["teacher_iters"]


def run(algo, arm, ds, teacher_net, stats, seed, s, noise, refs):
    """One distillation run from the teacher's weights; paired gaps at every NFE against both references."""
    teacher = edm.Denoiser(teacher_net).requires_grad_(False)
    precond = stats if arm == "analytic" else None
    if algo == "ctm":
        cfg = ctm.Config(mu=ALGOS[algo]["mu"])

        def loss_fn(net, net_ema, x, step, g):
            return ctm.loss(cfg, net, net_ema, teacher, x, generator=g, precond=precond, last_layer=net.out[-1].weight)

        sample = lambda net, nfe: ctm.sample(cfg, net, noise, nfe=nfe, precond=precond)
    else:
        cfg = cd.Config(mu=ALGOS[algo]["mu"])
        loss_fn = lambda net, net_ema, x, step, g: cd.loss(cfg, net, net_ema, teacher, x, generator=g, precond=precond)
        sample = lambda net, nfe: cd.sample(cfg, net, noise, nfe=nfe, generator=torch.Generator().manual_seed(7),
                                            precond=precond)

    def evaluate(net):
        return {nfe: {ref: paired_gap(sample(net, nfe), x_ref) for ref, x_ref in refs.items()} for nfe in NFES}

    net0 = MLP(dim=ds.dim, s_embedding=algo == "ctm")
    if algo == "ctm":
        load_teacher_into_student(net0, teacher_net)                 # the s-path starts at zero
    else:
        net0.load_state_dict(teacher_net.state_dict())
    evals0 = (0, evaluate(net0.double().eval()))                      # the teacher-initialised student itself
    # Evaluation-EMA half-life of 20 iterations: short against the run, so the curves lag the weights by little.
    ema, log = common.train(loss_fn, ds, s[f"{algo}_iters"], seed=seed, batch=s["batch"], lr=ALGOS[algo]["lr"],
                          target_mu=cfg.mu, ema_halflife=20 * s["batch"], s_embedding=algo == "ctm",
                          evaluate=evaluate, eval_every=s["eval_every"], init=teacher_net)
    final = {nfe: sample(ema, nfe).float() for nfe in NFES}          # kept for re-measurement, not in the JSON
    return dict(evals=[evals0] + log["evals"], s_per_iter=log["s_per_iter"], final_loss=log["loss"][-1][1]), final


def iters_to_reach(its, gaps, target):
    """First iteration at which a gap curve reaches `target` (linear in log gap between checkpoints); None if never."""
    for i, gap in enumerate(gaps):
        if gap <= target:
            if i == 0:
                return float(its[0])
            g0, g1 = math.log(gaps[i - 1]), math.log(gap)
            return its[i - 1] + (its[i] - its[i - 1]) * (g0 - math.log(target)) / (g0 - g1)
    return None


def summarise(runs, s, algo):
    """Final gaps over seeds; the 2-step iterations-to-target ratio; the gap ratio at `done_at` iterations."""
    out = {}
    its = [it for it, _ in runs["vanilla"][0]["evals"]]
    curve = lambda r, nfe, ref="teacher", k="mean": [e[nfe][ref][k] for _, e in r["evals"]]
    for arm in ARMS:
        out[arm] = {f"{ref}_{k}_nfe{nfe}": mean_se([curve(r, nfe, ref, k)[-1] for r in runs[arm]])
                    for nfe in NFES for ref in ("teacher", "exact") for k in ("mean", "median")}
        out[arm]["s_per_iter"] = mean_se([r["s_per_iter"] for r in runs[arm]])
    ratios, at_done = [], []
    i_done = its.index(s["done_at"]) if s["done_at"] in its else None
    for rv, ra in zip(runs["vanilla"], runs["analytic"]):
        cv, ca = curve(rv, 2), curve(ra, 2)
        target = cv[-1]                                               # vanilla's final 2-step gap, same seed
        nv, na = iters_to_reach(its, cv, target), iters_to_reach(its, ca, target)
        ratios.append(dict(target=target, iters_vanilla=nv, iters_analytic=na,
                           ratio=None if na is None else nv / max(na, 1.0)))
        if i_done is not None:
            at_done.append(ca[i_done] / cv[i_done])
    out["iters_to_vanilla_final_2step"] = ratios
    out["ratio_mean_se"] = mean_se([r["ratio"] for r in ratios])
    out["reached"] = sum(r["ratio"] is not None for r in ratios)
    out["gap_ratio_2step_at_done"] = dict(per_seed=at_done, mean_se=mean_se(at_done), iteration=s["done_at"])
    out["iters"] = its
    return out


def main(quick=False, out="docs/results/ctm_analytic_precond"):
    torch.set_num_threads(1)                                         # shared cores
    s = QUICK if quick else FULL
    t_start = time.time()
    result, samples = dict(settings=s, datasets={}), {}
    for name in s["datasets"]:
        ds = toy.DATASETS[name]()
        teacher_net, teacher_time = train_teacher(ds, s)
        teacher64 = edm.Denoiser(copy.deepcopy(teacher_net).double()).requires_grad_(False)
        x0, _ = ds.sample(s["stat_samples"], torch.Generator().manual_seed(1), torch.float64)
        t0 = time.time()
        stats = analytic_precond.compute_stats(
            analytic_precond.Config(num_intervals=s["stat_intervals"], num_samples=s["stat_samples"]), teacher64, x0,
            generator=torch.Generator().manual_seed(1))
        stat_time = time.time() - t0
        bounded = analytic_precond.check_bounded(stats)
        T, eps = torch.tensor([edm.SIGMA_MAX], dtype=torch.float64), torch.tensor([edm.SIGMA_MIN], dtype=torch.float64)
        alpha_T = analytic_precond.coefficients(stats, T, eps)[1].item()
        noise = torch.randn(s["n_eval"], ds.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(12345))
        refs = {"teacher": toy.ode_solve(teacher64, noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN),
                "exact": ds.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)}
        res = dict(teacher_train_s=teacher_time, stat_time_s=stat_time, check_bounded=bounded,
                   alpha_T_eps=alpha_T, alpha_T_eps_ctm=edm.SIGMA_DATA * (80 - 0.002) / (0.25 + 6400) ** 0.5,
                   teacher_vs_exact=paired_gap(refs["teacher"], refs["exact"]), algos={})
        print(f"{name}: teacher {teacher_time:.0f}s, statistics {stat_time:.1f}s, α(T, ε) {alpha_T:.4f}, bounded: "
              f"{bounded or 'yes'}; teacher ODE vs exact ODE {res['teacher_vs_exact']['mean']:.2e}", flush=True)
        for algo in ALGOS:
            runs = {arm: [] for arm in ARMS}
            for seed in s["seeds"]:
                for arm in ARMS:
                    r, samples[name, algo, arm, seed] = run(algo, arm, ds, teacher_net, stats, seed, s, noise, refs)
                    runs[arm].append(r)
                    print(f"  {algo} seed {seed} {arm:8s}: " + "  ".join(
                        f"NFE {nfe} {r['evals'][-1][1][nfe]['teacher']['mean']:.2e}" for nfe in NFES)
                        + f"  ({r['s_per_iter']:.3f} s/iter)", flush=True)
            summary = summarise(runs, s, algo)
            run_time = summary["vanilla"]["s_per_iter"][0] * s[f"{algo}_iters"]
            summary["stat_fraction_of_run"] = stat_time / run_time
            res["algos"][algo] = dict(summary=summary, runs=runs)
        result["datasets"][name] = res
        samples[name, "refs"] = {k: v.float() for k, v in refs.items()}
        samples[name, "noise"] = noise.float()
        keep = os.path.join("runs", "ctm_analytic_precond" + ("-quick" if quick else ""))
        os.makedirs(keep, exist_ok=True)
        torch.save(samples, os.path.join(keep, "samples.pt"))        # every run's final samples, for re-measuring
    result["wall_time_s"] = time.time() - t_start
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ctm_analytic_precond.json"), "w") as f:
        json.dump(result, f, indent=1)
    report(result, out)
    return result


def report(result, out):
    """Print the tables and draw the 2-step and 1-step curves (mean ± standard error over seeds)."""
    s = result["settings"]
    for name, res in result["datasets"].items():
        for algo, a in res["algos"].items():
            sm = a["summary"]
            print(f"\n{name}, {algo.upper()}, {len(s['seeds'])} seeds x {s[f'{algo}_iters']} iterations; final gap to "
                  f"the teacher network's ODE (to the exact ODE), mean of runs' means ± s.e.:")
            for arm in ARMS:
                cells = [f"NFE {nfe}: {sm[arm][f'teacher_mean_nfe{nfe}'][0]:.2e} ± {sm[arm][f'teacher_mean_nfe{nfe}'][1]:.1e}"
                         f" ({sm[arm][f'exact_mean_nfe{nfe}'][0]:.2e})" for nfe in NFES]
                print(f"  {arm:8s} " + "   ".join(cells))
            m, se = sm["ratio_mean_se"]
            print(f"  2-step: iterations to vanilla's final gap, vanilla/analytic = {m:.2f} ± {se:.2f} "
                  f"({sm['reached']}/{len(s['seeds'])} reached); gap ratio analytic/vanilla at iteration "
                  f"{s['done_at']}: {sm['gap_ratio_2step_at_done']['mean_se'][0]:.2f} ± "
                  f"{sm['gap_ratio_2step_at_done']['mean_se'][1]:.2f}; statistics = "
                  f"{100 * sm['stat_fraction_of_run']:.1f} % of one run")
    fig, ax = plt.subplots(len(result["datasets"]), 4, figsize=(18, 4 * len(result["datasets"])), squeeze=False)
    for row, (name, res) in zip(ax, result["datasets"].items()):
        for col, (algo, nfe) in enumerate([("ctm", 2), ("ctm", 1), ("ctm", 4), ("cd", 2)]):
            a = res["algos"][algo]
            its = a["summary"]["iters"]
            for arm, colour in zip(ARMS, "kr"):
                c = torch.tensor([[e[nfe]["teacher"]["mean"] for _, e in r["evals"]] for r in a["runs"][arm]])
                m, se = c.mean(0), c.std(0).nan_to_num() / len(c) ** 0.5
                row[col].plot(its, m, colour, label=f"{algo.upper()} " + ("+ Analytic-Precond" if arm == "analytic"
                                                                         else "(vanilla)"))
                row[col].fill_between(its, (m - se).clamp(min=float(m.min()) * 0.3), m + se, color=colour, alpha=0.2)
            row[col].set(yscale="log", xlabel="training iteration", ylabel="gap to the teacher's ODE",
                         title=f"{name}: {algo.upper()}, {nfe}-step")
            row[col].legend()
    fig.tight_layout()
    png = os.path.join(out, "ctm_analytic_precond.png")
    fig.savefig(png, dpi=90)
    print(f"\nwrote {png} and the JSON; total {result['wall_time_s']:.0f}s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test in seconds (numbers are not meaningful)")
    p.add_argument("--out", default="docs/results/ctm_analytic_precond")
    a = p.parse_args()
    main(a.quick, a.out)
