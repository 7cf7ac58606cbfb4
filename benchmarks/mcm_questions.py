"""Open questions about Multistep Consistency Models (Heek et al., arXiv:2403.06807v3), answered on 2D toys.

Each question is one sub-command; results go to docs/results/mcm_questions/<question>.{json,png}:

    eta          aDDIM's η (App. A.1: 0.75) and the analytic x_var = 0.1/(2 + SNR) (Sec. 3), as samplers and as the
                 teacher step of Alg. 1
    init         MCM-CD and MCM-CT from random weights against from the diffusion teacher (the paper's start)
    mixture      one student for S ∈ {1, 2, 4, 8} (with S as an input or not) against one student per S
    teacher_step aDDIM against DDIM as the teacher step, by S (Table 4), against each arm's own target and the ODE
    segments     segments equal in t (Alg. 1), equal in log-SNR, and on the Karras ρ = 7 grid
    boundaries   the loss, its spread and the student's error as functions of t near the segment boundaries
    distance     pseudo-Huber (Alg. 1's ρ), ℓ2 and ℓ2² on data whose optimum is known

Set-up (the papers'): a diffusion teacher network (EDM, `algorithms/edm.py`) trained on the toy, and students
initialised from it (unless the question is about initialisation), trained by `benchmarks/common.py`'s loop with
Alg. 1's recipe (Adam 1e-3, batch 256, teacher steps annealed 64 → 1280 over half the run). Every student is
measured with `data.metrics.report` from the same noise against two references: the teacher network's own PF-ODE
(how well it distils) and the exact PF-ODE of the toy (how good the result is); the standalone samplers of `eta` also
against held-out data beside the floor of two data sets. Numbers are means over seeds ± their standard error.
Trained runs are cached in runs/mcm_questions_cache/ (git-ignored), keyed by their settings and the code they run,
so questions that share runs (teacher_step, eta, init, mixture, boundaries) train them once.

    python -m benchmarks.mcm_questions [QUESTION] [--quick] [--out docs/results/mcm_questions] [--seeds 0,1,2]

Without QUESTION every question runs in turn (what `benchmarks.all` calls); --quick writes *_quick.* and its
numbers mean nothing. --seeds runs a part of the seeds, so that processes can share the work through the cache.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import time

import torch

from algorithms import addim, edm, mcm
from benchmarks import common
from data import metrics, toy

# n_eval noises per seed for the students (paired gaps need no more); the samplers of `eta` take n_sampler ≥ 16384,
# the least `metrics.report` accepts for distances to data; the aDDIM target (1280 network calls each) n_own.
FULL = dict(data="two_modes", seeds=(0, 1, 2), iters=300, teacher_iters=2000, batch=256, lr=1e-3, n_eval=1024,
            n_sampler=16384, n_own=256, distance_iters=400, S=(1, 2, 4, 8), sampler_N=(4, 16),
            sampler_data=("two_modes",))
QUICK = dict(data="two_modes", seeds=(0, 1), iters=20, teacher_iters=40, batch=64, lr=1e-3, n_eval=256,
             n_sampler=256, n_own=64, distance_iters=20, S=(1, 2), sampler_N=(4,), sampler_data=("two_modes",))
ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)    # the standalone sampler's sweep
ETAS_TRAIN = (0.0, 0.25, 0.75, 1.0)   # the teacher step's (each arm is 3 training runs)
CACHE = "runs/mcm_questions_cache"
SOURCES = ("algorithms/mcm.py", "algorithms/addim.py", "algorithms/edm.py", "data/toy.py", "networks/mlp.py",
           "benchmarks/common.py")


def fingerprint(*parts):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1(repr(parts).encode())
    for name in SOURCES:
        with open(os.path.join(root, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def stat(v):
    """Mean and standard error of the mean over seeds (None for fewer than two values)."""
    v = torch.tensor([float(a) for a in v], dtype=torch.float64)
    return dict(mean=v.mean().item(), se=(v.std() / math.sqrt(len(v))).item() if len(v) > 1 else None, n=len(v))


def fmt(s, spec=".2e"):
    se_spec = spec.lstrip("+")
    return f"{s['mean']:{spec}} ± {s['se']:{se_spec}}" if s["se"] is not None else f"{s['mean']:{spec}}"


# ---- the teacher, the references and one student run -------------------------------------------------------------

def cached(key, make):
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, key + ".pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    out = make()
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


def teacher_net(p):
    """The diffusion teacher of set-up (ii): an EDM-trained MLP on the toy (one per dataset, shared by all seeds,
    so that seeds vary the student only). Returns the float64 network (the evaluation EMA)."""
    dataset = toy.DATASETS[p["data"]]()

    def make():
        ecfg = edm.Config()
        with torch.enable_grad():  # callers may be under no_grad
            net, log = common.train(lambda n, _, x, step, g: edm.loss(ecfg, n, x, generator=g), dataset,
                                    p["teacher_iters"], seed=1000, batch=p["batch"], lr=p["lr"])
        return dict(state=net.state_dict(), loss=log["loss"])
    state = cached("teacher-" + fingerprint(p["data"], p["teacher_iters"], p["batch"], p["lr"]), make)["state"]
    net = common.MLP(dim=dataset.dim)
    net.load_state_dict(state)
    return net.to(torch.float64).eval().requires_grad_(False)


def as_denoiser(net, sigma_data=edm.SIGMA_DATA):
    return lambda x, sigma, labels=None: edm.denoise(net, x, sigma, labels, sigma_data)


def references(p, seed):
    """The evaluation noise of a seed and the two references from it: the exact PF-ODE of the toy and the teacher
    network's own PF-ODE (both σ_max → σ_min by `toy.ode_solve`)."""
    dataset = toy.DATASETS[p["data"]]()

    def make():
        g = torch.Generator().manual_seed(10_000 + seed)
        noise = torch.randn(p["n_eval"], dataset.dim, dtype=torch.float64, generator=g)
        x_exact = dataset.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)
        x_teacher = toy.ode_solve(as_denoiser(teacher_net(p)), noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)
        return dict(noise=noise, exact=x_exact, teacher=x_teacher)
    return cached("refs-" + fingerprint(p["data"], p["teacher_iters"], p["batch"], p["lr"], p["n_eval"], seed), make)


def measure(x, refs, dataset, seed):
    """`metrics.report` of samples x against the exact ODE and against the teacher network's ODE (same noise)."""
    out = {}
    for name in ("exact", "teacher"):
        r = metrics.report(x, refs[name], assign=dataset.nearest_component, num_permutations=100, seed=seed)
        out[name] = {k: r[k] for k in ("gap_mean", "gap_se", "gap_median", "mode_switch_fraction",
                                       "gap_mean_same_mode", "energy_to_ode", "energy_to_ode_p")}
    out["spread"] = spread(x, dataset) / spread(refs["exact"], dataset)
    return out


def spread(x, dataset):
    """The mean squared distance of samples to their nearest mode's mean: how wide the modes are drawn."""
    k = dataset.nearest_component(x)
    return (x.to(torch.float64) - dataset.means[k]).square().sum(1).mean().item()


def student_run(p, arm, seed, loss_of, S, init="teacher", s_embedding=False, sample=None):
    """Train one student (cached) and measure its S-step samples (each S of S if S is a tuple). `loss_of(teacher_D)
    -> loss_fn` builds the per-example loss of `common.train`; `sample(net, noise, S)` defaults to Alg. 2. Returns
    dict(metrics=measure(...), state=student weights, loss=training-loss log)."""
    dataset = toy.DATASETS[p["data"]]()

    def make():
        teacher = teacher_net(p)
        with torch.enable_grad():  # callers may be under no_grad
            net, log = common.train(loss_of(as_denoiser(teacher)), dataset, p["iters"], seed=seed, batch=p["batch"],
                                    lr=p["lr"], init=teacher if init == "teacher" else None, s_embedding=s_embedding)
        refs = references(p, seed)
        draw = sample or (lambda n, z, S_: mcm.sample(mcm.Config(S=S_), n, z))
        xs = {S_: draw(n_S, refs["noise"], S_) for S_, n_S in student_views(net, S)}
        return dict(metrics={S_: measure(x, refs, dataset, seed) for S_, x in xs.items()}, state=net.state_dict(),
                    loss=log["loss"], s_per_iter=log["s_per_iter"])
    key = f"{arm}-S{S}-{init}-seed{seed}-" + fingerprint(p["data"], p["iters"], p["teacher_iters"], p["batch"],
                                                          p["lr"], p["n_eval"], arm, S, init, s_embedding)
    return cached(key, make)


def student_views(net, S):
    """(S, the network that samples with S steps): one student per S, or (for `mixture`) one per S of the list."""
    return [(S_, WithS(net, S_) if isinstance(S, tuple) and net.s_embedding else net)
            for S_ in (S if isinstance(S, tuple) else (S,))]


def cd_loss(S, iters, eta=0.75, addim_teacher=True):
    cfg = mcm.Config(S=S, anneal_iters=max(iters // 2, 1), eta=eta, addim_teacher=addim_teacher)  # App. A.1
    return lambda D: (lambda net, _, x, step, g: mcm.loss(cfg, net, D, x, step=step, generator=g))


def ct_loss(S, iters):
    cfg = mcm.Config(S=S, anneal_iters=max(iters // 2, 1))
    return lambda D: (lambda net, _, x, step, g: mcm.loss_ct(cfg, net, x, step=step, generator=g))


def cd_loss_analytic_xvar(S, iters):
    """Alg. 1 (CD) with the teacher step's x_var = 0.1/(2 + SNR(t)) (Sec. 3) instead of η‖x_teacher − x‖²/d: the
    same lines as `mcm.loss`, with only x_var changed."""
    cfg = mcm.Config(S=S, anneal_iters=max(iters // 2, 1))

    def loss_fn(D):
        def f(net, _, x, step, g):
            t_step, t, s = mcm.sample_times(cfg, x.shape[0], step, g, x.device)                   # Alg. 1
            sigma_t, sigma_s = addim.sigma_of_t(t, cfg.sigma_max), addim.sigma_of_t(s, cfg.sigma_max)
            x_t = x + edm.bcast(sigma_t, x) * torch.randn(x.shape, dtype=x.dtype, generator=g)     # Alg. 1: z_t
            with torch.no_grad():
                x_teacher = D(x_t, sigma_t.to(x.dtype))                                            # Alg. 1 (CD)
                x_s = addim.addim(x_teacher, x_t, sigma_t, sigma_s, addim.x_var_analytic(sigma_t))  # Eq. 14, Sec. 3
            return mcm.consistency_loss(cfg, net, x_t, x_s, t_step, t, s)
        return f
    return loss_fn


class WithS(torch.nn.Module):
    """A student that is told S: S enters the MLP's second label input as ln S (the `mixture` question)."""

    def __init__(self, net, S):
        super().__init__()
        self.net, self.c = net, math.log(S)

    def forward(self, x, noise_labels, class_labels=None):
        return self.net(x, noise_labels, class_labels, noise_labels_s=torch.full_like(noise_labels, self.c))


# ---- question 1: η ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sampler_eta(p, seed, data, N):
    """The aDDIM sampler (Alg. 3) with the exact denoiser of `data`, N steps, for every η (per-t x_var estimated on
    data, Alg. 3) and for the analytic x_var; against the exact ODE and held-out data beside the data floor."""
    dataset = toy.DATASETS[data]()
    g = torch.Generator().manual_seed(30_000 + seed)
    n = p["n_sampler"]
    noise = torch.randn(n, dataset.dim, dtype=torch.float64, generator=g)
    x_ode = dataset.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN)
    big = n >= metrics.MIN_DATA_SAMPLES
    x_data = dataset.sample(max(n, metrics.MIN_DATA_SAMPLES), g)[0] if big else None
    x_fresh = dataset.sample(n, g)[0] if big else None
    x_train = dataset.sample(n, g)[0]                                   # the data Alg. 3 estimates x_var,t on
    sigmas = addim.time_grid(N)[:-1]
    arms = {f"eta={eta}": addim.estimate_x_var(dataset.denoiser, x_train, sigmas, eta, generator=g) for eta in ETAS}
    arms["analytic"] = None                                             # addim.sample: 0.1/(2 + SNR)
    out = {}
    for name, x_var in arms.items():
        x = addim.sample(addim.Config(num_steps=N), dataset.denoiser, noise, x_var=x_var)
        r = metrics.report(x, x_ode, assign=dataset.nearest_component, x_data=x_data, x_data_fresh=x_fresh,
                           num_permutations=100, seed=seed)
        r["spread"] = spread(x, dataset) / spread(x_ode, dataset)
        out[name] = r
    return out


def q_eta(p, quick):
    res = {"sampler": {}, "teacher_step": {}}
    for data in p["sampler_data"]:
        for N in p["sampler_N"]:
            runs = [cached(f"sampler-{data}-N{N}-seed{s}-" + fingerprint(p["n_sampler"], ETAS, data, N, s),
                           functools.partial(sampler_eta, p, s, data, N)) for s in p["seeds"]]
            res["sampler"][f"{data}/N={N}"] = {arm: {k: stat([r[arm][k] for r in runs]) for k in
                                                     ("gap_mean", "mode_switch_fraction", "energy_to_ode",
                                                      "energy_to_data", "energy_data_floor", "spread")
                                                     if runs[0][arm][k] is not None}
                                               for arm in runs[0]}
    S = 4 if not quick else p["S"][-1]
    arms = {f"eta={eta}": cd_loss(S, p["iters"], eta=eta, addim_teacher=eta > 0) for eta in ETAS_TRAIN}
    arms["analytic"] = cd_loss_analytic_xvar(S, p["iters"])
    for name, loss_of in arms.items():
        # η = 0 is the DDIM teacher step and η = 0.75 the default: the same runs as `teacher_step`
        arm = "cd-ddim" if name == "eta=0.0" else "cd-addim" if name == "eta=0.75" else f"cd-{name}"
        runs = [student_run(p, arm, seed, loss_of, S) for seed in p["seeds"]]
        res["teacher_step"][name] = summarise([r["metrics"][S] for r in runs])
    res["teacher_step_S"] = S
    return res


def summarise(ms):
    """Mean ± se over seeds of each run's headline numbers against both references."""
    out = {f"{ref}_{k}": stat([m[ref][k] for m in ms]) for ref in ("exact", "teacher")
           for k in ("gap_mean", "gap_median", "mode_switch_fraction", "energy_to_ode")}
    out["exact_energy_p"] = [m["exact"]["energy_to_ode_p"] for m in ms]
    out["teacher_energy_p"] = [m["teacher"]["energy_to_ode_p"] for m in ms]
    out["spread"] = stat([m["spread"] for m in ms])
    return out


def paired(ms_a, ms_b, ref="teacher", k="gap_mean"):
    """Mean ± se over seeds of the per-seed difference a − b (same seed: same data stream and evaluation noise)."""
    return stat([a[ref][k] - b[ref][k] for a, b in zip(ms_a, ms_b)])


# ---- question 4: aDDIM against DDIM as the teacher step, by S ----------------------------------------------------

@torch.no_grad()
def addim_target(p, seed, T=1280, eta=0.75):
    """The aDDIM arm's own target for the first n_own evaluation noises: the teacher network sampled by T aDDIM
    steps (Alg. 3, per-t x_var estimated on data with η), T = the teacher grid at the end of training. Alg. 1 uses a
    per-example x_var from the true x instead, which no sampler has, so this is that target's nearest sampler."""
    dataset = toy.DATASETS[p["data"]]()

    def make():
        D = as_denoiser(teacher_net(p))
        g = torch.Generator().manual_seed(40_000 + seed)
        x_var = addim.estimate_x_var(D, dataset.sample(n, g)[0], addim.time_grid(T)[:-1], eta, generator=g)
        return addim.sample(addim.Config(num_steps=T), D, references(p, seed)["noise"][:n], x_var=x_var)
    n = p["n_own"]  # T network calls per sample: the first n_own evaluation noises only
    return cached(f"addim-target-T{T}-seed{seed}-" + fingerprint(p["data"], p["teacher_iters"], p["batch"], p["lr"],
                                                                 p["n_eval"], n, T, eta), make)


def q_teacher_step(p, quick):
    dataset = toy.DATASETS[p["data"]]()
    T = 1280 if not quick else 16
    own = {seed: addim_target(p, seed, T) for seed in p["seeds"]}
    floor = {}
    for ref in ("exact", "teacher"):  # what a student that chains the aDDIM steps perfectly scores
        floor[ref] = stat([metrics.paired_gap(own[s], references(p, s)[ref][:len(own[s])])["gap_mean"]
                           for s in p["seeds"]])
    floor["spread"] = stat([spread(own[s], dataset) / spread(references(p, s)["exact"][:len(own[s])], dataset)
                            for s in p["seeds"]])
    # the teacher network's own ODE against the exact one: how far the teacher is from ground truth
    floor["teacher_vs_exact"] = stat([metrics.paired_gap(references(p, s)["teacher"], references(p, s)["exact"])
                                      ["gap_mean"] for s in p["seeds"]])
    floor["teacher_spread"] = stat([spread(references(p, s)["teacher"], dataset) /
                                    spread(references(p, s)["exact"], dataset) for s in p["seeds"]])
    rows = {}
    for S in p["S"]:
        ms = {arm: [student_run(p, f"cd-{arm.lower()}", seed, cd_loss(S, p["iters"], addim_teacher=arm == "aDDIM"), S)
                    ["metrics"][S] for seed in p["seeds"]] for arm in ("DDIM", "aDDIM")}
        r = {arm: summarise(m) for arm, m in ms.items()}
        students = {seed: student_run(p, "cd-addim", seed, None, S)["state"] for seed in p["seeds"]}
        r["aDDIM"]["own_gap_mean"] = stat([metrics.paired_gap(sample_state(students[s], S, references(p, s)["noise"]
                                                                            [:len(own[s])]), own[s])["gap_mean"]
                                           for s in p["seeds"]])
        r["diff_teacher_gap"] = paired(ms["aDDIM"], ms["DDIM"], "teacher")
        r["diff_exact_gap"] = paired(ms["aDDIM"], ms["DDIM"], "exact")
        r["diff_spread"] = stat([a["spread"] - b["spread"] for a, b in zip(ms["aDDIM"], ms["DDIM"])])
        rows[S] = r
    return dict(T=T, floor=floor, rows=rows)


@torch.no_grad()
def sample_state(state, S, noise):
    net = common.MLP(dim=noise.shape[1])
    net.load_state_dict(state)
    return mcm.sample(mcm.Config(S=S), net.to(torch.float64).eval(), noise)


# ---- question 2: initialisation ----------------------------------------------------------------------------------

def q_init(p, quick):
    S = 4 if not quick else p["S"][-1]
    cd, ct = ("cd-addim", cd_loss(S, p["iters"])), ("ct", ct_loss(S, p["iters"]))
    arms = {("CD", "teacher"): cd, ("CD", "random"): cd, ("CT", "teacher"): ct, ("CT", "random"): ct}
    rows = {}
    for (algo, init), (arm, loss_of) in arms.items():
        ms = [student_run(p, arm, seed, loss_of, S, init=init)["metrics"][S] for seed in p["seeds"]]
        rows[f"{algo} from {init}"] = summarise(ms)
    # the teacher itself sampled with S DDIM steps: where a student from the teacher starts
    dataset = toy.DATASETS[p["data"]]()
    ms = [measure(mcm.sample(mcm.Config(S=S), teacher_net(p), references(p, s)["noise"]), references(p, s), dataset, s)
          for s in p["seeds"]]
    rows["teacher, S DDIM steps (no training)"] = summarise(ms)
    return dict(S=S, rows=rows)


# ---- question 3: one model for every S ----------------------------------------------------------------------------

def mixture_loss(S_list, iters):
    """Alg. 1 (CD) with S drawn per example from S_list: the batch is split into equal parts, one per S, each taking
    `mcm.loss` with its S (the student told S through `WithS` if it has a second label input)."""
    cfgs = [mcm.Config(S=S, anneal_iters=max(iters // 2, 1)) for S in S_list]

    def loss_of(D):
        def f(net, _, x, step, g):
            parts = x.chunk(len(S_list))
            return torch.cat([mcm.loss(c, WithS(net, c.S) if net.s_embedding else net, D, xp, step=step, generator=g)
                              for c, xp in zip(cfgs, parts)])
        return f
    return loss_of


def q_mixture(p, quick):
    S_list = tuple(p["S"])
    rows = {}
    for name, s_in in (("one model, S not an input", False), ("one model, S as an input", True)):
        runs = [student_run(p, f"mixture-sin{int(s_in)}", seed, mixture_loss(S_list, p["iters"]), S_list,
                            s_embedding=s_in) for seed in p["seeds"]]
        rows[name] = {S: summarise([r["metrics"][S] for r in runs]) for S in S_list}
    rows["one model per S"] = {S: summarise([student_run(p, "cd-addim", seed, cd_loss(S, p["iters"]), S)["metrics"][S]
                                             for seed in p["seeds"]]) for S in S_list}
    return dict(S=S_list, rows=rows)


# ---- question 5: segmentation -------------------------------------------------------------------------------------

def t_of_sigma(sigma, sigma_max=edm.SIGMA_MAX):
    """The inverse of `addim.sigma_of_t`: VP time of a VE noise level."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64)) / math.atan(sigma_max)


def segment_bounds(kind, S):
    """Segment boundaries as VP times 0 = b_0 < … < b_S = 1: equal in t (Alg. 1), equal in log-SNR between σ_max and
    σ_min (the last segment then ends at σ = 0), or the Karras ρ = 7 grid of S + 1 levels (EDM Eq. 5) likewise."""
    if kind == "equal t":
        return torch.arange(S + 1, dtype=torch.float64) / S
    if kind == "equal log-SNR":
        sig = torch.logspace(math.log10(edm.SIGMA_MAX), math.log10(edm.SIGMA_MIN), S + 1, dtype=torch.float64)
    elif kind == "Karras rho=7":
        sig = edm.sigma_grid(S + 1)
    else:
        raise ValueError(f"unknown segmentation {kind!r}")
    sig[-1] = 0.0
    return t_of_sigma(sig).flip(0)


def segment_loss(bounds, iters, S):
    """Alg. 1 (CD, aDDIM teacher step) on the segments `bounds`: segment and teacher step drawn as in
    `mcm.sample_times`, with the N(i)/S teacher steps of a segment equally spaced in t inside it."""
    cfg = mcm.Config(S=S, anneal_iters=max(iters // 2, 1))

    def loss_of(D):
        def f(net, _, x, step, g):
            B = x.shape[0]
            N_seg = max(1, round(mcm.teacher_steps(cfg, step) / S))                               # Alg. 1
            k = torch.randint(0, S, (B,), generator=g)                                            # Alg. 1: step
            n_rel = torch.randint(1, N_seg + 1, (B,), generator=g).to(torch.float64)              # Alg. 1: n_rel
            t_step, width = bounds[k], bounds[k + 1] - bounds[k]
            t, s = t_step + n_rel / N_seg * width, t_step + (n_rel - 1) / N_seg * width
            s = torch.where(n_rel == 1, t_step, s)                   # exactly the segment start: the anchor (Eq. 8)
            sigma_t, sigma_s = addim.sigma_of_t(t), addim.sigma_of_t(s)
            x_t = x + edm.bcast(sigma_t, x) * torch.randn(x.shape, dtype=x.dtype, generator=g)     # Alg. 1: z_t
            with torch.no_grad():
                x_teacher = D(x_t, sigma_t.to(x.dtype))                                            # Alg. 1 (CD)
                x_s = addim.addim(x_teacher, x_t, sigma_t, sigma_s, addim.x_var_empirical(x, x_teacher, cfg.eta))
            return mcm.consistency_loss(cfg, net, x_t, x_s, t_step, t, s)
        return f
    return loss_of


@torch.no_grad()
def segment_sample(bounds):
    """Alg. 2 on the segments `bounds`: one DDIM jump per segment, from its end to its start."""
    def draw(net, noise, S):
        sig = addim.sigma_of_t(bounds.flip(0))                                                    # descending
        x = noise.to(torch.float64) * sig[0]
        for k in range(S):
            x = addim.ddim(mcm.denoise(mcm.Config(S=S), net, x, sig[k]), x, sig[k], sig[k + 1])   # Alg. 2
        return x
    return draw


def q_segments(p, quick):
    S = 4 if not quick else p["S"][-1]
    rows = {}
    for kind in ("equal t", "equal log-SNR", "Karras rho=7"):
        b = segment_bounds(kind, S)
        if kind == "equal t":  # Alg. 1 itself: the `teacher_step` runs
            ms = [student_run(p, "cd-addim", seed, cd_loss(S, p["iters"]), S)["metrics"][S] for seed in p["seeds"]]
        else:
            ms = [student_run(p, f"seg-{kind}", seed, segment_loss(b, p["iters"], S), S, sample=segment_sample(b))
                  ["metrics"][S] for seed in p["seeds"]]
        rows[kind] = dict(sigma_bounds=addim.sigma_of_t(b).tolist(), **summarise(ms))
    return dict(S=S, rows=rows)


# ---- question 7: the targets switch at segment boundaries -------------------------------------------------------

@torch.no_grad()
def q_boundaries(p, quick):
    """For the S = 4 aDDIM students: at teacher-grid positions across each segment, the per-example loss of Alg. 1
    (its mean and standard deviation over examples) and the student's jump error against the exact ODE,
    ‖DDIM_{t→t_step}(x̂_θ(x_t), x_t) − ODE_{t→t_step}(x_t)‖²/d, x_t from the noisy data marginal."""
    S = 4 if not quick else p["S"][-1]
    dataset = toy.DATASETS[p["data"]]()
    cfg = mcm.Config(S=S)
    N_seg = round(cfg.N_end / S) if not quick else 8                    # the grid at the end of training
    T = N_seg * S
    n_rels = sorted({1, 2, 3, 5, N_seg // 8, N_seg // 4, N_seg // 2, 3 * N_seg // 4, N_seg - 2, N_seg - 1, N_seg}
                    - {0})
    B = 2048 if not quick else 128
    D = as_denoiser(teacher_net(p))

    def one_seed(seed):
        net = common.MLP(dim=dataset.dim)
        net.load_state_dict(student_run(p, "cd-addim", seed, cd_loss(S, p["iters"]), S)["state"])
        net = net.to(torch.float64).eval()
        g = torch.Generator().manual_seed(50_000 + seed)
        rows = []
        for k in range(S):
            for n in n_rels:
                t_step = torch.full((B,), k * N_seg / T, dtype=torch.float64)
                t, s = t_step + n / T, t_step + (n - 1) / T
                if n == 1:
                    s = t_step
                sig_step, sig_t, sig_s = (addim.sigma_of_t(v) for v in (t_step, t, s))
                x = dataset.sample(B, g)[0]
                x_t = x + edm.bcast(sig_t, x) * torch.randn(x.shape, dtype=x.dtype, generator=g)
                x_teacher = D(x_t, sig_t)
                x_s = addim.addim(x_teacher, x_t, sig_t, sig_s, addim.x_var_empirical(x, x_teacher, cfg.eta))
                L = mcm.consistency_loss(cfg, net, x_t, x_s, t_step, t, s)                     # Alg. 1, per example
                # The last segment ends at σ = 0, where the ODE reference cannot go: both end at min(σ_min, σ_t).
                sig_end = torch.where(sig_step > 0, sig_step, sig_t.clamp(max=edm.SIGMA_MIN))
                jump = addim.ddim(mcm.denoise(cfg, net, x_t, sig_t), x_t, sig_t, sig_end)      # the student's jump
                ode = dataset.ode(x_t, sig_t, sig_end)
                err = (jump - ode).square().mean(1)
                rows.append(dict(segment=k, n_rel=n, t=float(t[0]), sigma=float(sig_t[0]),
                                 loss_mean=L.mean().item(), loss_sd=L.std().item(),
                                 err_mean=err.mean().item(), err_se=(err.std() / math.sqrt(B)).item()))
        return rows
    per_seed = [cached(f"boundaries-seed{seed}-" + fingerprint(p["data"], p["iters"], p["teacher_iters"], p["batch"],
                                                                p["lr"], p["n_eval"], S, N_seg, B, seed),
                       functools.partial(one_seed, seed)) for seed in p["seeds"]]
    rows = []
    for i, r in enumerate(per_seed[0]):
        out = {k: r[k] for k in ("segment", "n_rel", "t", "sigma")}
        for k in ("loss_mean", "loss_sd", "err_mean"):
            out[k] = stat([ps[i][k] for ps in per_seed])
        rows.append(out)
    return dict(S=S, N_seg=N_seg, rows=rows)


# ---- question 8: the distance -------------------------------------------------------------------------------------

DISTANCES = {"pseudo-Huber eps=1 (paper, T2I)": 1.0, "l2 (pseudo-Huber eps=1e-4, paper, ImageNet)": 1e-4,
             "squared l2 (pseudo-Huber eps=1e3)": 1e3}


@torch.no_grad()
def posterior_geometric_median(dataset, x_t, sigma, M=256, iters=60, generator=None):
    """The geometric median argmin_m E‖x − m‖ of p(x | x_σ) for a Gaussian mixture (module docstring of data/toy.py:
    the posterior is the mixture of N(μ_k + c(x_σ − μ_k), c σ² I), c = std²/(std² + σ²), with weights p(k | x_σ)),
    by Weiszfeld's iteration on M posterior draws per point."""
    var = sigma**2 + dataset.std**2
    logits = dataset.log_w + (x_t @ dataset.means.T - 0.5 * dataset.means.square().sum(1)) / var
    k = torch.multinomial(logits.softmax(1), M, replacement=True, generator=generator)         # [B, M]
    c = dataset.std**2 / var
    mu = dataset.means[k] + c * (x_t[:, None] - dataset.means[k])                               # [B, M, d]
    draws = mu + math.sqrt(c) * sigma * torch.randn(mu.shape, dtype=torch.float64, generator=generator)
    m = draws.mean(1)
    for _ in range(iters):
        w = 1 / (draws - m[:, None]).norm(dim=2).clamp(min=1e-9)                                # [B, M]
        m = (w[..., None] * draws).sum(1) / w.sum(1, keepdim=True)
    return m


def q_distance(p, quick):
    """Diffusion training with each distance (Alg. 1, CT, with one teacher step per segment: the target is x, see
    tests/test_mcm.py), from random weights, on Gaussian data (the denoiser is linear, the posterior Gaussian) and on
    two_modes (a bimodal posterior); the learned x̂_θ(x_σ) against the exact E[x | x_σ] and the geometric median."""
    S = 64 if not quick else 8
    levels = [k for k in (4, 8, 16, 24, 32, 40, 48, 56) if k < S] if not quick else [2, 4]
    out = {}
    for data in ("gaussian", "two_modes"):
        dataset = toy.DATASETS[data]()
        q = dict(p, data=data, iters=p["distance_iters"])
        res = {}
        for name, eps in DISTANCES.items():
            cfg = mcm.Config(S=S, N_start=S, N_end=S, huber_eps=eps)
            loss_of = lambda D, cfg=cfg: (lambda net, _, x, step, g: mcm.loss_ct(cfg, net, x, step=step, generator=g))
            per_seed = []
            for seed in p["seeds"]:
                key = f"dist-{data}-{eps}-seed{seed}-" + fingerprint(q["iters"], q["batch"], q["lr"], S, eps, data)
                state = cached(key, functools.partial(train_only, q, loss_of, seed))
                model = common.MLP(dim=dataset.dim)
                model.load_state_dict(state)
                model = model.to(torch.float64).eval()
                gen = torch.Generator().manual_seed(60_000 + seed)
                rows = {}
                for k in levels:
                    sigma = float(addim.sigma_of_t(k / S))
                    x0 = dataset.sample(1024 if not quick else 64, gen)[0]
                    x_t = x0 + sigma * torch.randn(x0.shape, dtype=torch.float64, generator=gen)
                    x_hat = mcm.denoise(cfg, model, x_t, sigma)
                    mean = dataset.denoiser(x_t, sigma)
                    med = posterior_geometric_median(dataset, x_t, sigma, generator=gen)
                    rows[k] = dict(sigma=sigma, to_mean=(x_hat - mean).square().mean().item(),
                                   to_median=(x_hat - med).square().mean().item(),
                                   mean_to_median=(mean - med).square().mean().item())
                per_seed.append(rows)
            res[name] = {k: dict(sigma=per_seed[0][k]["sigma"],
                                 **{m: stat([r[k][m] for r in per_seed]) for m in ("to_mean", "to_median",
                                                                                   "mean_to_median")})
                         for k in levels}
        out[data] = res
    return dict(S=S, rows=out)


def train_only(p, loss_of, seed):
    with torch.enable_grad():
            net, _ = common.train(loss_of(None), toy.DATASETS[p["data"]](), p["iters"], seed=seed, batch=p["batch"],
                              lr=p["lr"])
    return net.state_dict()


# ---- tables, pictures, entry point --------------------------------------------------------------------------------

def table(res, question):
    """The question's result as markdown table lines (what docs/results.md shows)."""
    L = []
    if question == "eta":
        L += ["| data / N | x_var | gap to exact ODE | mode switches | energy to data (floor) | mode width / ODE's |",
              "|---|---|---|---|---|---|"]
        for key, arms in res["sampler"].items():
            for arm, r in arms.items():
                e = (f"{fmt(r['energy_to_data'], '.1e')} ({fmt(r['energy_data_floor'], '.1e')})"
                     if "energy_to_data" in r else "–")
                L.append(f"| {key} | {arm} | {fmt(r['gap_mean'])} | {fmt(r['mode_switch_fraction'], '.4f')} | {e} | "
                         f"{fmt(r['spread'], '.3f')} |")
        L += ["", f"Teacher step of MCM-CD, S = {res['teacher_step_S']}:", "",
              "| x_var of the teacher step | gap to teacher ODE | gap to exact ODE | mode switches (exact) | "
              "mode width / ODE's |", "|---|---|---|---|---|"]
        for arm, r in res["teacher_step"].items():
            L.append(f"| {arm} | {fmt(r['teacher_gap_mean'])} | {fmt(r['exact_gap_mean'])} | "
                     f"{fmt(r['exact_mode_switch_fraction'], '.4f')} | {fmt(r['spread'], '.3f')} |")
    elif question == "teacher_step":
        f = res["floor"]
        L += [f"A perfect chain of T = {res['T']} aDDIM teacher steps (Alg. 3, η = 0.75): gap to teacher ODE "
              f"{fmt(f['teacher'])}, to exact ODE {fmt(f['exact'])}, mode width {fmt(f['spread'], '.3f')} of the "
              f"ODE's. The teacher network's ODE: gap to exact ODE {fmt(f['teacher_vs_exact'])}, mode width "
              f"{fmt(f['teacher_spread'], '.3f')} of the exact ODE's.", "",
              "| S | gap to teacher ODE, DDIM | aDDIM | aDDIM − DDIM (paired) | aDDIM to its own target | "
              "gap to exact ODE, DDIM | aDDIM | aDDIM − DDIM | mode width / ODE's, DDIM | aDDIM |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for S, r in res["rows"].items():
            d, a = r["DDIM"], r["aDDIM"]
            L.append(f"| {S} | {fmt(d['teacher_gap_mean'])} | {fmt(a['teacher_gap_mean'])} | "
                     f"{fmt(r['diff_teacher_gap'], '+.2e')} | {fmt(a['own_gap_mean'])} | {fmt(d['exact_gap_mean'])} | "
                     f"{fmt(a['exact_gap_mean'])} | {fmt(r['diff_exact_gap'], '+.2e')} | {fmt(d['spread'], '.3f')} | "
                     f"{fmt(a['spread'], '.3f')} |")
    elif question in ("init", "segments"):
        L += [f"S = {res['S']}", "", "| arm | gap to teacher ODE | gap to exact ODE | median gap (exact) | "
              "mode switches (exact) | energy to exact ODE | mode width / ODE's |", "|---|---|---|---|---|---|---|"]
        for arm, r in res["rows"].items():
            L.append(f"| {arm} | {fmt(r['teacher_gap_mean'])} | {fmt(r['exact_gap_mean'])} | "
                     f"{fmt(r['exact_gap_median'])} | {fmt(r['exact_mode_switch_fraction'], '.4f')} | "
                     f"{fmt(r['exact_energy_to_ode'], '.1e')} | {fmt(r['spread'], '.3f')} |")
    elif question == "mixture":
        S_list = res["S"]
        L += ["| student | " + " | ".join(f"gap to teacher ODE, S = {S}" for S in S_list) + " |",
              "|---|" + "---|" * len(S_list)]
        for arm, r in res["rows"].items():
            L.append(f"| {arm} | " + " | ".join(fmt(r[S]["teacher_gap_mean"]) for S in S_list) + " |")
    elif question == "boundaries":
        L += ["| segment | n_rel | σ_t | loss mean | loss sd over examples | jump error to exact ODE |",
              "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            L.append(f"| {r['segment']} | {r['n_rel']} | {r['sigma']:.3g} | {fmt(r['loss_mean'])} | "
                     f"{fmt(r['loss_sd'])} | {fmt(r['err_mean'])} |")
    elif question == "distance":
        for data, arms in res["rows"].items():
            L += ["", f"{data}:", "", "| distance | σ | ‖x̂_θ − E[x|x_σ]‖²/d | ‖x̂_θ − geometric median‖²/d | "
                  "‖mean − median‖²/d |", "|---|---|---|---|---|"]
            for arm, rows in arms.items():
                for r in rows.values():
                    L.append(f"| {arm} | {r['sigma']:.3g} | {fmt(r['to_mean'])} | {fmt(r['to_median'])} | "
                             f"{fmt(r['mean_to_median'])} |")
    return L


def plot(res, question, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def eb(ax, xs, ss, **kw):
        ax.errorbar(xs, [s["mean"] for s in ss], [s["se"] or 0 for s in ss], marker="o", capsize=3, **kw)

    if question == "eta":
        keys = list(res["sampler"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for key in keys:
            arms = [a for a in res["sampler"][key] if a.startswith("eta")]
            eb(axes[0], [float(a[4:]) for a in arms], [res["sampler"][key][a]["gap_mean"] for a in arms], label=key)
            if "energy_to_data" in res["sampler"][key][arms[0]]:
                eb(axes[1], [float(a[4:]) for a in arms], [res["sampler"][key][a]["energy_to_data"] for a in arms],
                   label=key)
        axes[0].set(yscale="log", xlabel="η", ylabel="gap to exact ODE", title="aDDIM sampler (exact denoiser)")
        axes[1].set(xlabel="η", ylabel="energy distance to data", title="aDDIM sampler: against data")
        arms = list(res["teacher_step"])
        eb(axes[2], range(len(arms)), [res["teacher_step"][a]["teacher_gap_mean"] for a in arms], label="teacher ODE")
        eb(axes[2], range(len(arms)), [res["teacher_step"][a]["exact_gap_mean"] for a in arms], label="exact ODE")
        axes[2].set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        axes[2].set(yscale="log", ylabel="student gap", title=f"teacher step of MCM-CD, S = {res['teacher_step_S']}")
        for a in axes:
            a.legend(fontsize=7)
    elif question == "teacher_step":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        S_list = list(res["rows"])
        for arm in ("DDIM", "aDDIM"):
            eb(axes[0], S_list, [res["rows"][S][arm]["teacher_gap_mean"] for S in S_list], label=arm)
            eb(axes[1], S_list, [res["rows"][S][arm]["exact_gap_mean"] for S in S_list], label=arm)
            eb(axes[2], S_list, [res["rows"][S][arm]["spread"] for S in S_list], label=arm)
        eb(axes[0], S_list, [res["rows"][S]["aDDIM"]["own_gap_mean"] for S in S_list], label="aDDIM to own target",
           ls="--")
        axes[0].set(yscale="log", title="gap to the teacher's ODE")
        axes[1].set(yscale="log", title="gap to the exact ODE")
        axes[2].axhline(1, c="k", lw=0.5)
        axes[2].set(title="mode width / exact ODE's")
        for a in axes:
            a.set(xscale="log", xlabel="student steps S")
            a.set_xticks(S_list, [str(S) for S in S_list])
            a.set_xticks([], minor=True)
            a.legend(fontsize=7)
    elif question in ("init", "segments", "mixture"):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        if question == "mixture":
            for arm, r in res["rows"].items():
                eb(ax, list(r), [r[S]["teacher_gap_mean"] for S in r], label=arm)
            ax.set(xscale="log", yscale="log", xlabel="S at sampling", ylabel="gap to teacher ODE")
        else:
            arms = list(res["rows"])
            eb(ax, range(len(arms)), [res["rows"][a]["teacher_gap_mean"] for a in arms], label="teacher ODE", ls="")
            eb(ax, range(len(arms)), [res["rows"][a]["exact_gap_mean"] for a in arms], label="exact ODE", ls="")
            ax.set_xticks(range(len(arms)), arms, rotation=15, fontsize=8)
            ax.set(yscale="log", ylabel=f"student gap, S = {res['S']}")
        ax.legend(fontsize=8)
    elif question == "boundaries":
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        rows = res["rows"]
        t = [r["t"] for r in rows]
        eb(axes[0], t, [r["loss_mean"] for r in rows], label="loss mean", ls="")
        eb(axes[0], t, [r["loss_sd"] for r in rows], label="loss sd over examples", ls="")
        eb(axes[1], t, [r["err_mean"] for r in rows], label="student jump error to exact ODE", ls="")
        for a in axes:
            for k in range(1, res["S"]):
                a.axvline(k / res["S"], c="k", lw=0.5, ls=":")
            a.set(yscale="log", xlabel="VP time t (dotted: segment boundaries)")
            a.legend(fontsize=8)
    elif question == "distance":
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        for ax, (data, arms) in zip(axes, res["rows"].items()):
            for arm, rows in arms.items():
                sig = [r["sigma"] for r in rows.values()]
                eb(ax, sig, [r["to_mean"] for r in rows.values()], label=f"{arm}: to E[x|x_σ]")
                eb(ax, sig, [r["to_median"] for r in rows.values()], label=f"{arm}: to geometric median", ls="--")
            ax.set(xscale="log", yscale="log", xlabel="σ", ylabel="squared distance / d", title=data)
            ax.legend(fontsize=6)
    fig.suptitle(f"MCM question: {question}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


QUESTIONS = {"teacher_step": q_teacher_step, "eta": q_eta, "distance": q_distance, "init": q_init,
             "segments": q_segments, "boundaries": q_boundaries, "mixture": q_mixture}  # in order of priority


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def main(question=None, quick=False, out="docs/results/mcm_questions", seeds=None):
    """One question, or (question=None, as `benchmarks.all` calls it) every question in turn."""
    if question is None:
        return {q: main(q, quick, out, seeds) for q in QUESTIONS}
    if question not in QUESTIONS:
        raise ValueError(f"unknown question {question!r}; choose from {sorted(QUESTIONS)}")
    torch.set_num_threads(1)  # 2 shared cores
    p = dict(QUICK if quick else FULL)
    if seeds is not None:  # a part of the seeds (to spread the runs over processes; the cache joins them)
        p["seeds"] = tuple(seeds)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    res = QUESTIONS[question](p, quick)
    wall = time.time() - t0
    lines = table(res, question)
    print("\n".join(lines))
    print(f"wall time {wall:.0f}s (cached runs in {CACHE} are not retrained)")
    name = os.path.join(out, question + ("_quick" if quick else ""))
    with open(name + ".json", "w") as f:
        json.dump(jsonable(dict(question=question, settings=p, result=res, table=lines, wall_time_s=wall)), f,
                  indent=1)
    plot(res, question, name + ".png")
    print(f"wrote {name}.json and {name}.png")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question", nargs="?", choices=sorted(QUESTIONS), help="one question (default: all)")
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds (CI); writes *_quick.*")
    ap.add_argument("--out", default="docs/results/mcm_questions")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], help="only these seeds (comma list)")
    a = ap.parse_args()
    main(a.question, a.quick, a.out, a.seeds)
