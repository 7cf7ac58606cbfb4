"""Claim 6: the cost of a training iteration of each algorithm, in plain-denoiser units, and the one-off
cost of the Analytic-Precond statistics.

Every algorithm here is a loss around the same network. Its iteration costs a number of network calls that can be
counted from the papers' algorithms (NFE accounting), so its wall time per iteration should be that many units of
one plain denoiser forward + backward on the same batch and network. Counted per iteration, with a teacher network
of the student's size (the one-step forward F costs 1/3 of a forward + backward unit, assuming backward ≈ 2F; a
backward through a frozen network to its input only, ≈ 1F):

    edm            1 student F+B                                                         = 1
    cd             1 student F+B, 1 target F, 2 teacher F (one Heun step, CM Alg. 2)      = 1 + 3/3 = 2
    mcm            1 student F+B, 1 target F (stop-gradient), 1 teacher F (Alg. 1)       = 1 + 2/3 ≈ 1.67
    ctm, no DSM    1 student F+B (G_θ), 1 frozen-target F + input-backward (G_θ⁻ of the
                   estimate), 2 no-grad F (target branch), 2k teacher F (k Heun steps,
                   P(k) ∝ k on 1..17, E[2k] = 23.3; CTM's public code)                  ≈ 1 + (2 + 2 + 23.3)/3 ≈ 10.1
    ctm            + DSM: 1 student F+B, and the adaptive weight's gradient of L_CTM with
                   respect to θ_L, which runs back through the frozen target once more    ≈ 10.1 + 1 + 1/3 ≈ 11.4
    ctm + AP       as ctm; the coefficients are scalar interpolations (no network call)    ≈ 11.4

The "expected" column below uses the teacher calls actually made in the timed iterations (k is random). Wall times
on a shared CPU are inflated; all rows are measured interleaved in one run, so their ratios are comparable.

The Analytic-Precond statistics (analytic_precond.compute_stats: per grid time and sample one JVP for ℓ_t, then one
forward and one JVP for κ_t; 121 times × 4096 samples as reported for the paper) are timed on a reduced
grid and extrapolated linearly in (grid times × samples), then compared with CTM training runs of typical length.

    python -m benchmarks.cost            # full mode
    python -m benchmarks.cost --quick    # smoke test, seconds
"""
import copy
import time

import torch

from algorithms import analytic_precond, cd, ctm, edm, mcm
from benchmarks import common
from data import toy
from networks import checkpoint
from networks.edm_unet import SONGUNET_CONFIGS, SongUNet
from networks.mlp import MLP

FULL = dict(repeats=5, iters={"mlp": 10, "unet": 2}, batch={"mlp": 256, "unet": 32}, stat_intervals=4,
            stat_samples={"mlp": 1024, "unet": 64}, toy_run_iters=3000, toy_run_batch=256, image_run_iters=6000,
            image_run_batch=256)
QUICK = dict(repeats=2, iters={"mlp": 2, "unet": 1}, batch={"mlp": 64, "unet": 4}, stat_intervals=2,
             stat_samples={"mlp": 64, "unet": 4}, toy_run_iters=3000, toy_run_batch=256, image_run_iters=6000,
             image_run_batch=256)
PAPER_STATS = (121, 4096)               # 120 intervals (121 times) × 4096 samples, as reported for the paper
PAPER_RUN = (100_000, 256)              # CTM's CIFAR-10 scale: ~100k iterations at batch 256
E_TWO_K = 2 * sum(k * k for k in range(1, 18)) / sum(range(1, 18))   # E[2k] for P(k) ∝ k on 1..17 (CTM's code)

# (student F+B, student-side forwards without weight gradients incl. input-only backwards) per iteration;
# the teacher's forwards are counted while timing. Module docstring for the derivation.
CALLS = {"edm": (1, 0), "cd": (1, 1), "mcm": (1, 1), "ctm (no DSM)": (1, 4),
         "ctm": (2, 5), "ctm + AP": (2, 5)}


def make_net(kind, s_embedding, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP(dim=2, s_embedding=s_embedding)
    net = SongUNet(**SONGUNET_CONFIGS["tiny-ddpmpp-8"], s_embedding=s_embedding)
    # Workaround, not a change of the maths: the attention output (networks/edm_unet.py, interleaved_qkv_attention,
    # `a.transpose(1, 2).reshape(B, C, H, W)`) is a non-contiguous view, and torch's forward-mode AD of group_norm
    # fails on non-contiguous inputs ("view size is not compatible"), so compute_stats' JVPs would crash. Feeding
    # every GroupNorm a contiguous copy changes no value.
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(),))
    return net


class Counting:
    """A denoiser that counts its calls (the teacher's NFE)."""

    def __init__(self, D):
        self.D, self.calls = D, 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        return self.D(x, sigma, labels)


def steps(kind, batch, teacher, precond):
    """One closure per row: a training iteration's loss and backward (no optimizer step: that and the EMA updates
    cost the same for every algorithm and are timed separately). Each algorithm keeps its own networks."""
    x = torch.randn(batch, *((2,) if kind == "mlp" else (3, 8, 8)))
    net, net_s = make_net(kind, False), make_net(kind, True)
    net_ema, net_s_ema = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net_s).requires_grad_(False)
    # θ_L of CTM's adaptive DSM weight: the last weight registered outside the s-input (as train.py picks it)
    last = [p for k, p in net_s.named_parameters() if p.ndim > 1 and not checkpoint.is_s_key(k)][-1]
    g = torch.Generator().manual_seed(0)

    def plain():                        # the unit: one plain denoiser forward + backward on the same batch
        sigma = torch.full((batch,), 1.0)
        edm.denoise(net, x, sigma).square().mean().backward()

    def plain_s():                      # the same with CTM's s-embedded network (the unit for the CTM rows)
        sigma = torch.full((batch,), 1.0)
        ctm.g(net_s, x, sigma, sigma).square().mean().backward()

    rows = {
        "plain F+B": plain,
        "plain F+B (s-net)": plain_s,
        "edm": lambda: edm.loss(edm.Config(), net, x, generator=g).mean().backward(),
        "cd": lambda: cd.loss(cd.Config(mu=0.95), net, net_ema, teacher, x, generator=g).mean().backward(),
        "mcm": lambda: mcm.loss(mcm.Config(S=2), net, teacher, x, generator=g).mean().backward(),
        "ctm (no DSM)": lambda: ctm.loss(ctm.Config(use_dsm=False), net_s, net_s_ema, teacher, x,
                                         generator=g).mean().backward(),
        "ctm": lambda: ctm.loss(ctm.Config(), net_s, net_s_ema, teacher, x, generator=g,
                                last_layer=last).mean().backward(),
        "ctm + AP": lambda: ctm.loss(ctm.Config(), net_s, net_s_ema, teacher, x, generator=g, last_layer=last,
                                     outer=lambda t, s: analytic_precond.coefficients(precond, t, s)).mean().backward(),
    }
    opt = torch.optim.Adam(net_s.parameters(), 1e-4)

    def optimizer_and_emas():           # Adam step, target θ⁻ and evaluation-EMA updates (train.py)
        opt.step()
        edm.ema_update_(net_s_ema, net_s, 0.99)  # θ⁻
        edm.ema_update_(net_s_ema, net_s, 0.99)  # and the evaluation EMA: the same work once more

    rows["Adam + EMAs"] = optimizer_and_emas
    return rows, [net, net_s]


def time_rows(kind, s, teacher_net):
    """Wall time per iteration of every row, interleaved round-robin over `repeats` blocks of `iters` iterations."""
    teacher = Counting(edm.Denoiser(teacher_net))
    batch = s["batch"][kind]
    stat_x0 = torch.randn(8, *((2,) if kind == "mlp" else (3, 8, 8)))
    precond = analytic_precond.compute_stats(analytic_precond.Config(num_intervals=4, num_samples=8), teacher.D,
                                             stat_x0, generator=torch.Generator().manual_seed(0))
    rows, nets = steps(kind, batch, teacher, precond)
    for f in rows.values():             # warm-up: allocations, kernel selection
        f()
    times = {name: [] for name in rows}
    teacher_calls = {name: 0 for name in rows}
    for _ in range(s["repeats"]):
        for name, f in rows.items():
            teacher.calls = 0
            t0 = time.perf_counter()
            for _ in range(s["iters"][kind]):
                f()
            times[name].append((time.perf_counter() - t0) / s["iters"][kind])
            teacher_calls[name] += teacher.calls
            for n in nets:
                n.zero_grad(set_to_none=True)
    n_iters = s["repeats"] * s["iters"][kind]
    return times, {k: v / n_iters for k, v in teacher_calls.items()}


def stats_cost(D, x0, s_intervals):
    """Seconds per (grid time × sample) of analytic_precond.compute_stats, from a reduced grid."""
    cfg = analytic_precond.Config(num_intervals=s_intervals, num_samples=len(x0), batch_size=len(x0))
    t0 = time.perf_counter()
    analytic_precond.compute_stats(cfg, D, x0, generator=torch.Generator().manual_seed(0))
    return (time.perf_counter() - t0) / ((s_intervals + 1) * len(x0))


def main(quick=False, out="docs/results/cost"):
    s = QUICK if quick else FULL
    t_start = time.time()
    result = {"settings": s, "expected_2k_teacher_calls_ctm": E_TWO_K, "networks": {}}
    for kind in ("mlp", "unet"):
        teacher_net = make_net(kind, False, seed=1).eval().requires_grad_(False)   # random weights: timing only
        times, teacher_calls = time_rows(kind, s, teacher_net)
        unit = {name: times["plain F+B (s-net)" if name.startswith("ctm") else "plain F+B"] for name in times}
        table = {}
        for name, ts in times.items():
            ratios = [t / u for t, u in zip(ts, unit[name])]
            fb, fwd = CALLS.get(name, (None, None))
            expected = None if fb is None else fb + (fwd + teacher_calls[name]) / 3
            table[name] = dict(s_per_iter=common.mean_sd(ts), ratio=common.mean_sd(ratios), expected_ratio=expected,
                               teacher_calls_per_iter=teacher_calls[name])
        result["networks"][kind] = dict(batch=s["batch"][kind], table=table,
                                        params=sum(p.numel() for p in teacher_net.parameters()))
        print(f"\n{kind} (batch {s['batch'][kind]}, {result['networks'][kind]['params']} parameters): wall time per "
              f"iteration, {s['repeats']} interleaved blocks of {s['iters'][kind]} (mean ± std over blocks)")
        print("  row                 |   ms / iter         | × plain F+B     | expected (NFE count) | teacher F / iter")
        for name, r in table.items():
            (m, sd), (rm, rsd) = r["s_per_iter"], r["ratio"]
            exp = "-" if r["expected_ratio"] is None else f"{r['expected_ratio']:.2f}"
            print(f"  {name:19s} | {1e3 * m:8.2f} ± {1e3 * sd:6.2f} | {rm:6.2f} ± {rsd:5.2f} | {exp:>20s} | "
                  f"{r['teacher_calls_per_iter']:6.1f}")

    # ---- Analytic-Precond statistics, as a fraction of a CTM training run
    ring = toy.ring8()
    x_toy, _ = ring.sample(s["stat_samples"]["mlp"], torch.Generator().manual_seed(0))
    per_toy = stats_cost(ring.denoiser, x_toy, s["stat_intervals"])          # the exact teacher of the toy runs
    toy_teacher = Counting(ring.denoiser)
    rows, _ = steps("mlp", s["toy_run_batch"], toy_teacher, None)
    rows["ctm"]()
    t0 = time.perf_counter()
    for _ in range(s["iters"]["mlp"]):
        rows["ctm"]()
    toy_iter = (time.perf_counter() - t0) / s["iters"]["mlp"]
    unet_teacher = edm.Denoiser(make_net("unet", False, seed=1).eval().requires_grad_(False))
    x_img = torch.randn(s["stat_samples"]["unet"], 3, 8, 8)
    per_img = stats_cost(unet_teacher, x_img, s["stat_intervals"])
    img_iter_per_sample = result["networks"]["unet"]["table"]["ctm"]["s_per_iter"][0] / s["batch"]["unet"]
    cases = {
        "toy ring8, exact teacher: train.py stats (121 × 1024) vs 3000 CTM iters at batch 256":
            (121 * 1024 * per_toy, s["toy_run_iters"] * toy_iter),
        "toy ring8, exact teacher: paper stats (121 × 4096) vs 3000 CTM iters at batch 256":
            (121 * 4096 * per_toy, s["toy_run_iters"] * toy_iter),
        "tiny UNet: train.py image stats (121 × 256) vs 6000 CTM iters at batch 256":
            (121 * 256 * per_img, s["image_run_iters"] * s["image_run_batch"] * img_iter_per_sample),
        "tiny UNet: paper stats (121 × 4096) vs the paper's ~100k CTM iters at batch 256":
            (PAPER_STATS[0] * PAPER_STATS[1] * per_img, PAPER_RUN[0] * PAPER_RUN[1] * img_iter_per_sample),
    }
    result["stats_cost"] = {"s_per_time_sample_toy": per_toy, "s_per_time_sample_unet": per_img,
                            "toy_ctm_s_per_iter_b256": toy_iter, "unet_ctm_s_per_sample": img_iter_per_sample,
                            "cases": {k: dict(stats_s=a, run_s=b, fraction=a / b) for k, (a, b) in cases.items()}}
    print(f"\nAnalytic-Precond statistics, timed on {s['stat_intervals'] + 1} grid times and extrapolated:")
    for k, (a, b) in cases.items():
        print(f"  {k}: {a:9.1f}s / {b:10.1f}s = {100 * a / b:6.2f}%")

    result["wall_time_s"] = time.time() - t_start
    return common.write(out, "cost", quick, result, lambda path: plot(path, result, s))


def plot(path, result, s):
    """Measured against expected ratio, both networks."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for a, kind in zip(ax, ("mlp", "unet")):
        table = result["networks"][kind]["table"]
        names = [n for n in table if n in CALLS]
        xs = range(len(names))
        a.bar([x - 0.2 for x in xs], [table[n]["ratio"][0] for n in names], 0.4,
              yerr=[table[n]["ratio"][1] for n in names], label="measured (± std over blocks)", color="tab:blue")
        a.bar([x + 0.2 for x in xs], [table[n]["expected_ratio"] for n in names], 0.4, label="NFE count",
              color="tab:grey")
        a.set_xticks(list(xs), names, rotation=20)
        a.set(ylabel="× plain denoiser forward + backward", title=f"{kind}, batch {s['batch'][kind]}")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    common.cli(main, __doc__)
