"""Claim 2 of issue 8: multistep consistency models trade steps for quality (Heek et al., arXiv:2403.06807v3, Table 1).

The paper distils one MCM student per S ∈ {1, 2, 4, 8, 16} from the same diffusion teacher with the same budget and
finds FID falling with S towards the teacher's (aDDIM, 512 steps): large IN64 CD 3.2 / 1.9 / 1.6 / 1.4 at S = 1, 2,
4, 8 against the teacher's 1.4. Here the teacher is a toy's exact denoiser, so two questions have exact answers:

    teacher gap   E‖x_S − x_ODE‖²/d   the S-step student against the exact PF-ODE from the same noise
    SW2 to data   sliced Wasserstein-2 to held-out data, against the teacher's own (exact ODE, and aDDIM-512)

Every S trains for the same iterations, batch and learning rate (train.py's MCM recipe: Adam 1e-3, batch 256,
teacher steps annealed 64 → 1280 over half the run, evaluation EMA), over several seeds; the teacher sampled with
S plain DDIM steps is the untrained baseline at the same NFE. Each run's metrics are cached in
runs/benchmark_cache/ (git-ignored), where `mcm_teacher_step` (claim 5) finds its aDDIM arm.

    python -m benchmarks.mcm_steps [--quick] [--out docs/results/mcm_steps]     (--quick writes *_quick.{json,png})
"""
import argparse
import hashlib
import json
import os
import time

import torch

from algorithms import addim, edm, mcm
from benchmarks import common
from data import metrics, toy

# n_eval generated samples per generator against n_data held-out data points. SW2 between two-mode sets is dominated
# by how many samples land in each mode (W2² ≈ mass moved × distance², and the mass imbalance only falls like
# n^(-1/2)), so the data side is large and the SW2 of n_eval fresh data points is reported as the floor.
# Two seeds, 0 and 2: seed 1 was dropped to fit the shared machine's time budget (each run is ~25 s of CPU on an idle
# core, but took ~3 min of wall time under contention).
FULL = dict(data=("two_modes", "ring8"), S=(1, 2, 4, 8), seeds=(0, 2), iters=1500, batch=256, lr=1e-3,
            n_eval=16384, n_data=65536)
QUICK = dict(data=("two_modes",), S=(1, 2), seeds=(0, 1), iters=60, batch=128, lr=1e-3, n_eval=512, n_data=4096)

CACHE = "runs/benchmark_cache"  # per-run metrics (git-ignored), shared by mcm_steps and mcm_teacher_step
# The sources a run's numbers depend on: editing any of them changes the cache key, so stale runs are never reused.
SOURCES = ("algorithms/mcm.py", "algorithms/addim.py", "algorithms/edm.py", "data/toy.py", "data/metrics.py",
           "networks/mlp.py", "benchmarks/common.py")


def code_fingerprint():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for name in SOURCES:
        with open(os.path.join(root, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:10]


def eval_set(dataset, seed, n, n_data):
    """The noise every generator of this seed starts from, and held-out data (both float64, seeded)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn(n, dataset.dim, dtype=torch.float64, generator=g)
    x_data, _ = dataset.sample(n_data, g)
    return noise, x_data


@torch.no_grad()
def teacher_reference(dataset, seed, noise, x_data):
    """The teacher's own numbers: the exact PF-ODE (σ_max → σ_min, the gap's reference) and aDDIM with 512 steps
    (Table 1's teacher row; analytic x_var), plus the SW2 floor of two independent data sets of this size."""
    x_ode = dataset.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)
    x_addim = addim.sample(addim.Config(num_steps=512), dataset.denoiser, noise)
    x_other, _ = dataset.sample(len(noise), torch.Generator().manual_seed(20_000 + seed))
    return x_ode, {"ode_sw2": metrics.sliced_wasserstein(x_ode, x_data),
                   "addim512_sw2": metrics.sliced_wasserstein(x_addim, x_data),
                   "addim512_gap": metrics.teacher_gap(x_addim, x_ode),
                   "data_floor_sw2": metrics.sliced_wasserstein(x_other, x_data)}


@torch.no_grad()
def ddim_baseline(dataset, S, noise, x_ode, x_data):
    """The untrained teacher at the student's NFE: S DDIM steps on the student's own time grid (x_var = 0)."""
    x = addim.sample(addim.Config(num_steps=S), dataset.denoiser, noise, x_var=torch.zeros(S, dtype=torch.float64))
    return {"gap": metrics.teacher_gap(x, x_ode), "sw2": metrics.sliced_wasserstein(x, x_data)}


def train_and_eval(p, dataset, S, seed, addim_teacher, noise, x_ode, x_data):
    """One MCM-CD student (Alg. 1) at S steps, trained with the shared toy loop; its S-step (Alg. 2) metrics."""
    cfg = mcm.Config(S=S, anneal_iters=p["iters"] // 2, addim_teacher=addim_teacher)  # App. A.1: anneal half the run

    def loss_fn(net, net_ema, x, step, g):  # MCM has no target network: its stop-gradient target is `net` itself
        return mcm.loss(cfg, net, dataset.denoiser, x, step=step, generator=g)

    ema, log = common.train(loss_fn, dataset, p["iters"], seed=seed, batch=p["batch"], lr=p["lr"])
    x = mcm.sample(cfg, ema, noise)
    return {"gap": metrics.teacher_gap(x, x_ode), "sw2": metrics.sliced_wasserstein(x, x_data),
            "s_per_iter": log["s_per_iter"], "final_loss": log["loss"][-1][1]}


def run_arm(p, data, addim_teacher, cache=CACHE):
    """Per-seed results {seed: {"teacher": ..., "S": {S: student and baseline metrics}}} for one dataset and one
    teacher step (aDDIM, as Alg. 1, or DDIM). Each run's metrics are kept in `cache` (a folder; None: off), keyed by
    everything that determines them (settings and the sources' fingerprint), so claim 5's aDDIM arm and a rerun reuse
    claim 2's runs instead of retraining."""
    dataset = toy.DATASETS[data]()
    out = {}
    for seed in p["seeds"]:
        noise, x_data = eval_set(dataset, seed, p["n_eval"], p["n_data"])
        x_ode, ref = teacher_reference(dataset, seed, noise, x_data)
        out[seed] = {"teacher": ref, "S": {}}
        for S in p["S"]:
            t0 = time.time()
            key = dict(data=data, S=S, seed=seed, addim_teacher=addim_teacher,
                       **{k: p[k] for k in ("iters", "batch", "lr", "n_eval", "n_data")}, code=code_fingerprint())
            path = cache and os.path.join(cache, "mcm_" + "_".join(f"{k}{v}" for k, v in key.items()) + ".json")
            cached = bool(path) and os.path.exists(path)
            if cached:
                with open(path) as f:
                    r = json.load(f)
            else:
                r = train_and_eval(p, dataset, S, seed, addim_teacher, noise, x_ode, x_data)
                r["ddim_teacher_at_S"] = ddim_baseline(dataset, S, noise, x_ode, x_data)
                if path:
                    os.makedirs(cache, exist_ok=True)
                    with open(path + ".tmp", "w") as f:
                        json.dump(r, f)
                    os.replace(path + ".tmp", path)  # atomic: a concurrent reader never sees half a file
            out[seed]["S"][S] = r
            took = "(cached)" if cached else f"({time.time() - t0:.0f}s, {1e3 * r['s_per_iter']:.1f} ms/iter)"
            print(f"  {data}, {'aDDIM' if addim_teacher else 'DDIM'} teacher step, seed {seed}, S = {S}: "
                  f"gap {r['gap']:.3e}  SW2 {r['sw2']:.4f}  {took}", flush=True)
    return out


def stat(values):
    """mean and std over seeds (population std; 0 for one seed)."""
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": v.mean().item(), "std": v.std(unbiased=False).item(), "values": list(values)}


def fmt(s, spec=".4f"):
    return f"{s['mean']:{spec}} ± {s['std']:{spec.lstrip('+')}}"


def summarise(per_seed, S_list):
    """Mean ± std over seeds of every student metric, of the DDIM baseline and of the teacher's numbers."""
    seeds = list(per_seed)
    rows = {S: {k: stat([per_seed[s]["S"][S][k] for s in seeds]) for k in ("gap", "sw2")} for S in S_list}
    for S in S_list:
        for k in ("gap", "sw2"):
            rows[S][f"ddim_{k}"] = stat([per_seed[s]["S"][S]["ddim_teacher_at_S"][k] for s in seeds])
        rows[S]["sw2_minus_teacher"] = stat([per_seed[s]["S"][S]["sw2"] - per_seed[s]["teacher"]["ode_sw2"]
                                             for s in seeds])
    teacher = {k: stat([per_seed[s]["teacher"][k] for s in seeds]) for k in per_seed[seeds[0]]["teacher"]}
    return rows, teacher


def plot(path, results, S_list, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.8 * len(results)), squeeze=False)
    for (a1, a2), (data, r) in zip(axes, results.items()):
        rows, teacher = r["rows"], r["teacher"]
        m = lambda key: [rows[S][key]["mean"] for S in S_list]
        e = lambda key: [rows[S][key]["std"] for S in S_list]
        a1.errorbar(S_list, m("gap"), e("gap"), marker="o", capsize=3, label="MCM-CD student (S steps)")
        a1.plot(S_list, m("ddim_gap"), "s--", c="0.5", label="teacher, S DDIM steps (no training)")
        a1.axhline(teacher["addim512_gap"]["mean"], c="tab:green", ls=":", label="teacher, aDDIM 512")
        a1.set(yscale="log", ylabel="teacher gap E‖x − x_ODE‖²/d", title=f"{data}: distance to the exact teacher ODE")
        a2.errorbar(S_list, m("sw2"), e("sw2"), marker="o", capsize=3, label="MCM-CD student (S steps)")
        a2.plot(S_list, m("ddim_sw2"), "s--", c="0.5", label="teacher, S DDIM steps")
        a2.axhline(teacher["ode_sw2"]["mean"], c="k", label="teacher, exact ODE")
        a2.axhline(teacher["addim512_sw2"]["mean"], c="tab:green", ls=":", label="teacher, aDDIM 512")
        a2.axhline(teacher["data_floor_sw2"]["mean"], c="tab:red", ls="-.", label="fresh data (SW2 floor)")
        a2.set(yscale="log", ylabel="SW2 to data", title=f"{data}: sample distance to data")
        for a in (a1, a2):
            a.set(xscale="log", xlabel="student steps S (= NFE)")
            a.set_xticks(S_list, [str(S) for S in S_list])
            a.set_xticks([], minor=True)
            a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(data, p, rows, teacher, arm="aDDIM"):
    print(f"\nMCM-CD on {data} (exact teacher), {arm} teacher step, {p['iters']} iterations per S, batch {p['batch']}, "
          f"lr {p['lr']}, seeds {list(p['seeds'])}; mean ± std over seeds")
    print(f"{'S':>3} | {'teacher gap':>21} | {'SW2 to data':>17} | {'SW2 − SW2(ODE)':>17} | "
          f"{'DDIM-S gap':>21} | {'DDIM-S SW2':>17}")
    for S in p["S"]:
        r = rows[S]
        print(f"{S:>3} | {fmt(r['gap'], '.3e'):>21} | {fmt(r['sw2']):>17} | {fmt(r['sw2_minus_teacher']):>17} | "
              f"{fmt(r['ddim_gap'], '.3e'):>21} | {fmt(r['ddim_sw2']):>17}")
    print(f"teacher: exact ODE SW2 {fmt(teacher['ode_sw2'])}; aDDIM-512 SW2 {fmt(teacher['addim512_sw2'])}, "
          f"gap to ODE {fmt(teacher['addim512_gap'], '.2e')}; fresh-data SW2 floor {fmt(teacher['data_floor_sw2'])}")


def to_json(per_seed):
    return {str(s): {"teacher": v["teacher"], "S": {str(S): r for S, r in v["S"].items()}} for s, v in per_seed.items()}


def main(quick=False, out="docs/results/mcm_steps"):
    torch.set_num_threads(1)  # BENCH.md: 2 shared cores
    p = QUICK if quick else FULL
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    results = {}
    for data in p["data"]:
        per_seed = run_arm(p, data, addim_teacher=True)
        rows, teacher = summarise(per_seed, p["S"])
        results[data] = {"rows": rows, "teacher": teacher, "per_seed": per_seed}
    wall = time.time() - t0
    for data, r in results.items():
        print_table(data, p, r["rows"], r["teacher"])
    print(f"wall time {wall:.0f}s")
    res = {"claim": "Heek et al. Table 1: MCM-CD quality improves with S towards the teacher's", "settings": p,
           "datasets": {data: {"rows": {str(S): r["rows"][S] for S in p["S"]}, "teacher": r["teacher"],
                               "per_seed": to_json(r["per_seed"])} for data, r in results.items()},
           "wall_time_s": wall}
    name = os.path.join(out, "mcm_steps_quick" if quick else "mcm_steps")  # quick never overwrites the full results
    with open(name + ".json", "w") as f:
        json.dump(res, f, indent=2)
    png = plot(name + ".png", results, list(p["S"]),
               f"MCM-CD vs S, exact teacher ({p['iters']} iters per S, {len(p['seeds'])} seeds)")
    print(f"wrote {png} and {name}.json")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds (CI)")
    ap.add_argument("--out", default="docs/results/mcm_steps")
    a = ap.parse_args()
    main(a.quick, a.out)
