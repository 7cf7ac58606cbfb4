"""Claim 5: which teacher step is best for MCM (Heek et al., arXiv:2403.06807v3, Table 4).

The paper distils MCM students on ImageNet64 with the teacher step t → s of Alg. 1 taken by DDIM or by aDDIM
(Eq. 14) and finds aDDIM better for S ≥ 4 (FID 1.68 vs 1.77 at S = 4, 1.58 vs 1.70 at S = 8) and DDIM better at
S = 1–2 (3.91 vs 4.35, 1.99 vs 2.02). Here both arms distil the same EDM network teacher in set-up (ii) (students
initialised from it, benchmarks/common.py) with the budget, seeds and evaluation noise of `mcm_steps` (claim 2),
toggling only `mcm.Config.addim_teacher`. Each student is measured three ways, from the same noise:

    against its own target  the teacher chained with N_end = 1280 of the arm's own steps (DDIM; or aDDIM with
                            Alg. 3's x_var, η = 0.75): what a perfect student of that arm would produce
    against the teacher's ODE  what the teacher network itself computes
    against the exact ODE      the ground truth

The aDDIM arm is claim 2's set-up (ii) runs (shared through common.CACHE).

    python -m benchmarks.mcm_teacher_step [--quick] [--out docs/results/mcm_teacher_step]
"""
import time

from benchmarks import common, mcm_steps

ARMS = ("DDIM", "aDDIM")
# Claim 2's settings at S = 1, 4 and 8 (S = 2 was not run, for time).
FULL = dict(mcm_steps.FULL, S=(1, 4, 8))
REFS = ("vs_own_target", "vs_teacher", "vs_exact")


def main(quick=False, out="docs/results/mcm_teacher_step"):
    p = mcm_steps.QUICK if quick else FULL
    t0 = time.time()
    refs = mcm_steps.references(p)
    rows = {}
    for S in p["S"]:
        runs = {arm: [mcm_steps.run(p, refs, "ii", S, seed, arm) for seed in p["seeds"]] for arm in ARMS}
        r = {arm: mcm_steps.summarise(runs[arm]) for arm in ARMS}
        # paired by seed (the same initial weights, data order and noise in both arms)
        r["aDDIM_minus_DDIM"] = {ref: common.mean_se([a[ref]["gap_mean"] - d[ref]["gap_mean"]
                                                      for a, d in zip(runs["aDDIM"], runs["DDIM"])]) for ref in REFS}
        rows[S] = r
    res = {"claim": "Heek et al. Table 4: the aDDIM teacher step beats DDIM for S >= 4", "settings": p,
           "targets_vs_exact": {arm: mcm_steps.metrics.report(t, refs["exact"][:len(t)], common.assign(refs["ds"]))
                                for arm, t in refs["targets"].items()},
           "targets_vs_teacher": {arm: mcm_steps.metrics.report(t, refs["teacher"][:len(t)],
                                                                common.assign(refs["ds"]))
                                  for arm, t in refs["targets"].items()},
           "rows": rows, "wall_time_s": time.time() - t0}
    print(f"\nMCM-CD on {p['data']}, set-up (ii), {p['iters']} iterations, seeds {list(p['seeds'])}: gap mean ± s.e.")
    for S, r in rows.items():
        print(f"  S = {S}: " + "  ".join(f"{ref}: DDIM {common.fmt(r['DDIM'][ref]['gap_mean'])} aDDIM "
                                         f"{common.fmt(r['aDDIM'][ref]['gap_mean'])}" for ref in REFS))
    return common.write(out, "mcm_teacher_step", quick, res, lambda path: plot(path, res, p))


def plot(path, res, p):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    S_list = list(p["S"])
    for a, ref in zip(axes, REFS):
        for arm, c in zip(ARMS, ("tab:blue", "tab:orange")):
            m = [res["rows"][S][arm][ref]["gap_mean"]["mean"] for S in S_list]
            e = [2 * (res["rows"][S][arm][ref]["gap_mean"]["se"] or 0) for S in S_list]
            a.errorbar(S_list, m, e, marker="o", capsize=3, c=c, label=f"{arm} teacher step (± 2 s.e.)")
        a.set(xscale="log", yscale="log", xlabel="student steps S", ylabel="gap E‖x − x_ref‖²/d",
              title={"vs_own_target": "against the arm's own chained target", "vs_teacher": "against the teacher's ODE",
                     "vs_exact": "against the exact ODE"}[ref])
        a.set_xticks(S_list, [str(S) for S in S_list])
        a.set_xticks([], minor=True)
        a.legend(fontsize=7)
    fig.suptitle(f"MCM teacher step, set-up (ii), {p['data']}, {p['iters']} iterations, {len(p['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    common.cli(main, __doc__)
