"""The toy training loop the benchmarks share: Adam on a small MLP, an optional CM target θ⁻, and an evaluation EMA.

It is `train.py`'s loop with everything a 2D toy does not need taken out (DDP, AMP, checkpoints, image data):
batches are drawn fresh from the dataset, the student is `networks.mlp.MLP`, and the algorithm enters only through
`loss_fn(net, net_ema, x, step, generator) -> per-example loss [B]`, a closure around the algorithm's pure `loss`.
"""
import copy
import time

import torch

from networks.checkpoint import load_teacher_into_student
from networks.mlp import MLP


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
