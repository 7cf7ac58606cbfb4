"""Sampling from a trained network and measuring it, shared by `train.py` and `generate.py`.

A checkpoint written by `train.py` holds, besides the weights, a `model` record with everything needed to rebuild
its network and sampler without repeating a training flag:

    model = {"algo": "ctm", "network": {"cls": "SongUNet", "kwargs": {...}}, "cfg": {...Config fields...},
             "data": {"name": "cifar10:...", "shape": [3, 32, 32], "label_dim": 10},
             "analytic_stats": {...} or None}

`python evaluate.py RUN_DIR` re-evaluates a finished run from its newest checkpoint and prints the metrics.
"""
import argparse
import dataclasses
import os
import sys

import torch

from algorithms import addim, analytic_precond, cd, ctm, edm, mcm
from data import metrics, toy
from networks import checkpoint

ALGOS = {"edm": edm, "cd": cd, "ctm": ctm, "mcm": mcm}  # --algo name -> algorithm module


def algo_config(model):
    """The algorithm's Config as the run used it."""
    return ALGOS[model["algo"]].Config(**model["cfg"])


def outer_coefficients(model, device="cpu"):
    """Analytic-Precond's outer coefficients (t, s) -> (β, α) for cd/ctm, or None for the paper's."""
    if not model.get("analytic_stats"):
        return None
    stats = analytic_precond.Stats(**{k: (v.to(device) if torch.is_tensor(v) else v)
                                      for k, v in model["analytic_stats"].items()})
    return lambda t, s: analytic_precond.coefficients(stats, t, s)


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
        if nfe == 2 * cfg.num_steps - 1:
            return edm.sample(cfg, D, noise, labels)
        return addim.sample(addim.Config(), D, noise, labels, num_steps=nfe)
    if algo == "mcm":
        return mcm.sample(cfg, net, noise, labels, nfe, path=path)
    return ALGOS[algo].sample(cfg, net, noise, labels, nfe, generator, path, outer=outer)


@torch.no_grad()
def evaluate(model, net, teacher, x_data, labels, noise, exact=None, generator=None, outer=None):
    """Samples at each NFE and their metrics, as a dict.

    `teacher` is the run's teacher denoiser (None for EDM), `exact` the exact denoiser of the data when there is one
    (toys, digits). The references are the ODE solutions from the same noise: of the exact denoiser (float64
    accuracy) and of a network teacher (EDM's 35-NFE Heun). `x_data` are data points (and `labels` their one-hot
    classes, which the samples share) for distances to data."""
    dtype = noise.dtype
    refs = {}
    if exact is not None:
        refs["exact_ode"] = toy.ode_solve(exact, noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN, labels).to(dtype)
    if teacher is not None and teacher is not exact:
        refs["teacher_ode"] = edm.sample(edm.Config(), teacher, noise, labels)
    out = {"by_nfe": {}, "samples": {}, "paths": {}, "refs": refs}
    out["ref_sw2_to_data"] = {k: metrics.sliced_wasserstein(v, x_data) for k, v in refs.items()}
    for nfe in eval_nfes(model):
        path = []
        x = sample(model, net, noise, labels, nfe, generator, path, outer)
        m = {"sw2_to_data": metrics.sliced_wasserstein(x, x_data)}
        for k, ref in refs.items():
            m[f"gap_to_{k}"] = metrics.teacher_gap(x, ref)
        out["by_nfe"][nfe], out["samples"][nfe], out["paths"][nfe] = m, x, path
    return out


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
    x_data, labels = ds.sample(a.samples, torch.Generator().manual_seed(1), torch.float64)
    labels = labels if model["data"]["label_dim"] else None
    res = evaluate(model, net.double().eval(), None, x_data, labels, noise.double(), exact=ds.denoiser,
                   outer=outer_coefficients(model))
    for nfe, m in res["by_nfe"].items():
        print(f"NFE {nfe:3d}: " + "  ".join(f"{k} {v:.4g}" for k, v in m.items()))


if __name__ == "__main__":
    sys.exit(main())
