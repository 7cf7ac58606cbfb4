"""What the benchmarks share: the toy training loop, the EDM network teacher of set-up (ii), the evaluation sets, a
cache of finished runs, mean ± standard error over seeds, and the command line and output of every benchmark.

The training loop is `train.py`'s with everything a 2D toy does not need taken out (DDP, AMP, checkpoints, image
data): batches are drawn fresh from the dataset, the student is `networks.mlp.MLP`, and the algorithm enters only
through `loss_fn(net, net_ema, x, step, generator) -> per-example loss [B]`, a closure around the algorithm's pure
`loss`.

Two set-ups (docs/results.md):
    (i)  the exact teacher (the toy's closed-form denoiser), students from random weights: distilling ground truth;
    (ii) as in the papers: an EDM network teacher trained on the toy (`toy_teacher`), students initialised from it.
In (ii) a student is measured against the teacher network's own ODE (how well it distils) and against the exact
ODE (how good the result is); `ode` solves either to float64 accuracy from the same noise.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import time

import torch

from algorithms import edm
from data import toy
from networks.checkpoint import load_teacher_into_student
from networks.mlp import MLP

CACHE = "runs/benchmark_cache"  # finished runs (git-ignored), keyed by their settings and the code they depend on
# The algorithms, data and network a cached result depends on; the benchmarks' own files are not hashed, so a change
# to the training loop below must come with `rm -r runs/benchmark_cache`.
SOURCES = ("algorithms/edm.py", "algorithms/addim.py", "algorithms/mcm.py", "algorithms/cd.py", "data/toy.py",
           "data/metrics.py", "networks/mlp.py")


def code_fingerprint(sources=SOURCES):
    """A hash of the sources a cached result depends on: editing any of them invalidates the cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for name in sources:
        with open(os.path.join(root, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:10]


def cached(kind, key, compute, sources=SOURCES):
    """compute() -> a JSON-safe dict, or its stored copy from an earlier call with the same kind, key and sources."""
    digest = hashlib.sha1(json.dumps({**key, "code": code_fingerprint(sources)}, sort_keys=True).encode()).hexdigest()
    path = os.path.join(CACHE, f"{kind}-{digest[:16]}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = compute()
    os.makedirs(CACHE, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)  # atomic: a concurrent reader never sees half a file
    return out


def cached_tensor(kind, key, compute, sources=SOURCES):
    """compute() -> a tensor, or its stored copy (as `cached`, in a .pt file)."""
    digest = hashlib.sha1(json.dumps({**key, "code": code_fingerprint(sources)}, sort_keys=True).encode()).hexdigest()
    path = os.path.join(CACHE, f"{kind}-{digest[:16]}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    out = compute()
    os.makedirs(CACHE, exist_ok=True)
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


def mean_se(values):
    """Mean and standard error over seeds (None for one value), with the values themselves."""
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    se = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else None
    return {"mean": m, "se": se, "values": v}


def mean_sd(values):
    """(mean, sample standard deviation) of repeated measurements: their spread, not an interval for the mean."""
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1))


def fmt(s, spec=".3e"):
    """'mean ± s.e.' of a `mean_se` dict."""
    return f"{s['mean']:{spec}}" + ("" if s["se"] is None else f" ± {s['se']:{spec}}")


def cli(main, doc):
    """The command line every benchmark shares: `--quick` (a smoke run in seconds, for CI) and `--out`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (CI); its numbers mean nothing")
    p.add_argument("--out", default=None, help="output folder (default docs/results/<name>)")
    a = p.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread avoids OpenMP spin-waits on a shared machine
    return main(quick=a.quick, **({} if a.out is None else {"out": a.out}))


def write(out, name, quick, res, plot=None):
    """Write <out>/<name>.json (and <name>.png through plot(path)); a quick run writes <name>_quick.* instead, so it
    never overwrites the full results."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, name + ("_quick" if quick else ""))
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    written = [base + ".json"]
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        plot(base + ".png")
        written.append(base + ".png")
    print("wrote " + " and ".join(written), flush=True)
    return res


def eval_noise(dataset, seed, n):
    """The noise every generator of this seed starts from (unit variance, float64), from a seed of its own."""
    return torch.randn(n, dataset.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(10_000 + seed))


def data_sets(dataset, seed, n, n_data):
    """Held-out data (n_data samples) and a fresh set of n more, independent of each other and of the noise."""
    x_data, _ = dataset.sample(n_data, torch.Generator().manual_seed(20_000 + seed))
    x_fresh, _ = dataset.sample(n, torch.Generator().manual_seed(30_000 + seed))
    return x_data, x_fresh


@torch.no_grad()
def ode(D, noise, labels=None, steps_per_unit=20):
    """The PF-ODE solution σ_max → σ_min of denoiser D (exact or a network) from `noise`, in float64 (RK4 with
    `steps_per_unit` steps per unit of ln σ). For the exact two_modes denoiser 3 steps per unit are 3e-8 from 40,
    in teacher-gap units, so a network teacher's ODE (which costs a network call per stage) is solved with 3."""
    return toy.ode_solve(D, noise.to(torch.float64) * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN, labels,
                         steps_per_unit)


def assign(dataset):
    """The cluster map for `metrics.report`: the nearest mixture component; for a point set (std = 0), which of ten
    consecutive runs of its points the nearest point belongs to (neighbouring points are not different modes)."""
    if dataset.std > 0:
        return dataset.nearest_component
    K = len(dataset.means)
    return lambda x: dataset.nearest_component(x) * 10 // K


TEACHER = dict(iters=2000, batch=512, lr=1e-3)  # set-up (ii)'s EDM teacher on a toy (docs/results.md)


def toy_teacher(dataset, seed=0, iters=TEACHER["iters"], batch=TEACHER["batch"], lr=TEACHER["lr"]):
    """Set-up (ii)'s teacher: an EDM MLP denoiser (EDM Eq. 8 loss, Table 1 preconditioning) trained on `dataset`,
    returned as (raw network, D(x; σ, labels)). The weights are cached in CACHE as a state_dict, keyed by the
    settings and the sources of the loss, the network and the data (not of this file, which changes more often)."""
    key = dict(data=dataset.name, seed=seed, iters=iters, batch=batch, lr=lr,
               code=code_fingerprint(("algorithms/edm.py", "networks/mlp.py", "data/toy.py")))
    path = os.path.join(CACHE, "teacher-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
                        + ".pt")
    net = MLP(dim=dataset.dim)
    if os.path.exists(path):
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        cfg = edm.Config()
        t0 = time.time()
        net, _ = train(lambda n_, _e, x, step, g: edm.loss(cfg, n_, x, generator=g), dataset, iters, seed=seed,
                       batch=batch, lr=lr)
        print(f"  EDM teacher on {dataset.name}: {iters} iterations, {time.time() - t0:.0f}s", flush=True)
        os.makedirs(CACHE, exist_ok=True)
        torch.save(net.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    net = net.eval().requires_grad_(False)
    # The network runs in float32 (as it was trained); callers in float64 get float64 back.
    return net, (lambda x, sigma, labels=None: edm.denoise(net, x.float(), torch.as_tensor(sigma).float(),
                                                           labels).to(x.dtype))


def train(loss_fn, dataset, iters, seed=0, batch=256, lr=1e-3, target_mu=None, ema_halflife=20_000,
          s_embedding=False, evaluate=None, eval_every=None, init=None):
    """Train an MLP student on `dataset` (a `data.toy.GaussianMixture`) for `iters` Adam steps.

    `target_mu` adds the target network θ⁻ ← μ·θ⁻ + (1 − μ)·θ (CM Alg. 2), passed to `loss_fn` as `net_ema`
    (None otherwise). The returned network is the evaluation EMA (train.py: β = 0.5^(batch / half-life)), in float64
    and eval mode. `evaluate(ema) -> dict`, if given, runs on that EMA every `eval_every` iterations and at the end.
    `init`, a denoiser MLP (or its state_dict), is the student's starting point, as CM and CTM start from the
    teacher's weights; an s-embedded student takes it through `load_teacher_into_student` (the s-path starts at 0).
    Returns (ema, log) with log = {"loss": [(iter, mean loss)], "evals": [(iter, dict)], "s_per_iter": float};
    s_per_iter is training wall time per iteration, evaluations excluded."""
    torch.manual_seed(seed)                                        # initial weights: a function of the seed only
    net = MLP(dim=dataset.dim, s_embedding=s_embedding)
    if init is not None and s_embedding:
        load_teacher_into_student(net, init)
    elif init is not None:
        net.load_state_dict(init.state_dict() if isinstance(init, torch.nn.Module) else init)
    net_ema = copy.deepcopy(net).requires_grad_(False) if target_mu is not None else None  # target θ⁻
    ema = copy.deepcopy(net).requires_grad_(False)                 # evaluation EMA, never a teacher
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 1)        # data and the loss's noise
    beta = 0.5 ** (batch / ema_halflife)                           # EDM's EMA: half-life in samples
    log, loss_sum, t0, t_eval = {"loss": [], "evals": []}, 0.0, time.time(), 0.0
    every = eval_every or iters

    def eval_copy():
        return copy.deepcopy(ema).to(torch.float64).eval()

    for step in range(iters):
        x, _ = dataset.sample(batch, g, torch.float32)
        loss = loss_fn(net, net_ema, x, step, g).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            if net_ema is not None:                                # CM Alg. 2: θ⁻ ← stopgrad(μθ⁻ + (1 − μ)θ)
                for p_t, p in zip(net_ema.parameters(), net.parameters()):
                    p_t.lerp_(p, 1 - target_mu)
            for p_e, p in zip(ema.parameters(), net.parameters()):
                p_e.lerp_(p, 1 - beta)
        loss_sum += loss.item()
        if (step + 1) % max(iters // 10, 1) == 0:
            log["loss"].append((step + 1, loss_sum / max(iters // 10, 1)))
            loss_sum = 0.0
        if evaluate is not None and ((step + 1) % every == 0 or step + 1 == iters):
            t1 = time.time()
            log["evals"].append((step + 1, evaluate(eval_copy())))
            t_eval += time.time() - t1
    log["s_per_iter"] = (time.time() - t0 - t_eval) / iters
    return eval_copy(), log
