"""Sampling from a trained network and measuring it, shared by `train.py` and `generate.py`.

A checkpoint written by `train.py` holds, besides the weights, a `model` record with everything needed to rebuild
its network and sampler without repeating a training flag:

    model = {"algo": "ctm", "network": {"cls": "SongUNet", "kwargs": {...}}, "cfg": {...Config fields...},
             "data": {"name": "cifar10:...", "shape": [3, 32, 32], "label_dim": 10},
             "analytic_stats": {...} or None}

`python evaluate.py RUN_DIR` re-evaluates a finished run from its newest checkpoint and prints the metrics.
"""
import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

from algorithms import addim, analytic_precond, cd, ctm, edm, mcm
from data import metrics, toy
from networks import checkpoint

ALGOS = {"edm": edm, "cd": cd, "ctm": ctm, "mcm": mcm}  # --algo name -> algorithm module


def algo_config(model):
    """The algorithm's Config as the run used it."""
    return ALGOS[model["algo"]].Config(**model["cfg"])


def analytic_stats(model, device="cpu"):
    """The run's Analytic-Precond statistics (`analytic_precond.Stats`), or None."""
    # (checkpoints of earlier versions also hold a fingerprint, which Stats no longer has)
    d, fields = model.get("analytic_stats"), {f.name for f in dataclasses.fields(analytic_precond.Stats)}
    return None if not d else analytic_precond.Stats(**{k: (v.to(device) if torch.is_tensor(v) else v)
                                                        for k, v in d.items() if k in fields})


def analytic_record(teacher, x0, labels, log=print):
    """Analytic-Precond's ℓ and κ of `teacher` from the data x0 (and labels), as the record `analytic_stats` reads.
    None, and a message, if the default reading's coefficients are out of bounds (`analytic_precond.check_bounded`)."""
    t0 = time.time()
    s = analytic_precond.compute_stats(analytic_precond.Config(num_samples=len(x0)), teacher, x0, labels,
                                       torch.Generator(x0.device).manual_seed(1))
    log(f"Analytic-Precond statistics from {len(x0)} samples: {time.time() - t0:.1f}s")
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.init}, analytic_precond.check_bounded(s)


def outer_coefficients(model, device="cpu"):
    """Analytic-Precond's outer coefficients (t, s) -> (β, α) for cd/ctm, or None for the paper's."""
    stats = analytic_stats(model, device)
    return None if stats is None else lambda t, s: analytic_precond.coefficients(stats, t, s)


def eval_nfes(model):
    """The NFEs a run is evaluated at: EDM's Heun (2N − 1), MCM's S, else 1, 2 and 4 steps."""
    cfg = algo_config(model)
    return [2 * cfg.num_steps - 1] if model["algo"] == "edm" else [cfg.S] if model["algo"] == "mcm" else [1, 2, 4]


def seeded(seeds, shape, label_dim, class_idx=None, device="cpu"):
    """Unit noise [len(seeds), *shape] and one-hot labels (or None), each row a function of its seed alone, so
    an image does not depend on the batch or the number of ranks it is drawn in. A conditional network's class
    is drawn from the seed (as EDM's generate.py does) unless `class_idx` fixes it."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    if not label_dim:
        return noise.to(device), None, gens
    k = torch.tensor([int(torch.randint(label_dim, (), generator=g)) if class_idx is None else class_idx
                      for g in gens])
    return noise.to(device), torch.nn.functional.one_hot(k, label_dim).float().to(device), gens


@torch.no_grad()
def sample(model, net, noise, labels, nfe, generator=None, path=None, outer=None):
    """Samples of a trained student (or EDM network) at `nfe` from unit `noise`. EDM networks: the Heun sampler
    of Karras et al. Alg. 1, whose NFE is 2·num_steps − 1, or aDDIM (Heek et al. Alg. 3) for any other NFE."""
    algo, cfg = model["algo"], algo_config(model)
    if algo == "edm":
        D = lambda x, sigma, y: edm.denoise(net, x, sigma, y, cfg.sigma_data)
        if nfe == 2 * cfg.num_steps - 1 and model.get("sampler", "heun") == "heun":
            return edm.sample(cfg, D, noise, labels)
        return addim.sample(addim.Config(), D, noise, labels, num_steps=nfe)
    if algo == "mcm":
        return mcm.sample(cfg, net, noise, labels, nfe, path=path)
    return ALGOS[algo].sample(cfg, net, noise, labels, nfe, generator, path, outer=outer)


DATA_FIELDS = ("sw2_to_data", "sw2_data_floor", "energy_to_data", "energy_data_floor")


@torch.no_grad()
def evaluate(model, net, teacher, noise, labels, exact=None, assign=None, x_data=None, x_data_fresh=None,
             generator=None, outer=None, refs=None):
    """Samples at each NFE and their metrics (`data/metrics.py`), as a dict.

    `teacher` is the run's teacher denoiser (None for EDM), `exact` the exact denoiser of the data when there is one
    (toys, digits). The references are the ODE solutions from the same noise: of the exact denoiser (to float64
    accuracy) and of a network teacher (RK4 on flat data, EDM's 35-NFE Heun on images). `assign` maps samples to
    the data's modes; `x_data` and `x_data_fresh` (held-out data, ≥ 16k samples) give distances to data beside
    their floor. `labels` (one-hot, or None) condition every sample. `refs`, a dict, caches the references for
    further calls with the same noise (several MCM students)."""
    refs = {} if refs is None else refs
    solve = lambda D: toy.ode_solve(D, noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN, labels).to(noise.dtype)
    if exact is not None and "exact_ode" not in refs:
        refs["exact_ode"] = solve(exact)
    if teacher is not None and teacher is not exact and "teacher_ode" not in refs:
        refs["teacher_ode"] = solve(teacher) if noise.ndim == 2 else edm.sample(edm.Config(), teacher, noise, labels)
    out = {"by_nfe": {}, "samples": {}, "paths": {}, "refs": refs}
    with_data = x_data is not None and len(noise) >= metrics.MIN_DATA_SAMPLES
    for nfe in eval_nfes(model):
        path = []
        x = sample(model, net, noise, labels, nfe, generator, path, outer)
        m = {}
        for i, (k, ref) in enumerate(refs.items()):
            data = dict(x_data=x_data.flatten(1), x_data_fresh=x_data_fresh.flatten(1)) if with_data and i == 0 else {}
            r = metrics.report(x.flatten(1), ref.flatten(1), assign, **data)
            m[f"vs_{k}"] = {f: v for f, v in r.items() if f not in DATA_FIELDS}
            if data:
                m["vs_data"] = {f: r[f] for f in DATA_FIELDS}
        out["by_nfe"][nfe], out["samples"][nfe], out["paths"][nfe] = m, x, path
    return out


def evaluate_run(model, ema, teacher, exact, dataset, n, device, seed, outer=None, refs=None):
    """The end-of-run evaluation of train.py: the evaluation EMA `ema` from n seeded noises against the ODE
    references, on toys in float64 on the CPU (so that the gap measures distillation and not rounding) with the
    toy's modes and 16k held-out data points (drawn from other seeds than the training set's), on images on
    `device`. Returns `evaluate`'s dict."""
    toy_data = len(model["data"]["shape"]) == 1
    dev, dtype = (torch.device("cpu"), torch.float64) if toy_data else (device, torch.float32)
    noise, labels, _ = seeded(range(10**6, 10**6 + n), model["data"]["shape"], model["data"]["label_dim"], device=dev)
    moved = lambda D: copy.deepcopy(D).to(dev, dtype) if isinstance(D, torch.nn.Module) else D
    g = torch.Generator().manual_seed(seed + 10**6)
    data = dict(x_data=dataset.sample(16384, g)[0], x_data_fresh=dataset.sample(n, g)[0]) if toy_data else {}
    return evaluate(model, moved(ema).eval(), None if teacher is exact else moved(teacher), noise.to(dtype),
                    None if labels is None else labels.to(dtype), moved(exact),
                    dataset.nearest_component if toy_data else None, **data,
                    generator=torch.Generator(dev).manual_seed(2), outer=outer, refs=refs)


def fid_by_nfe(model, net, dataset, num_samples, rank, world_size, device, outer=None, log=print):
    """FID at each evaluation NFE over `num_samples` seeded samples, generated by every rank for its share of the
    seeds (`data/fid.py`); the same dict {nfe: FID} on every rank."""
    from data import fid
    out = {}
    for nfe in eval_nfes(model):
        gen = lambda seeds, nfe=nfe: sample(model, net.eval(), *seeded(seeds, model["data"]["shape"],
                                                                       model["data"]["label_dim"], device=device)[:2],
                                            nfe, outer=outer)
        out[nfe] = fid.fid_sharded(gen, dataset, num_samples, rank, world_size)
        log(f"  NFE {nfe:3d}: FID {out[nfe]:.3f} over {num_samples} samples")
    return out


def mcm_summary(outdir, outs, x_data, denoiser, log=print):
    """The pictures of several MCM students from the same noise: their samples beside the references, and for toys
    the S-step paths against the teacher's ODE paths (Heek et al. Fig. 1)."""
    picture("samples", os.path.join(outdir, "samples.png"), log, {**{f"S = {k}": v for o in outs for k, v in
            o["samples"].items()}, **outs[0]["refs"]}, "MCM: S-step samples", x_data)
    if denoiser is not None:
        paths = {f"S = {k}": torch.stack(p)[:, :32] for o in outs for k, p in o["paths"].items()}  # [S+1, 32, 2]
        picture("mcm_paths", os.path.join(outdir, "trajectories.png"), log, denoiser, paths)


def run_picture(path, model, out, x_data, log=print):
    """The end-of-run picture: `evaluate_run`'s samples at every NFE beside the references (and the paths)."""
    precond = "analytic" if model["analytic_stats"] else "paper"
    how = (f", S = {model['cfg']['S']}" if model["algo"] == "mcm" else f", {precond} preconditioning"
           if model["algo"] in ("cd", "ctm") else "")
    picture("samples", path, log, {**{f"{k} NFE": v for k, v in out["samples"].items()}, **out["refs"]},
            f"{model['algo']} on {model['data']['name']}{how}", x_data,
            {f"{k} NFE": v for k, v in out["paths"].items()})


def picture(draw, path, log, *a, **k):
    """Write a picture with `plots.<draw>`; without the optional matplotlib, say so and go on."""
    try:
        import plots
    except ImportError as e:
        return log(f"no picture {path} ({e}); install the plot extra: pip install -e '.[plot]'")
    log(f"wrote {getattr(plots, draw)(path, *a, **k)}")


@torch.no_grad()
def snapshot(path, model, net, device, log, x_data=None, outer=None):
    """A picture of a network's samples at its fewest NFE, with class-balanced labels (one class per column)."""
    nfe, shape, label_dim = eval_nfes(model)[0], model["data"]["shape"], model["data"]["label_dim"]
    noise, _, gens = seeded(range(512 if len(shape) == 1 else 64), shape, 0, device=device)
    labels = torch.nn.functional.one_hot(torch.arange(len(noise)) % label_dim, label_dim).float().to(device) \
        if label_dim else None
    was_training = net.training
    x = sample(model, net.eval(), noise, labels, nfe, gens, outer=outer)
    net.train(was_training)
    picture("samples", path, log, {f"{nfe} NFE": x}, f"{model['algo']}, {os.path.basename(path)[:-4]}", x_data)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a finished run from its newest checkpoint.")
    p.add_argument("run", help="a run folder written by train.py, or one of its checkpoints")
    p.add_argument("--samples", type=int, default=2000)
    a = p.parse_args(argv)
    try:
        state = checkpoint.read_run_checkpoint(a.run)
        model = state["model"]
        if model["data"]["name"] not in toy.DATASETS:
            p.error(f"{a.run}: re-evaluation is for toy runs; sample image runs with generate.py")
    except checkpoint.CheckpointError as e:
        p.error(str(e))
    net = checkpoint.build_network(model["network"])
    net.load_state_dict(state["ema"])
    ds = toy.DATASETS[model["data"]["name"]]()
    noise, _, _ = seeded(range(a.samples), model["data"]["shape"], 0)
    res = evaluate(model, net.double().eval(), None, noise.double(), None, exact=ds.denoiser,
                   assign=ds.nearest_component, outer=outer_coefficients(model))
    for nfe, m in res["by_nfe"].items():
        print(f"NFE {nfe:3d}: " + summary(m))


def summary(m):
    """One line of the headline numbers of a `by_nfe` entry."""
    parts = []
    for ref, r in m.items():
        if ref == "vs_data":
            parts.append(f"SW2 to data {r['sw2_to_data']:.4f} (floor {r['sw2_data_floor']:.4f})")
        else:
            other = "" if r["mode_switch_fraction"] is None else f", other mode {r['mode_switch_fraction']:.2%}"
            parts.append(f"gap to {ref[3:].replace('_', ' ')} {r['gap_mean']:.3e} ± {r['gap_se']:.1e} "
                         f"(median {r['gap_median']:.1e}{other}, energy p {r['energy_to_ode_p']:.2f})")
    return ";  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
