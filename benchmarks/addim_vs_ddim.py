"""Claim 3 of issue 8: aDDIM fixes DDIM's over-smoothing (Heek et al., arXiv:2403.06807v3, Sec. 3, Eqs. 10–14, Fig. 3).

The paper: DDIM steps with the posterior mean x̂ = E[x|x_t], so each step's iterate is short by tr Var[x_s|x_t] in
squared norm (Eqs. 12–13) and samples come out over-smoothed; aDDIM adds that variance back along ε̂ at no extra
network call (Eq. 14) and, on ImageNet, matches or beats Heun at equal NFE where DDIM is worst (Fig. 3).

With a toy's exact denoiser there is no training and no network error, so only the samplers differ. At equal NFE we
compare, from the same noise:

    DDIM            addim.sample with x_var = 0, on the paper's cosine grid (addim.time_grid)
    aDDIM analytic  x_var = 0.1/(2 + SNR) (Sec. 3)
    aDDIM η = 0.75  x_var = 0.75·E‖x − x̂‖²/d measured on data per step (Alg. 3, addim.estimate_x_var)
    aDDIM η = 1     the same without the safety factor: the exact average posterior variance (Eq. 13's)
    Euler (Karras)  DDIM's update (= one Euler step, EDM Alg. 1 l. 5) on EDM's grid: separates sampler from grid
    Heun (Karras)   edm.sample, NFE = 2N − 1: at a budget of n NFE it gets N = n/2 steps, i.e. n − 1 NFE

and report the sliced Wasserstein-2 distance to data and the variance ratio tr Cov(samples)/tr Cov(data), the data's
from its closed form (Σ_k w_k‖μ_k − μ̄‖² + d·std²). For the Gaussian dataset every sampler but aDDIM is linear in the
noise, so its output variance has a closed form too (the squared gain), printed beside the sampled one.

    python -m benchmarks.addim_vs_ddim [--quick] [--out docs/results/addim_vs_ddim]   (--quick writes *_quick.*)
"""
import argparse
import json
import os
import time

import torch

from algorithms import addim, edm
from data import metrics, toy

# Sorting for SW2 dominates the cost (38 distances per seed and dataset), hence 3 seeds and 8192 samples per sampler.
FULL = dict(data=("ring8", "spiral", "two_modes", "gaussian"), nfe=(2, 4, 8, 16, 32, 64), seeds=(0, 1, 2),
            n_eval=8192, n_data=16384, n_xvar=4096)
QUICK = dict(data=("ring8", "gaussian"), nfe=(2, 8), seeds=(0, 1), n_eval=1024, n_data=4096, n_xvar=1024)
ARMS = ("DDIM", "aDDIM analytic", "aDDIM η=0.75", "aDDIM η=1", "Euler (Karras)", "Heun (Karras)")


def data_variance(ds):
    """tr Cov of the mixture, in closed form: Σ_k w_k‖μ_k − μ̄‖² + d·std² (law of total variance)."""
    w = ds.log_w.exp()
    mean = w @ ds.means
    return (w * (ds.means - mean).square().sum(1)).sum().item() + ds.dim * ds.std**2


def euler_karras(D, noise, n):
    """n Euler (= DDIM) steps on EDM's Karras grid plus σ = 0 (EDM Alg. 1 without the correction): n NFE."""
    sigmas = torch.cat([edm.sigma_grid(n), torch.zeros(1, dtype=torch.float64)])
    x = noise.to(torch.float64) * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        x = edm.euler_step(D, x, t_cur, t_next)
    return x


@torch.no_grad()
def run_sampler(arm, ds, noise, n, x_est, g):
    """The samples of one arm at a budget of n NFE, and the NFE actually spent (None if the arm cannot run at n)."""
    D, cfg = ds.denoiser, addim.Config(num_steps=n)
    if arm == "DDIM":
        return addim.sample(cfg, D, noise, x_var=torch.zeros(n, dtype=torch.float64)), n
    if arm == "aDDIM analytic":
        return addim.sample(cfg, D, noise), n
    if arm in ("aDDIM η=0.75", "aDDIM η=1"):
        eta = 0.75 if arm == "aDDIM η=0.75" else 1.0
        x_var = addim.estimate_x_var(D, x_est, addim.time_grid(n)[:-1], eta=eta, generator=g)  # Alg. 3, on data
        return addim.sample(cfg, D, noise, x_var=x_var), n
    if arm == "Euler (Karras)":
        return euler_karras(D, noise, n), n
    if n < 4:  # Heun: edm.sample needs N ≥ 2 levels, NFE = 2N − 1 = 3 > 2
        return None, None
    return edm.sample(edm.Config(), D, noise, num_steps=n // 2), 2 * (n // 2) - 1


@torch.no_grad()
def gaussian_closed_form(ds, arm, n):
    """Output variance per dimension of a linear sampler on N(0, std²I) data: x_0 = gain·noise, so Var = gain²."""
    one = torch.ones(1, ds.dim, dtype=torch.float64)
    if arm == "DDIM":
        x = addim.sample(addim.Config(num_steps=n), ds.denoiser, one, x_var=torch.zeros(n, dtype=torch.float64))
    elif arm == "Euler (Karras)":
        x = euler_karras(ds.denoiser, one, n)
    elif arm == "Heun (Karras)" and n >= 4:
        x = edm.sample(edm.Config(), ds.denoiser, one, num_steps=n // 2)
    else:
        return None  # aDDIM rescales by ‖ε̂‖: not linear in the noise
    return x[0, 0].item() ** 2 / ds.std**2


def run_dataset(p, name):
    ds = toy.DATASETS[name]()
    var_data = data_variance(ds)
    per_seed = []
    for seed in p["seeds"]:
        g = torch.Generator().manual_seed(30_000 + seed)
        noise = torch.randn(p["n_eval"], ds.dim, dtype=torch.float64, generator=g)
        x_data, _ = ds.sample(p["n_data"], g)
        x_est, _ = ds.sample(p["n_xvar"], g)      # separate data for the empirical x_var (Alg. 3 precomputes it)
        x_fresh, _ = ds.sample(p["n_eval"], g)
        x_ode = ds.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)  # the sampler every arm approximates
        r = {"ode": {"sw2": metrics.sliced_wasserstein(x_ode, x_data), "var_ratio": tvar(x_ode) / var_data},
             "floor": {"sw2": metrics.sliced_wasserstein(x_fresh, x_data), "var_ratio": tvar(x_fresh) / var_data}}
        for arm in ARMS:
            for n in p["nfe"]:
                x, nfe = run_sampler(arm, ds, noise, n, x_est, g)
                r[f"{arm}@{n}"] = None if x is None else {
                    "nfe": nfe, "sw2": metrics.sliced_wasserstein(x, x_data), "var_ratio": tvar(x) / var_data,
                    "ode_gap": metrics.teacher_gap(x, x_ode)}
        per_seed.append(r)
    rows = {}
    for key in per_seed[0]:
        if per_seed[0][key] is None:
            rows[key] = None
            continue
        rows[key] = {m: stat([r[key][m] for r in per_seed]) for m in per_seed[0][key] if m != "nfe"}
        if "nfe" in per_seed[0][key]:
            rows[key]["nfe"] = per_seed[0][key]["nfe"]
    closed = ({f"{arm}@{n}": gaussian_closed_form(ds, arm, n) for arm in ARMS for n in p["nfe"]}
              if name == "gaussian" else None)
    return {"rows": rows, "closed_form_var_ratio": closed, "data_trace_cov": var_data}


def tvar(x):
    """tr Cov of a sample set [N, d]."""
    return x.to(torch.float64).var(0).sum().item()


def stat(values):
    v = torch.tensor(values, dtype=torch.float64)
    return {"mean": v.mean().item(), "std": v.std(unbiased=False).item()}


def cell(s, spec):
    return "—" if s is None else f"{s['mean']:{spec}}±{s['std']:{spec}}"


def print_tables(name, p, res):
    rows, closed = res["rows"], res["closed_form_var_ratio"]
    for metric, spec, what in (("sw2", ".4f", "SW2 to data"),
                               ("var_ratio", ".3f", "variance ratio tr Cov / tr Cov(data)"),
                               ("ode_gap", ".1e", "gap to the exact ODE E‖x − x_ODE‖²/d")):
        print(f"\n{name}: {what}, mean ± std over {len(p['seeds'])} noise seeds (Heun: NFE = budget − 1)")
        print(f"{'NFE':>4} | " + " | ".join(f"{a:>17}" for a in ARMS))
        for n in p["nfe"]:
            print(f"{n:>4} | " + " | ".join(
                f"{cell(None if rows[f'{a}@{n}'] is None else rows[f'{a}@{n}'][metric], spec):>17}" for a in ARMS))
        if metric != "ode_gap":
            print(f"exact ODE: {cell(rows['ode'][metric], spec)}   fresh data: {cell(rows['floor'][metric], spec)}")
    if closed:
        print(f"{name}: closed-form variance ratio of the linear samplers (data: std² per dimension)")
        for n in p["nfe"]:
            cells = ("—" if closed[f"{a}@{n}"] is None else format(closed[f"{a}@{n}"], ".4f") for a in ARMS)
            print(f"{n:>4} | " + " | ".join(f"{c:>17}" for c in cells))


def plot(path, results, p):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 7), squeeze=False)
    styles = dict(zip(ARMS, ("o-", "s-", "^-", "v--", "x:", "D-")))
    for j, (name, res) in enumerate(results.items()):
        rows = res["rows"]
        for i, (metric, label) in enumerate((("sw2", "SW2 to data"), ("var_ratio", "tr Cov / tr Cov(data)"))):
            ax = axes[i, j]
            for arm in ARMS:
                pts = [(rows[f"{arm}@{n}"]["nfe"], rows[f"{arm}@{n}"][metric]) for n in p["nfe"] if rows[f"{arm}@{n}"]]
                ax.errorbar([q[0] for q in pts], [q[1]["mean"] for q in pts], [q[1]["std"] for q in pts],
                            fmt=styles[arm], ms=4, capsize=2, label=arm)
            ax.axhline(rows["ode"][metric]["mean"], c="k", lw=0.8, label="exact ODE")
            if metric == "sw2":
                ax.axhline(rows["floor"][metric]["mean"], c="tab:red", ls="-.", lw=0.8, label="fresh data")
                ax.set_yscale("log")
                ax.set_ylim(top=1.0)  # clipped: few-step Heun (up to ~40) is in the table
            else:
                ax.axhline(1.0, c="0.6", ls="--", lw=0.8)
                ax.set_yscale("log")  # a ratio: ×2 too wide and ×2 too narrow are equally far from 1
                ax.set_ylim(0.1, 10)  # clipped: few-step Euler (≈ 0) and Heun (up to ~10⁴) are in the table
            ax.set(xscale="log", xlabel="NFE", ylabel=label, title=f"{name}")
            ax.set_xticks(list(p["nfe"]), [str(n) for n in p["nfe"]])
            ax.set_xticks([], minor=True)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("DDIM vs aDDIM vs Heun with the exact denoiser (Heek et al. Sec. 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(quick=False, out="docs/results/addim_vs_ddim"):
    torch.set_num_threads(1)  # BENCH.md: 2 shared cores
    p = QUICK if quick else FULL
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    results = {name: run_dataset(p, name) for name in p["data"]}
    wall = time.time() - t0
    for name, res in results.items():
        print_tables(name, p, res)
    print(f"\nwall time {wall:.0f}s")
    name = os.path.join(out, "addim_vs_ddim_quick" if quick else "addim_vs_ddim")  # quick never overwrites full
    with open(name + ".json", "w") as f:
        json.dump({"claim": "Heek et al. Sec. 3 / Fig. 3: aDDIM fixes DDIM's over-smoothing; aDDIM ≈ Heun ≥ DDIM",
                   "settings": p, "arms": ARMS, "datasets": results, "wall_time_s": wall}, f, indent=2)
    print(f"wrote {plot(name + '.png', results, p)} and {name}.json")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds (CI)")
    ap.add_argument("--out", default="docs/results/addim_vs_ddim")
    a = ap.parse_args()
    main(a.quick, a.out)
