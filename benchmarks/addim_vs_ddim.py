"""Claim 3: aDDIM fixes DDIM's over-smoothing (Heek et al., arXiv:2403.06807v3, Sec. 3, Eqs. 10–14, Fig. 3).

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

and report, through `data.metrics.report` at 16384 samples: the variance ratio tr Cov(samples)/tr Cov(data), the
data's from its closed form (Σ_k w_k‖μ_k − μ̄‖² + d·std²); the paired gap to the exact ODE from the same noise and the
energy test against it (the ODE is what every arm approximates); and the distances to data beside the floor of
fresh data. For the Gaussian dataset every sampler but aDDIM is linear in the
noise, so its output variance has a closed form too (the squared gain), printed beside the sampled one.

    python -m benchmarks.addim_vs_ddim [--quick] [--out docs/results/addim_vs_ddim]   (--quick writes *_quick.*)
"""
import time

import torch

from algorithms import addim, edm
from benchmarks import common
from data import metrics, toy

# Every number comes from a `metrics.report` (an energy test with 200 permutations and two distances to data), 11
# per seed and dataset: hence three datasets, three budgets and 3 seeds.
FULL = dict(data=("ring8", "two_modes", "gaussian"), nfe=(2, 8, 32), seeds=(0, 1, 2), n_eval=16384, n_data=16384,
            n_xvar=4096)
QUICK = dict(data=("gaussian",), nfe=(2, 8), seeds=(0, 1), n_eval=256, n_data=None, n_xvar=256)
ARMS = ("DDIM", "aDDIM analytic", "aDDIM η=0.75", "Heun (Karras)")


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
    a = common.assign(ds)
    per_seed = []
    for seed in p["seeds"]:
        g = torch.Generator().manual_seed(30_000 + seed)
        noise = torch.randn(p["n_eval"], ds.dim, dtype=torch.float64, generator=g)
        x_est, _ = ds.sample(p["n_xvar"], g)      # separate data for the empirical x_var (Alg. 3 precomputes it)
        x_data, x_fresh = common.data_sets(ds, seed, p["n_eval"], p["n_data"]) if p["n_data"] else (None, None)
        x_ode = ds.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)  # the sampler every arm approximates
        r = {"ode": {"var_ratio": tvar(x_ode) / var_data},
             "floor": {"var_ratio": None if x_fresh is None else tvar(x_fresh) / var_data}}
        for arm in ARMS:
            for n in p["nfe"]:
                x, nfe = run_sampler(arm, ds, noise, n, x_est, g)
                r[f"{arm}@{n}"] = None if x is None else {
                    "nfe": nfe, "var_ratio": tvar(x) / var_data,
                    **metrics.report(x, x_ode, a, x_data, x_fresh)}
        per_seed.append(r)
    rows = {}
    for key in per_seed[0]:
        if per_seed[0][key] is None:
            rows[key] = None
            continue
        rows[key] = {m: common.mean_se([r[key][m] for r in per_seed]) for m, v in per_seed[0][key].items()
                     if m not in ("nfe", "n") and v is not None}
        if "nfe" in per_seed[0][key]:
            rows[key]["nfe"] = per_seed[0][key]["nfe"]
    closed = ({f"{arm}@{n}": gaussian_closed_form(ds, arm, n) for arm in ARMS for n in p["nfe"]}
              if name == "gaussian" else None)
    return {"rows": rows, "closed_form_var_ratio": closed, "data_trace_cov": var_data, "per_seed": per_seed}


def tvar(x):
    """tr Cov of a sample set [N, d]."""
    return x.to(torch.float64).var(0).sum().item()


def cell(s, spec):
    return "—" if s is None else common.fmt(s, spec)


def print_tables(name, p, res):
    rows, closed = res["rows"], res["closed_form_var_ratio"]
    for metric, spec, what in (("var_ratio", ".3f", "variance ratio tr Cov / tr Cov(data)"),
                               ("gap_mean", ".1e", "gap to the exact ODE E‖x − x_ODE‖²/d"),
                               ("energy_to_ode", ".1e", "energy distance to the exact ODE's samples"),
                               ("energy_to_data", ".1e", "energy distance to data")):
        if rows[f"{ARMS[0]}@{p['nfe'][0]}"].get(metric) is None:
            continue
        print(f"\n{name}: {what}, mean ± s.e. over {len(p['seeds'])} noise seeds (Heun: NFE = budget − 1)")
        print(f"{'NFE':>4} | " + " | ".join(f"{a:>17}" for a in ARMS))
        for n in p["nfe"]:
            print(f"{n:>4} | " + " | ".join(
                f"{cell(None if rows[f'{a}@{n}'] is None else rows[f'{a}@{n}'][metric], spec):>17}" for a in ARMS))
        if metric == "var_ratio":
            print(f"exact ODE: {cell(rows['ode'][metric], spec)}   fresh data: {cell(rows['floor'].get(metric), spec)}")
        if metric == "energy_to_data":
            first = rows[f"{ARMS[0]}@{p['nfe'][0]}"]
            print(f"fresh data (floor): {cell(first['energy_data_floor'], spec)}")
    if closed:
        print(f"{name}: closed-form variance ratio of the linear samplers (data: std² per dimension)")
        for n in p["nfe"]:
            cells = ("—" if closed[f"{a}@{n}"] is None else format(closed[f"{a}@{n}"], ".4f") for a in ARMS)
            print(f"{n:>4} | " + " | ".join(f"{c:>17}" for c in cells))


def plot(path, results, p):
    import matplotlib.pyplot as plt

    metrics_ = (("var_ratio", "tr Cov / tr Cov(data)"), ("gap_mean", "gap to the exact ODE"),
                ("energy_to_ode", "energy distance to exact-ODE samples"))
    fig, axes = plt.subplots(len(metrics_), len(results), figsize=(4 * len(results), 3.3 * len(metrics_)),
                             squeeze=False)
    styles = dict(zip(ARMS, ("o-", "s-", "^-", "D-")))
    for j, (name, res) in enumerate(results.items()):
        rows = res["rows"]
        for i, (metric, label) in enumerate(metrics_):
            ax = axes[i, j]
            for arm in ARMS:
                pts = [(rows[f"{arm}@{n}"]["nfe"], rows[f"{arm}@{n}"][metric]) for n in p["nfe"] if rows[f"{arm}@{n}"]]
                ax.errorbar([q[0] for q in pts], [q[1]["mean"] for q in pts], [2 * (q[1]["se"] or 0) for q in pts],
                            fmt=styles[arm], ms=4, capsize=2, label=arm)
            if metric == "var_ratio":
                ax.axhline(1.0, c="0.6", ls="--", lw=0.8, label="data")
                ax.set_ylim(0.1, 10)  # clipped: few-step Heun (up to ~10⁴) is in the table
            if metric == "energy_to_ode":
                ax.set_yscale("symlog", linthresh=1e-4)
            else:
                ax.set_yscale("log")
            ax.set(xscale="log", xlabel="NFE", ylabel=label + " (± 2 s.e.)", title=name)
            ax.set_xticks(list(p["nfe"]), [str(n) for n in p["nfe"]])
            ax.set_xticks([], minor=True)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("DDIM vs aDDIM vs Heun with the exact denoiser (Heek et al. Sec. 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(quick=False, out="docs/results/addim_vs_ddim"):
    p = QUICK if quick else FULL
    t0 = time.time()
    results = {name: run_dataset(p, name) for name in p["data"]}
    wall = time.time() - t0
    for name, res in results.items():
        print_tables(name, p, res)
    res = {"claim": "Heek et al. Sec. 3 / Fig. 3: aDDIM fixes DDIM's over-smoothing; aDDIM ≈ Heun ≥ DDIM",
           "settings": p, "arms": ARMS, "datasets": results, "wall_time_s": wall}
    return common.write(out, "addim_vs_ddim", quick, res, lambda path: plot(path, results, p))


if __name__ == "__main__":
    common.cli(main, __doc__)
