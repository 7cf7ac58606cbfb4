"""Claim 2: multistep consistency models trade steps for quality (Heek et al., arXiv:2403.06807v3, Table 1).

The paper distils one MCM student per S ∈ {1, 2, 4, 8, 16} from the same diffusion teacher with the same budget and
finds FID falling with S towards the teacher's (large IN64 MCM-CD 3.2 / 1.9 / 1.6 / 1.4 at S = 1, 2, 4, 8, the
teacher 1.4). Here, on two_modes, one MCM-CD student (Alg. 1, aDDIM teacher step) per S and seed, in both set-ups
of benchmarks/common.py:

    (i)  the exact teacher, students from random weights;
    (ii) an EDM network teacher trained on the toy, students initialised from it (the papers' set-up).

Each final student is measured with `data.metrics.report` against the exact ODE from the same noise, and in (ii)
also against the teacher network's own ODE. "Teacher, S DDIM steps" is the teacher sampled with Alg. 2's S steps: in
(ii) that is exactly the student at initialisation (Alg. 2 with x̂ = the teacher's D); in (i) it is not (the student
starts from random weights). The training curve (the gap every few hundred iterations) shows whether the budget
has converged. Runs are cached (common.CACHE), so `mcm_teacher_step` (claim 5) reuses the aDDIM arm of (ii).

    python -m benchmarks.mcm_steps [--quick] [--out docs/results/mcm_steps]     (--quick writes *_quick.{json,png})
"""
import time

import torch

from algorithms import addim, mcm
from benchmarks import common
from data import metrics, toy

# train.py's MCM recipe (Adam 1e-3, batch 256, teacher steps annealed 64 → 1280 over half the run, evaluation EMA).
# n_large: the energy test of the largest S against the teacher's ODE at n_large against n_large samples.
# 3000 iterations: at 1000, S = 1 in (ii) and S = 4, 8 in (i) were still improving.
FULL = dict(data="two_modes", S=(1, 2, 4, 8), S_i=(1, 2, 4, 8), seeds=(0, 1, 2, 3, 4), seeds_i=(0, 1, 2), iters=3000,
            batch=256, lr=1e-3, n_eval=16384, curve=(500, 1000, 1500, 2000, 2500, 3000), n_curve=1024, n_target=512,
            n_xvar=256, n_large=16384, teacher=common.TEACHER)
QUICK = dict(data="two_modes", S=(1, 2), S_i=(1,), seeds=(0, 1), seeds_i=(0,), iters=20, batch=64, lr=1e-3, n_eval=256,
             curve=(10, 20), n_curve=64, n_target=64, n_xvar=32, n_large=256, teacher=dict(iters=20, batch=64, lr=1e-3))
SETUPS = {"i": "exact teacher, random init", "ii": "EDM network teacher, student = teacher at init"}


def references(p):
    """Everything the students are measured against, from one evaluation noise: the exact ODE, and for set-up (ii)
    the teacher network, its own ODE, and the two chained-teacher targets of claim 5 (N_end teacher steps of DDIM, and
    of aDDIM with Alg. 3's η = 0.75 x_var, on n_target samples)."""
    ds = toy.DATASETS[p["data"]]()
    noise = common.eval_noise(ds, 0, p["n_eval"])
    key = dict(data=p["data"], n=p["n_eval"], teacher=p["teacher"])
    x_exact = common.cached_tensor("ode-exact", key, lambda: common.ode(ds.denoiser, noise))
    net, D = common.toy_teacher(ds, **p["teacher"])
    x_teacher = common.cached_tensor("ode-teacher", key, lambda: common.ode(D, noise, steps_per_unit=3))
    T, nt = mcm.Config().N_end, p["n_target"]

    def chained(use_addim):
        x_var = torch.zeros(T, dtype=torch.float64)
        if use_addim:  # Alg. 3: η·E‖x − x̂‖²/d per step, on held-out data
            x0, _ = ds.sample(p["n_xvar"], torch.Generator().manual_seed(5))
            x_var = addim.estimate_x_var(D, x0, addim.time_grid(T)[:-1], eta=mcm.Config().eta,
                                         generator=torch.Generator().manual_seed(6))
        return addim.sample(addim.Config(num_steps=T), D, noise[:nt], x_var=x_var)

    targets = {arm: common.cached_tensor(f"target-{arm}", {**key, "n_target": nt, "n_xvar": p["n_xvar"]},
                                         lambda a=arm: chained(a == "aDDIM"))
               for arm in ("DDIM", "aDDIM")}
    return dict(ds=ds, noise=noise, exact=x_exact, teacher=x_teacher, net=net, D=D, targets=targets)


def measure(x, refs, setup, arm=None):
    """`metrics.report` of samples x against the exact ODE, and in (ii) against the teacher's ODE and arm's target."""
    a = common.assign(refs["ds"])
    out = {"vs_exact": metrics.report(x, refs["exact"], a)}
    if setup == "ii":
        out["vs_teacher"] = metrics.report(x, refs["teacher"], a)
        if arm is not None:
            t = refs["targets"][arm]
            out["vs_own_target"] = metrics.report(x[:len(t)], t, a)
    return out


def config(p, S, arm):
    return mcm.Config(S=S, anneal_iters=p["iters"] // 2, addim_teacher=arm == "aDDIM")  # App. A.1: half the run


def train_student(p, refs, setup, S, seed, arm, curve=None):
    """One MCM-CD student (Alg. 1) with the given teacher step, and its training log (`curve` every p["curve"][0])."""
    D, cfg = refs["ds"].denoiser if setup == "i" else refs["D"], config(p, S, arm)

    def loss_fn(net, net_ema, x, step, g):  # MCM has no target network: its stop-gradient target is `net` itself
        return mcm.loss(cfg, net, D, x, step=step, generator=g)

    return common.train(loss_fn, refs["ds"], p["iters"], seed=seed, batch=p["batch"], lr=p["lr"], evaluate=curve,
                        eval_every=p["curve"][0], init=None if setup == "i" else refs["net"])


def run(p, refs, setup, S, seed, arm="aDDIM"):
    """One MCM-CD student: its training curve and its final measurements."""
    cfg, reference, nc = config(p, S, arm), refs["exact"] if setup == "i" else refs["teacher"], p["n_curve"]

    def compute():
        def curve(net):
            return {"gap_mean": metrics.teacher_gap(mcm.sample(cfg, net, refs["noise"][:nc]), reference[:nc])}

        t0 = time.time()
        ema, log = train_student(p, refs, setup, S, seed, arm, curve)
        x = mcm.sample(cfg, ema, refs["noise"])
        return dict(curve=[(i, e["gap_mean"]) for i, e in log["evals"] if i in p["curve"]],
                    final_loss=log["loss"][-1][1], s_per_iter=log["s_per_iter"], wall_s=time.time() - t0,
                    **measure(x, refs, setup, arm))

    key = dict(kind="mcm", data=p["data"], setup=setup, S=S, seed=seed, arm=arm, teacher=p["teacher"],
               **{k: p[k] for k in ("iters", "batch", "lr", "n_eval", "n_curve", "n_target", "n_xvar")})
    r = common.cached("mcm", key, compute)
    print(f"  ({setup}) {arm} teacher step, S = {S}, seed {seed}: gap to exact ODE {r['vs_exact']['gap_mean']:.3e}"
          + (f", to teacher ODE {r['vs_teacher']['gap_mean']:.3e}" if setup == "ii" else "")
          + f"  ({r['wall_s']:.0f}s)", flush=True)
    return r


def large_energy(p, refs, S, seed):
    """The energy test of a set-up (ii) student against the teacher network's ODE at n_large against n_large samples
    from disjoint noise of their own (the student is trained again: training is deterministic given the seed)."""
    n = p["n_large"]

    def compute():
        noise = common.eval_noise(refs["ds"], 1, 2 * n)  # seed 1: not the evaluation noise of `run`
        x = mcm.sample(config(p, S, "aDDIM"), train_student(p, refs, "ii", S, seed, "aDDIM")[0], noise[:n])
        return metrics.energy_test(x, common.ode(refs["D"], noise[n:], steps_per_unit=3))

    key = dict(kind="mcm-energy", data=p["data"], S=S, seed=seed, n=n, teacher=p["teacher"],
               **{k: p[k] for k in ("iters", "batch", "lr")})
    r = common.cached("mcm-energy", key, compute)
    print(f"  (ii) S = {S}, seed {seed}: energy to the teacher ODE at {n} against {n}: {r['energy']:.2e} "
          f"(null s.d. {r['energy_null_sd']:.1e}, p = {r['energy_p']:.3f})", flush=True)
    return r


def baseline(p, refs, setup, S):
    """The teacher (exact in (i), the network in (ii)) sampled with Alg. 2's S DDIM steps, from the same noise."""
    D = refs["ds"].denoiser if setup == "i" else refs["D"]
    x = addim.sample(addim.Config(num_steps=S), D, refs["noise"], x_var=torch.zeros(S, dtype=torch.float64))
    return measure(x, refs, setup)


FIELDS = ("gap_mean", "gap_median", "mode_switch_fraction", "gap_mean_same_mode", "energy_to_ode", "energy_to_ode_p")


def summarise(runs):
    """Per measurement and field: mean ± s.e. over seeds."""
    return {ref: {f: common.mean_se([r[ref][f] for r in runs]) for f in FIELDS}
            for ref in runs[0] if ref.startswith("vs_")}


def main(quick=False, out="docs/results/mcm_steps"):
    p = QUICK if quick else FULL
    t0 = time.time()
    refs = references(p)
    a = common.assign(refs["ds"])
    teacher = {"vs_exact": metrics.report(refs["teacher"], refs["exact"], a)}
    for arm, t in refs["targets"].items():  # the chained targets of claim 5, against the exact ODE
        teacher[f"{arm}_{mcm.Config().N_end}_vs_exact"] = metrics.report(t, refs["exact"][:len(t)], a)
    res = {"claim": "Heek et al. Table 1: MCM quality improves with S towards the teacher's", "settings": p,
           "teacher": teacher, "setups": {}}
    for setup in SETUPS:
        rows = {}
        for S in (p["S"] if setup == "ii" else p["S_i"]):
            runs = [run(p, refs, setup, S, seed) for seed in (p["seeds"] if setup == "ii" else p["seeds_i"])]
            rows[S] = {"student": summarise(runs), "teacher_S_ddim_steps": baseline(p, refs, setup, S),
                       "curve": {i: common.mean_se([dict(r["curve"])[i] for r in runs]) for i in p["curve"]},
                       "per_seed": runs}
        res["setups"][setup] = rows
    S = max(p["S"])
    tests = [large_energy(p, refs, S, seed) for seed in p["seeds"]]
    res["large_energy"] = dict(S=S, n=p["n_large"], per_seed=tests,
                               **{f: common.mean_se([t[f] for t in tests]) for f in ("energy", "energy_p")})
    res["wall_time_s"] = time.time() - t0
    print_table(res, p)
    return common.write(out, "mcm_steps", quick, res, lambda path: plot(path, res, p))


def print_table(res, p):
    t = res["teacher"]["vs_exact"]
    print(f"\nMCM-CD on {p['data']}, aDDIM teacher step, {p['iters']} iterations per S, seeds {list(p['seeds'])} "
          f"((i): {list(p['seeds_i'])}), "
          f"{p['n_eval']} samples; mean ± s.e. over seeds. Teacher network vs exact ODE: gap "
          f"{t['gap_mean']:.2e} ± {t['gap_se']:.1e}, mode switches {t['mode_switch_fraction']:.4f}")
    for setup, rows in res["setups"].items():
        print(f"set-up ({setup}): {SETUPS[setup]}")
        for S, r in rows.items():
            line = f"  S = {S}: vs exact {common.fmt(r['student']['vs_exact']['gap_mean'])}"
            if setup == "ii":
                line += (f"  vs teacher {common.fmt(r['student']['vs_teacher']['gap_mean'])}  energy p "
                         f"{common.fmt(r['student']['vs_teacher']['energy_to_ode_p'], '.2f')}")
            b = r["teacher_S_ddim_steps"]["vs_exact" if setup == "i" else "vs_teacher"]
            print(line + f"  | teacher, S DDIM steps: {b['gap_mean']:.3e}")


def plot(path, res, p):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for setup, ls in (("i", "-"), ("ii", "--")):
        rows = res["setups"][setup]
        S_list = list(rows)
        for ref, c in (("vs_exact", "tab:blue"), ("vs_teacher", "tab:orange")):
            if ref not in rows[S_list[0]]["student"]:
                continue
            m = [rows[S]["student"][ref]["gap_mean"]["mean"] for S in S_list]
            e = [2 * (rows[S]["student"][ref]["gap_mean"]["se"] or 0) for S in S_list]
            axes[0].errorbar(S_list, m, e, ls=ls, c=c, marker="o", capsize=3, label=f"({setup}) student {ref}")
            b = [rows[S]["teacher_S_ddim_steps"][ref]["gap_mean"] for S in S_list]
            axes[0].plot(S_list, b, ls=":", c=c, marker="s", alpha=0.6, label=f"({setup}) teacher, S DDIM steps {ref}")
            sw = [rows[S]["student"][ref]["mode_switch_fraction"]["mean"] for S in S_list]
            axes[1].plot(S_list, sw, ls=ls, c=c, marker="o", label=f"({setup}) student {ref}")
        for S in S_list:
            cur = rows[S]["curve"]
            axes[2].errorbar(list(cur), [v["mean"] for v in cur.values()], [2 * (v["se"] or 0) for v in cur.values()],
                             ls=ls, marker=".", capsize=2, label=f"({setup}) S = {S}")
    S_list = list(p["S"])
    axes[0].axhline(res["teacher"]["vs_exact"]["gap_mean"], c="k", lw=0.8, label="teacher network vs exact ODE")
    axes[0].set(xscale="log", yscale="log", xlabel="student steps S", ylabel="gap E‖x − x_ref‖²/d (± 2 s.e.)",
                title="teacher gap")
    axes[1].set(xscale="log", xlabel="student steps S", ylabel="fraction", title="samples in another mode than the ref")
    axes[2].set(yscale="log", xlabel="iteration", ylabel="gap to the set-up's reference (1024 samples)",
                title="training curves")
    for a in axes[:2]:
        a.set_xticks(S_list, [str(S) for S in S_list])
        a.set_xticks([], minor=True)
    for a in axes:
        a.legend(fontsize=6)
    fig.suptitle(f"MCM-CD on {p['data']}, aDDIM teacher step, {p['iters']} iterations, {len(p['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    common.cli(main, __doc__)
