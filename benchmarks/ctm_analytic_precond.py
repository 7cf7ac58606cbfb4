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
from data import metrics, toy
from networks.checkpoint import load_teacher_into_student
from networks.mlp import MLP

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# The budget is what 2 CPU cores allow: statistics from 1024 samples (train.py's toy budget) rather than the paper's
# 4096, 400 CTM and 300 CD iterations; the picture shows how far the curves have flattened.
FULL = dict(datasets=("ring8", "spiral"), seeds=(0, 1, 2), teacher_iters=1500, ctm_iters=400, cd_iters=300,
            batch=128, eval_every=50, done_at=400, n_eval=1024, stat_intervals=120, stat_samples=1024)
QUICK = dict(datasets=("ring8",), seeds=(0,), teacher_iters=20, ctm_iters=20, cd_iters=20, batch=32, eval_every=10,
             done_at=10, n_eval=128, stat_intervals=8, stat_samples=64)
NFES = (1, 2, 4)
# CTM: vanilla against the default reading and against κ ≡ 0, the other reading that is bounded everywhere
# (docs/analytic_precond.md §2); CD: vanilla against the default. None = the paper's own coefficients.
READINGS = {"vanilla": None, "implicit_backward": analytic_precond.implicit_backward,
            "kappa_zero": analytic_precond.kappa_zero}
ALGOS = {"ctm": dict(lr=2e-3, mu=0.99, arms=("vanilla", "implicit_backward", "kappa_zero")),
         "cd": dict(lr=1e-3, mu=0.95, arms=("vanilla", "implicit_backward"))}   # lr, μ: train.py's toy defaults


def mean_se(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1) / len(v)) ** 0.5


def cluster_of(ds):
    """The mode a sample lands in, for the mode-switch fraction: the nearest of ring8's 8 means; for the spiral,
    which tenth of its points (an arc) the nearest point is in."""
    means = ds.means
    per = max(1, len(means) // 10) if len(means) > 8 else 1
    return lambda x: (x.double() @ means.T - 0.5 * means.square().sum(1)).argmax(1) // per


def train_teacher(ds, s):
    """The EDM teacher network on the toy (EDM Eq. 8, Table 1), its evaluation EMA as a float32 denoiser."""
    loss_fn = lambda net, net_ema, x, step, g: edm.loss(edm.Config(), net, x, generator=g)
    net, log = common.train(loss_fn, ds, s["teacher_iters"], seed=100, batch=256, lr=1e-3)
    return net.float(), log["s_per_iter"] * s["teacher_iters"]


def run(algo, arm, ds, teacher_net, stats, seed, s, noise, refs):
    """One distillation run from the teacher's weights; paired gaps at every NFE against both references."""
    teacher = edm.Denoiser(teacher_net).requires_grad_(False)
    reading = READINGS[arm]
    outer = None if reading is None else (lambda t, s_: reading(stats, t, s_))
    if algo == "ctm":
        cfg = ctm.Config(mu=ALGOS[algo]["mu"])

        def loss_fn(net, net_ema, x, step, g):
            return ctm.loss(cfg, net, net_ema, teacher, x, generator=g, outer=outer, last_layer=net.out[-1].weight)

        sample = lambda net, nfe: ctm.sample(cfg, net, noise, nfe=nfe, outer=outer)
    else:
        cfg = cd.Config(mu=ALGOS[algo]["mu"])
        loss_fn = lambda net, net_ema, x, step, g: cd.loss(cfg, net, net_ema, teacher, x, generator=g, outer=outer)
        sample = lambda net, nfe: cd.sample(cfg, net, noise, nfe=nfe, generator=torch.Generator().manual_seed(7),
                                            outer=outer)
    assign = cluster_of(ds)

    def evaluate(net):
        return {nfe: {ref: metrics.paired_gap(sample(net, nfe), x_ref, assign) for ref, x_ref in refs.items()}
                for nfe in NFES}

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


KEYS = ("gap_mean", "gap_median", "mode_switch_fraction")


def curve(r, nfe, ref="teacher", k="gap_mean"):
    return [e[nfe][ref][k] for _, e in r["evals"]]


def summarise(runs, s):
    """Per arm: final metrics over seeds (mean ± s.e. of the runs' values) and, against vanilla from the same seed,
    the 2-step iterations-to-target ratio (target: vanilla's final 2-step gap) and the gap ratio at `done_at`."""
    out = {}
    its = [it for it, _ in runs["vanilla"][0]["evals"]]
    i_done = its.index(s["done_at"]) if s["done_at"] in its else None
    for arm, rs in runs.items():
        out[arm] = {f"{ref}_{k}_nfe{nfe}": mean_se([curve(r, nfe, ref, k)[-1] for r in rs])
                    for nfe in NFES for ref in ("teacher", "exact") for k in KEYS}
        out[arm]["s_per_iter"] = mean_se([r["s_per_iter"] for r in rs])
        if arm == "vanilla":
            continue
        ratios, at_done = [], []
        for rv, ra in zip(runs["vanilla"], rs):
            cv, ca = curve(rv, 2), curve(ra, 2)
            target = cv[-1]                                           # vanilla's final 2-step gap, same seed
            nv, na = iters_to_reach(its, cv, target), iters_to_reach(its, ca, target)
            ratios.append(dict(target=target, iters_vanilla=nv, iters_reading=na,
                               ratio=None if na is None else nv / max(na, 1.0)))
            if i_done is not None:
                at_done.append(ca[i_done] / cv[i_done])
        out[arm].update(iters_to_vanilla_final_2step=ratios, ratio_mean_se=mean_se([r["ratio"] for r in ratios]),
                        reached=sum(r["ratio"] is not None for r in ratios),
                        gap_ratio_2step_at_done=dict(per_seed=at_done, mean_se=mean_se(at_done),
                                                     iteration=s["done_at"]))
    out["iters"] = its
    return out


def main(quick=False, out="docs/results/ctm_analytic_precond", datasets=None):
    torch.set_num_threads(1)                                         # shared cores
    s = QUICK if quick else FULL
    keep = os.path.join("runs", "ctm_analytic_precond" + ("-quick" if quick else ""))
    os.makedirs(out, exist_ok=True)
    os.makedirs(keep, exist_ok=True)
    for name in datasets or s["datasets"]:
        run_dataset(name, s, out, keep)
    return report(out, s)


def run_dataset(name, s, out, keep):
    """Teacher, statistics, references and every run on one dataset; its JSON (and its runs' final samples)."""
    t_start = time.time()
    ds = toy.DATASETS[name]()
    teacher_net, teacher_time = train_teacher(ds, s)
    teacher64 = edm.Denoiser(copy.deepcopy(teacher_net).double()).requires_grad_(False)
    x0, _ = ds.sample(s["stat_samples"], torch.Generator().manual_seed(1), torch.float64)
    t0 = time.time()
    stats = analytic_precond.compute_stats(
        analytic_precond.Config(num_intervals=s["stat_intervals"], num_samples=s["stat_samples"]), teacher64, x0,
        generator=torch.Generator().manual_seed(1))
    stat_time = time.time() - t0
    T, eps = torch.tensor([edm.SIGMA_MAX], dtype=torch.float64), torch.tensor([edm.SIGMA_MIN], dtype=torch.float64)
    coeffs = {arm: [float(c) for c in r(stats, T, eps)] for arm, r in READINGS.items() if r is not None}
    coeffs["vanilla"] = [float(c) for c in ctm.ctm_outer(T, eps)]
    noise = torch.randn(s["n_eval"], ds.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(12345))
    refs = {"teacher": toy.ode_solve(teacher64, noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN),
            "exact": ds.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)}
    res = dict(settings=s, teacher_train_s=teacher_time, stat_time_s=stat_time,
               check_bounded={arm: analytic_precond.check_bounded(stats, reading=r)
                              for arm, r in READINGS.items() if r is not None},
               beta_alpha_T_eps=coeffs, teacher_vs_exact=metrics.paired_gap(refs["teacher"], refs["exact"],
                                                                            cluster_of(ds)), algos={})
    print(f"{name}: teacher {teacher_time:.0f}s, statistics {stat_time:.1f}s; (β, α)(T, ε) {coeffs}; bounded "
          f"{ {k: v is None for k, v in res['check_bounded'].items()} }; teacher ODE vs exact ODE "
          f"{res['teacher_vs_exact']['gap_mean']:.2e}", flush=True)
    samples = {"noise": noise.float(), "refs": {k: v.float() for k, v in refs.items()}}
    # Arm by arm over all seeds, the JSON rewritten after each, so that an interrupted run keeps what it finished.
    for algo, a in ALGOS.items():
        runs = {}
        for arm in a["arms"]:
            runs[arm] = []
            for seed in s["seeds"]:
                r, samples[algo, arm, seed] = run(algo, arm, ds, teacher_net, stats, seed, s, noise, refs)
                runs[arm].append(r)
                print(f"  {algo} seed {seed} {arm:17s}: " + "  ".join(
                    f"NFE {nfe} {r['evals'][-1][1][nfe]['teacher']['gap_mean']:.2e}" for nfe in NFES)
                    + f"  ({r['s_per_iter']:.3f} s/iter)", flush=True)
            summary = summarise(runs, s)
            summary["stat_fraction_of_run"] = stat_time / (summary["vanilla"]["s_per_iter"][0] * s[f"{algo}_iters"])
            res["algos"][algo] = dict(summary=summary, runs=runs)
            res["wall_time_s"] = time.time() - t_start
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(res, f, indent=1)
            torch.save(samples, os.path.join(keep, f"{name}_samples.pt"))  # the runs' final samples, for re-measuring


def fmt(ms, digits=2):
    m, se = ms
    return f"{m:.{digits}e} ± {se:.1e}"


def report(out, s):
    """Print the tables of every dataset's JSON in `out` and draw the curves (mean ± s.e. over seeds)."""
    results = {}
    for name in s["datasets"]:
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
    for name, res in results.items():
        print(f"\n{name}: statistics {res['stat_time_s']:.1f}s; teacher network's ODE vs exact ODE "
              f"{res['teacher_vs_exact']['gap_mean']:.2e}; (β, α)(T, ε): {res['beta_alpha_T_eps']}")
        for algo, a in res["algos"].items():
            sm = a["summary"]
            print(f"{name}, {algo.upper()}, {len(s['seeds'])} seeds x {s[f'{algo}_iters']} iterations. Final gap to "
                  f"the teacher network's ODE | to the exact ODE (mean of the runs' means ± s.e.):")
            for arm in a["runs"]:
                print(f"  {arm:17s} " + "  ".join(f"NFE {nfe}: {fmt(sm[arm][f'teacher_gap_mean_nfe{nfe}'])} | "
                                                  f"{fmt(sm[arm][f'exact_gap_mean_nfe{nfe}'])}" for nfe in NFES))
                if arm != "vanilla":
                    m, se = sm[arm]["ratio_mean_se"]
                    d = sm[arm]["gap_ratio_2step_at_done"]
                    print(f"  {'':17s} 2 steps: iterations to vanilla's final gap, vanilla/reading {m:.2f} ± {se:.2f} "
                          f"({sm[arm]['reached']}/{len(s['seeds'])} reached); gap reading/vanilla at iteration "
                          f"{d['iteration']}: {d['mean_se'][0]:.2f} ± {d['mean_se'][1]:.2f} "
                          f"(per seed {', '.join(f'{v:.2f}' for v in d['per_seed'])})")
            print(f"  statistics = {100 * sm['stat_fraction_of_run']:.1f} % of one vanilla run")
    if not results:
        return results
    fig, ax = plt.subplots(len(results), 4, figsize=(18, 4 * len(results)), squeeze=False)
    for row, (name, res) in zip(ax, results.items()):
        for col, (algo, nfe) in enumerate([("ctm", 2), ("ctm", 1), ("ctm", 4), ("cd", 1)]):
            a = res["algos"].get(algo)
            if a is None:
                continue
            its = a["summary"]["iters"]
            for arm, colour in zip(a["runs"], "krb"):
                c = torch.tensor([curve(r, str(nfe)) for r in a["runs"][arm]])
                m = c.mean(0)
                se = c.std(0) / len(c) ** 0.5 if len(c) > 1 else torch.zeros_like(m)
                row[col].plot(its, m, colour, label=arm)
                row[col].fill_between(its, (m - se).clamp(min=float(m.min()) * 0.3), m + se, color=colour, alpha=0.2)
            row[col].set(yscale="log", xlabel="training iteration", ylabel="gap to the teacher's ODE",
                         title=f"{name}: {algo.upper()}, {nfe}-step")
            row[col].legend()
    fig.tight_layout()
    png = os.path.join(out, "ctm_analytic_precond.png")
    fig.savefig(png, dpi=90)
    print(f"\nwrote {png}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test in seconds (numbers are not meaningful)")
    p.add_argument("--out", default="docs/results/ctm_analytic_precond")
    p.add_argument("--data", nargs="*", default=None, help="only these datasets (default: all of the mode's)")
    p.add_argument("--report", action="store_true", help="only print and draw what the JSONs in --out hold")
    a = p.parse_args()
    if a.report:
        report(a.out, QUICK if a.quick else FULL)
    else:
        main(a.quick, a.out, a.data)
