"""Claim 5 of issue 8: which teacher step is best for MCM (Heek et al., arXiv:2403.06807v3, Table 4).

The paper distils MCM students on ImageNet64 with the teacher step t → s of Alg. 1 taken by DDIM or by aDDIM
(Eq. 14) and finds aDDIM better for S ≥ 4 (FID 1.68 vs 1.77 at S = 4, 1.58 vs 1.70 at S = 8, 1.54 vs 1.72 at 16) and
DDIM better at S = 1–2 (3.91 vs 4.35, 1.99 vs 2.02). Here both arms distil the same exact toy teacher with the same
budget, seeds and evaluation noise as `mcm_steps` (claim 2), toggling only `mcm.Config.addim_teacher`, and report
the S-step student's gap to the exact PF-ODE and its SW2 to data.

The aDDIM arm is claim 2's runs: both benchmarks keep each run's metrics in runs/benchmark_cache/ (mcm_steps.run_arm),
keyed by dataset, S, seed, teacher step and budget, so after `mcm_steps` this one trains only the DDIM arm.

    python -m benchmarks.mcm_teacher_step [--quick] [--out docs/results/mcm_teacher_step]   (--quick writes *_quick.*)
"""
import argparse
import json
import os
import time

import torch

from benchmarks import mcm_steps
from benchmarks.mcm_steps import fmt, stat

ARMS = {"DDIM": False, "aDDIM": True}  # name -> mcm.Config.addim_teacher
# Claim 2's settings; full mode on two_modes only (its ring8 aDDIM runs exist, but a ring8 DDIM arm would double the
# run time on the shared machine).
FULL = {**mcm_steps.FULL, "data": ("two_modes",)}
QUICK = mcm_steps.QUICK


def compare(per_arm, p):
    """Per dataset and S: mean ± std of each arm's gap and SW2, and of the paired per-seed difference aDDIM − DDIM."""
    out = {}
    for data in p["data"]:
        rows = {}
        for S in p["S"]:
            r = {}
            for arm in ARMS:
                for k in ("gap", "sw2"):
                    r[f"{arm}_{k}"] = stat([per_arm[arm][data][s]["S"][S][k] for s in p["seeds"]])
            for k in ("gap", "sw2"):
                r[f"diff_{k}"] = stat([per_arm["aDDIM"][data][s]["S"][S][k] - per_arm["DDIM"][data][s]["S"][S][k]
                                       for s in p["seeds"]])
            rows[S] = r
        out[data] = rows
    return out


def plot(path, rows, p, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.8 * len(rows)), squeeze=False)
    S_list = list(p["S"])
    for (a1, a2), (data, r) in zip(axes, rows.items()):
        for arm, c in zip(ARMS, ("tab:orange", "tab:blue")):
            for ax, k in ((a1, "gap"), (a2, "sw2")):
                ax.errorbar(S_list, [r[S][f"{arm}_{k}"]["mean"] for S in S_list],
                            [r[S][f"{arm}_{k}"]["std"] for S in S_list], marker="o", capsize=3, c=c,
                            label=f"{arm} teacher step")
        a1.set(yscale="log", ylabel="teacher gap E‖x − x_ODE‖²/d", title=f"{data}: gap to the exact teacher ODE")
        a2.set(ylabel="SW2 to data", title=f"{data}: sample distance to data")
        for a in (a1, a2):
            a.set(xscale="log", xlabel="student steps S (= NFE)")
            a.set_xticks(S_list, [str(S) for S in S_list])
            a.set_xticks([], minor=True)
            a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(quick=False, out="docs/results/mcm_teacher_step"):
    torch.set_num_threads(1)  # BENCH.md: 2 shared cores
    p = QUICK if quick else FULL  # claim 2's settings, so its runs can be shared
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    # The DDIM arm first: claim 2 (the aDDIM arm, in the shared cache) may run alongside.
    per_arm = {arm: {data: mcm_steps.run_arm(p, data, addim_teacher) for data in p["data"]}
               for arm, addim_teacher in (("DDIM", False), ("aDDIM", True))}
    wall = time.time() - t0
    rows = compare(per_arm, p)
    for data, r in rows.items():
        print(f"\nMCM-CD on {data} (exact teacher): DDIM vs aDDIM as the teacher step of Alg. 1; {p['iters']} "
              f"iterations per S, batch {p['batch']}, lr {p['lr']}, seeds {list(p['seeds'])}; mean ± std over seeds")
        print(f"{'S':>3} | {'gap, DDIM':>21} | {'gap, aDDIM':>21} | {'gap aDDIM − DDIM':>23} | {'SW2, DDIM':>15} | "
              f"{'SW2, aDDIM':>15} | {'SW2 aDDIM − DDIM':>17}")
        for S in p["S"]:
            x = r[S]
            print(f"{S:>3} | {fmt(x['DDIM_gap'], '.3e'):>21} | {fmt(x['aDDIM_gap'], '.3e'):>21} | "
                  f"{fmt(x['diff_gap'], '+.3e'):>23} | {fmt(x['DDIM_sw2']):>15} | {fmt(x['aDDIM_sw2']):>15} | "
                  f"{fmt(x['diff_sw2'], '+.4f'):>17}")
    print(f"wall time {wall:.0f}s (runs found in {mcm_steps.CACHE} are not retrained)")
    res = {"claim": "Heek et al. Table 4: aDDIM beats DDIM as MCM's teacher step for S >= 4, DDIM is better at S <= 2",
           "settings": p,
           "rows": {data: {str(S): r[S] for S in p["S"]} for data, r in rows.items()},
           "per_seed": {arm: {data: mcm_steps.to_json(v) for data, v in d.items()} for arm, d in per_arm.items()},
           "wall_time_s": wall}
    name = os.path.join(out, "mcm_teacher_step_quick" if quick else "mcm_teacher_step")  # quick never overwrites full
    with open(name + ".json", "w") as f:
        json.dump(res, f, indent=2)
    png = plot(name + ".png", rows, p, f"MCM teacher step: DDIM vs aDDIM ({p['iters']} iters per S, "
                                       f"{len(p['seeds'])} seeds)")
    print(f"wrote {png} and {name}.json")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds (CI)")
    ap.add_argument("--out", default="docs/results/mcm_teacher_step")
    a = ap.parse_args()
    main(a.quick, a.out)
