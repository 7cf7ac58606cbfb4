"""One entry point for every algorithm, under plain `python` or `torchrun`.

    python train.py --algo edm                              # an EDM teacher on a 2D toy, about a minute on CPU
    torchrun --standalone --nproc_per_node=2 train.py --algo edm --precision bf16

Top to bottom: arguments, distributed set-up, data, networks, optimizer, resume, the training loop (loss, AMP,
non-finite guard, EMA, logging, checkpoints), and the final evaluation with its picture and metrics.json.
The algorithms themselves are pure functions in `algorithms/`; everything with a side effect lives here.
"""
import argparse
import contextlib
import copy
import glob
import json
import math
import os
import time

import torch
import torch.distributed as dist

from algorithms import edm
from data import metrics, toy
from networks.mlp import MLP

ALGOS = {"edm": edm}  # --algo name -> algorithm module

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--algo", required=True, choices=sorted(ALGOS), help="algorithm to train")
parser.add_argument("--data", default="ring8", help=f"2D toy dataset: {', '.join(toy.DATASETS)}")
parser.add_argument("--outdir", default=None, help="output folder (default runs/<algo>-<data>)")
parser.add_argument("--iters", type=int, default=2000, help="training iterations")
parser.add_argument("--batch", type=int, default=256, help="global batch size, split across ranks")
parser.add_argument("--batch-gpu", type=int, default=None, help="per-rank micro-batch (gradient accumulation)")
parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
parser.add_argument("--ema-halflife", type=float, default=20_000, help="evaluation EMA half-life in samples")
parser.add_argument("--log-every", type=int, default=100)
parser.add_argument("--ckpt-every", type=int, default=500, help="checkpoint interval in iterations (0: off)")
parser.add_argument("--max-skips", type=int, default=20, help="stop after this many non-finite steps in a row")
parser.add_argument("--eval-samples", type=int, default=2000)
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --outdir")
args = parser.parse_args()
if args.data not in toy.DATASETS:
    parser.error(f"--data {args.data!r}: unknown dataset; choose one of {', '.join(toy.DATASETS)}")

# ---------------------------------------------------------------- distributed set-up (read from torchrun's env)
rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
ddp = world_size > 1
device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
if ddp:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
master = rank == 0
log = print if master else (lambda *a, **k: None)
if args.batch % world_size:
    parser.error(f"--batch {args.batch} is not divisible by the number of processes ({world_size})")
batch_local = args.batch // world_size
batch_gpu = args.batch_gpu or batch_local
if batch_local % batch_gpu:
    parser.error(f"--batch-gpu {batch_gpu} does not divide the per-rank batch {batch_local}")
accum = batch_local // batch_gpu  # micro-batches per rank and step
outdir = args.outdir or os.path.join("runs", f"{args.algo}-{args.data}")
if master:
    os.makedirs(outdir, exist_ok=True)
torch.manual_seed(args.seed)

# ---------------------------------------------------------------- data: a fixed training set, reshuffled each epoch
dataset = toy.DATASETS[args.data]()
x_train, y_train = dataset.sample(65536, torch.Generator().manual_seed(args.seed), torch.float32)


def global_batch_indices(step):
    """Indices of the global batch at `step`: a deterministic function of (seed, step), so that resuming needs no
    data-loader state and every rank agrees on the batch without communication."""
    per_epoch = len(x_train) // args.batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
    return perm[i * args.batch:(i + 1) * args.batch]


# ---------------------------------------------------------------- networks of the run
net = MLP(dim=dataset.dim, label_dim=dataset.label_dim).to(device)
ema = copy.deepcopy(net).requires_grad_(False)  # evaluation EMA (EDM-style half-life), never a teacher
cfg = edm.Config()
opt = torch.optim.Adam(net.parameters(), lr=args.lr)
ddp_net = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
# fp16 needs loss scaling; the dynamic scaler's state is checkpointed. bf16 has fp32's range and needs none.
scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")


def autocast():
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def training_loss(x, labels, g):
    if args.algo == "edm":
        return edm.loss(cfg, ddp_net, x, labels, generator=g)
    raise AssertionError(args.algo)


# ---------------------------------------------------------------- checkpoints: atomic, complete, weights_only-safe
def save_checkpoint(step):
    state = dict(step=step, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                 scaler=scaler.state_dict(), rng_cpu=torch.get_rng_state(), args=vars(args))
    path = os.path.join(outdir, f"ckpt-{step:07d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a kill leaves either the old or the new file, never half of one
    for old in sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")))[:-2]:
        os.remove(old)


def load_newest_checkpoint():
    """Newest checkpoint that loads; a truncated or corrupt one is reported and skipped, never deleted."""
    for path in sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")), reverse=True):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read means "not a usable checkpoint"
            log(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None, None


step = 0
if args.resume:
    path, state = load_newest_checkpoint()
    if state is None:
        log(f"--resume: no usable checkpoint in {outdir}, starting from scratch")
    else:
        net.load_state_dict(state["net"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]), scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        step = state["step"]
        log(f"resumed from {path} at iteration {step}")

# ---------------------------------------------------------------- training loop
stats_file = open(os.path.join(outdir, "stats.jsonl"), "a") if master else None
skips_in_row, skips_total, t_start, step0 = 0, 0, time.time(), step
loss_sum = torch.zeros(2, device=device)  # [sum of losses, count] since the last log line
while step < args.iters:
    idx = global_batch_indices(step)
    opt.zero_grad(set_to_none=True)
    for m in range(accum):
        # The micro-batch's slice and its noise depend only on its global position, so N ranks and one rank with
        # N-fold accumulation see identical examples and identical noise.
        j = rank * accum + m
        sl = idx[j * batch_gpu:(j + 1) * batch_gpu]
        x = x_train[sl].to(device)
        labels = None if y_train is None else y_train[sl].to(device)
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 4099 + j)
        no_sync = ddp_net.no_sync() if ddp and m < accum - 1 else contextlib.nullcontext()
        with no_sync:
            with autocast():
                loss = training_loss(x, labels, g).float().mean()
            scaler.scale(loss / accum).backward()
        loss_sum += torch.stack([loss.detach() * batch_gpu, torch.tensor(float(batch_gpu), device=device)])
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))  # only measures the norm
    if torch.isfinite(grad_norm):
        scaler.step(opt)  # with fp16 the scaler also skips steps whose unscaled gradients overflowed
        skips_in_row = 0
    else:
        skips_in_row, skips_total = skips_in_row + 1, skips_total + 1
        log(f"iteration {step}: non-finite loss or gradient, step skipped ({skips_in_row} in a row)")
        if skips_in_row >= args.max_skips:
            raise SystemExit(f"stopping: {skips_in_row} non-finite steps in a row at iteration {step}; "
                             f"try --precision fp32 or a lower --lr")
    scaler.update()
    step += 1
    with torch.no_grad():  # EDM's EMA: ema <- β·ema + (1−β)·net with β = 0.5^(batch / half-life)
        beta = 0.5 ** (args.batch / max(args.ema_halflife, 1e-8))
        for p_ema, p in zip(ema.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
    if step % args.log_every == 0 or step == args.iters:
        if ddp:
            dist.all_reduce(loss_sum)
        mean_loss = (loss_sum[0] / loss_sum[1]).item()
        loss_sum.zero_()
        elapsed = time.time() - t_start
        rate = (step - step0) * args.batch / elapsed
        eta = (args.iters - step) * args.batch / rate
        log(f"iter {step:6d}/{args.iters}  {rate:8.0f} samples/s  loss {mean_loss:.4f}  "
            f"skipped {skips_total}  ETA {eta:5.0f}s", flush=True)
        if master:
            stats_file.write(json.dumps(dict(iter=step, loss=mean_loss, samples_per_s=rate, skipped=skips_total,
                                             time=elapsed)) + "\n")
            stats_file.flush()
    if args.ckpt_every and step % args.ckpt_every == 0 and master:
        save_checkpoint(step)
if master and args.ckpt_every:
    save_checkpoint(step)

# ---------------------------------------------------------------- final evaluation against the exact teacher (rank 0)
if master:
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.eval_samples, dataset.dim, generator=g, dtype=torch.float64)
    x_data, y_eval = dataset.sample(args.eval_samples, g, torch.float64)
    # The exact teacher: the PF-ODE of the true data distribution, solved to 1e-7 from the same noise.
    x_ode = dataset.ode(noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN, y_eval)
    ema64 = copy.deepcopy(ema).cpu().double()
    D = lambda x_, sigma, labels_: edm.denoise(ema64, x_, sigma, labels_)
    x_gen = edm.sample(cfg, D, noise, y_eval)
    results = {"algo": args.algo, "data": args.data, "iters": step, "nfe": 2 * cfg.num_steps - 1,
               "teacher_gap": metrics.teacher_gap(x_gen, x_ode),
               "sw2_to_data": metrics.sliced_wasserstein(x_gen, x_data),
               "sw2_exact_teacher_to_data": metrics.sliced_wasserstein(x_ode, x_data),
               "wall_time_s": time.time() - t_start}
    for k, v in results.items():
        log(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    with open(os.path.join(outdir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    try:
        import plots
        png = plots.scatter(os.path.join(outdir, "samples.png"), x_data,
                            {f"EDM Heun, {results['nfe']} NFE": x_gen, "exact PF-ODE": x_ode},
                            title=f"{args.algo} on {args.data}")
        log(f"wrote {png}")
    except ImportError as e:
        log(f"no picture ({e}); install the plot extra: pip install -e '.[plot]'")
if ddp:
    dist.destroy_process_group()
