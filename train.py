"""One entry point for every algorithm, under plain `python` or `torchrun`.

    torchrun train.py --algo mcm                               # MCM, S = 1, 2, 4, 8, on a 2D toy: a few minutes on CPU
    python train.py --algo ctm --precond analytic --data spiral
    torchrun --nproc_per_node=8 train.py --algo cd --data cifar10:PATH --teacher edm-cifar10-32x32-uncond-vp.pkl \
        --init-from-teacher --precision fp16

Top to bottom: arguments, distributed set-up, data, teacher, then `run()` (networks, optimizer, resume, the training
loop with AMP, non-finite guard, EMAs, logging and checkpoints, then the evaluation with pictures and metrics.json),
called once per configuration (once, or once per S for MCM). The algorithms are pure functions in `algorithms/`;
everything with a side effect lives here.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import os
import time

import torch
import torch.distributed as dist

from algorithms import analytic_precond, cd, ctm, edm, mcm
from data import images, metrics, toy
from networks import checkpoint, edm_unet, uvit
from networks.mlp import MLP

ALGOS = {"edm": edm, "cd": cd, "ctm": ctm, "mcm": mcm}  # --algo name -> algorithm module
DISTANCES = {"squared_l2": edm.squared_l2, "l2": edm.l2, "pseudo_huber": edm.pseudo_huber}  # --distance -> d(a, b)
ONLY_FOR = {"precond": ("cd", "ctm"), "distance": ("cd", "ctm"), "mu": ("cd", "ctm"), "student_steps": ("mcm",),
            "gamma": ("ctm",), "no_dsm": ("ctm",),
            "teacher": ("cd", "ctm", "mcm"), "init_from_teacher": ("cd", "ctm", "mcm")}
ARCHS = {**{k: (edm_unet.SongUNet, v) for k, v in edm_unet.SONGUNET_CONFIGS.items()},
         **{k: (edm_unet.DhariwalUNet, v) for k, v in edm_unet.DHARIWALUNET_CONFIGS.items()},
         **{k: (uvit.UViT, v) for k, v in uvit.UVIT_CONFIGS.items()}}

parser = argparse.ArgumentParser(description="Train EDM, CD, CTM or MCM (see README.md).")
parser.add_argument("--algo", required=True, choices=sorted(ALGOS), help="algorithm to train")
parser.add_argument("--data", default=None, help=f"2D toy ({', '.join(toy.DATASETS)}; default ring8, two_modes for "
                    "mcm) or images: digits, cifar10:PATH, folder:DIR, zip:FILE, npz:FILE, npy:FILE")
parser.add_argument("--arch", default=None, help=f"image network (default: tiny-ddpmpp at the data's resolution): "
                    f"{', '.join(ARCHS)}")
parser.add_argument("--outdir", default=None, help="output folder (default runs/<algo>-<data>)")
parser.add_argument("--iters", type=int, default=None, help="training iterations (default: per algorithm)")
parser.add_argument("--batch", type=int, default=256, help="global batch size, split across ranks")
parser.add_argument("--batch-gpu", type=int, default=None, help="per-rank micro-batch (gradient accumulation)")
parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3 on toys, 2e-3 for ctm, "
                    "2e-4 on images)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
parser.add_argument("--xflip", action="store_true", help="random horizontal flips of images")
parser.add_argument("--cond", action="store_true", help="class-conditional, when the data has labels (as EDM's --cond)")
parser.add_argument("--teacher", default=None, help="teacher: 'exact' (default; toys and digits) or a file: an NVlabs "
                    "EDM .pkl, or a checkpoint written by this script for --algo edm")
parser.add_argument("--init-from-teacher", action="store_true", help="initialise the student from the teacher")
parser.add_argument("--precond", default=None, choices=["paper", "analytic"], help="cd/ctm: outer coefficients")
parser.add_argument("--distance", default=None, choices=sorted(DISTANCES), help="cd/ctm: the distance d")
parser.add_argument("--mu", type=float, default=None, help="cd/ctm: target EMA rate μ of θ⁻ (default: the paper's)")
parser.add_argument("--gamma", type=float, default=None, help="ctm: γ of the γ-sampler (0 deterministic, 1 CM's)")
parser.add_argument("--no-dsm", action="store_true", help="ctm: train without the DSM term")
parser.add_argument("--student-steps", default=None, help="mcm: S, or a comma list trained one after the other")
parser.add_argument("--ema-halflife", type=float, default=20_000, help="evaluation EMA half-life in samples")
parser.add_argument("--log-every", type=int, default=100)
parser.add_argument("--ckpt-every", type=int, default=500, help="checkpoint interval in iterations (0: off)")
parser.add_argument("--max-skips", type=int, default=20, help="stop after this many non-finite steps in a row")
parser.add_argument("--eval-samples", type=int, default=2000)
parser.add_argument("--fid", type=int, default=0, help="images: FID over this many samples at the end (GPU; needs "
                    "the fid extra; 50000 is the papers' protocol)")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --outdir")
args = parser.parse_args()
for flag, algos in ONLY_FOR.items():
    if getattr(args, flag) not in (None, False) and args.algo not in algos:
        parser.error(f"--{flag.replace('_', '-')} applies to --algo {' or '.join(algos)}, not {args.algo}")
is_toy = args.data is None or args.data in toy.DATASETS
data_name = args.data or ("two_modes" if args.algo == "mcm" else "ring8")

# ---------------------------------------------------------------- distributed set-up (read from torchrun's env)
rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
ddp = world_size > 1
device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
if ddp:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # gloo: CPU runs and tests
master = rank == 0
log = print if master else (lambda *a, **k: None)
if args.batch % world_size:
    parser.error(f"--batch {args.batch} is not divisible by the number of processes ({world_size})")
batch_local = args.batch // world_size
batch_gpu = args.batch_gpu or batch_local
if batch_local % batch_gpu:
    parser.error(f"--batch-gpu {batch_gpu} does not divide the per-rank batch {batch_local}")
accum = batch_local // batch_gpu  # micro-batches per rank and step
outdir = args.outdir or os.path.join("runs", f"{args.algo}-{data_name.split(':')[0]}")

# ---------------------------------------------------------------- data: checked in full before any training
if is_toy:
    dataset = toy.DATASETS[data_name]()
    x_train, y_train = dataset.sample(65536, torch.Generator().manual_seed(args.seed), torch.float32)
    num_train, label_dim, data_shape = len(x_train), dataset.label_dim if args.cond else 0, (dataset.dim,)
else:
    try:
        dataset = images.open_dataset(data_name)
    except (images.DatasetError, ImportError) as e:
        parser.error(f"--data {data_name}: {e}")
    num_train, label_dim = len(dataset), dataset.num_classes if args.cond else 0
    data_shape = (dataset.channels, dataset.resolution, dataset.resolution)

if args.cond and not label_dim:
    parser.error(f"--cond: the dataset {data_name!r} has no class labels")


def get_batch(indices, g):
    """Training examples and one-hot labels (or None) at `indices`, on the device."""
    if is_toy:
        x, y = x_train[indices], (None if y_train is None or not label_dim else y_train[indices])
    else:
        x, y = dataset.batch(indices.numpy(), args.xflip, g)
        y = None if y is None or not label_dim else images.one_hot(y, label_dim)
    return x.to(device), (None if y is None else y.to(device))


def global_batch_indices(step):
    """Indices of the global batch at `step`: a function of (seed, step) only, so that resuming needs no loader
    state and every rank agrees on the batch without communication (the data position is the step)."""
    per_epoch = max(num_train // args.batch, 1)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
    return perm[i * args.batch:(i + 1) * args.batch]


# ---------------------------------------------------------------- the teacher φ (frozen) and the student's network
arch = None if is_toy else args.arch or f"tiny-ddpmpp-{dataset.resolution}"
if args.arch and (is_toy or arch not in ARCHS):
    parser.error(f"--arch {args.arch!r}: " + ("toys use the 2D MLP" if is_toy else f"choose one of {', '.join(ARCHS)}"))
teacher_arch = None  # (class, kwargs) of a published teacher: the student copies its architecture


def make_network(s_embedding):
    """A raw network F: the published teacher's architecture, else the 2D MLP for toys, else the named image
    architecture fitted to the data's channels and labels."""
    if teacher_arch is None and is_toy:
        return MLP(dim=dataset.dim, label_dim=label_dim, s_embedding=s_embedding)
    cls, kwargs = teacher_arch or ARCHS[arch]
    if teacher_arch is None:
        fit = dict(label_dim=label_dim, **(dict(img_channels=dataset.channels) if cls is uvit.UViT else
                                           dict(in_channels=dataset.channels, out_channels=dataset.channels)))
        kwargs = {**kwargs, **fit}
    return cls(**kwargs, s_embedding=s_embedding)


teacher_net = None  # the teacher's raw network, when the teacher is one (for --init-from-teacher)
if args.algo == "edm":
    teacher = None
elif args.teacher in (None, "exact"):
    teacher = dataset.denoiser if is_toy else images.EmpiricalTeacher(dataset).to(device)
    if args.init_from_teacher:
        parser.error("--init-from-teacher needs a teacher network (--teacher FILE), not the exact denoiser")
else:
    try:
        if args.teacher.endswith(".pkl"):  # NVlabs EDM: read without executing the code inside the pickle
            published = checkpoint.load_edm_pickle(args.teacher)
            teacher_net, teacher_arch = published.net, (type(published.net), published.net_kwargs)
        else:  # a checkpoint of this script's --algo edm, with the same data and --arch
            teacher_net = make_network(False)
            state = torch.load(args.teacher, map_location="cpu", weights_only=True)
            teacher_net.load_state_dict(state["ema"] if isinstance(state, dict) and "ema" in state else state)
    except (checkpoint.CheckpointError, OSError, RuntimeError, KeyError) as e:
        parser.error(f"--teacher {args.teacher}: {e}")
    res, ch = getattr(teacher_net, "img_resolution", None), getattr(teacher_net, "img_channels", None)
    if not is_toy and (res, ch) != (dataset.resolution, dataset.channels):
        parser.error(f"--teacher {args.teacher}: a {res}x{res}x{ch} network, but the data is "
                     f"{dataset.resolution}x{dataset.resolution}x{dataset.channels}")
    teacher = edm.Denoiser(teacher_net.to(device).eval().requires_grad_(False))

amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]


def autocast():
    """Mixed precision for every network call of a step, teacher and target included: bf16 autocast (CPU or GPU),
    or fp16 autocast with a dynamic GradScaler (CUDA; also runs on CPU)."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def configs():
    """The algorithm's Config with the paper's defaults, overridden by the flags given: one per run."""
    cfg = ALGOS[args.algo].Config()
    overrides = {k: getattr(args, k) for k in ("mu", "gamma") if getattr(args, k) is not None}
    if args.no_dsm:
        overrides["use_dsm"] = False
    if is_toy and args.mu is None and args.algo in ("cd", "ctm"):
        # The papers' targets are tuned for 100k+ iterations (CD on CIFAR-10 μ = 0, CTM μ = 0.999); for a few thousand
        # iterations on a toy, CD trains best with ImageNet's μ = 0.95 and CTM with 0.99 (measured; see the notes).
        overrides["mu"] = {"cd": 0.95, "ctm": 0.99}[args.algo]
    if args.algo != "mcm":
        return [(outdir, dataclasses.replace(cfg, **overrides))]
    steps = [int(S) for S in (args.student_steps or "1,2,4,8").split(",")]
    cfg = dataclasses.replace(cfg, anneal_iters=default_iters() // 2)  # App. A.1: anneal over half the run
    return [(os.path.join(outdir, f"S{S}") if len(steps) > 1 else outdir, dataclasses.replace(cfg, S=S))
            for S in steps]


def default_iters():
    return args.iters or {"edm": 2000, "cd": 3000, "ctm": 3000, "mcm": 1500}[args.algo] * (1 if is_toy else 2)


def generate(cfg, net, noise, labels, nfe, precond, path=None):
    """Samples from a trained network at `nfe` (EDM: the Heun sampler, whose NFE is fixed by cfg.num_steps)."""
    if args.algo == "edm":
        return edm.sample(cfg, lambda x, sigma, y: edm.denoise(net, x, sigma, y), noise, labels)
    if args.algo == "mcm":
        return mcm.sample(cfg, net, noise, labels, nfe, path)
    outer = None if precond is None else lambda t, s: analytic_precond.coefficients(precond, t, s)
    return ALGOS[args.algo].sample(cfg, net, noise, labels, nfe, torch.Generator(noise.device).manual_seed(2), path,
                                   outer)


def eval_nfes(cfg):
    return [2 * cfg.num_steps - 1] if args.algo == "edm" else [cfg.S] if args.algo == "mcm" else [1, 2, 4]


# ---------------------------------------------------------------- one training run
def run(outdir, cfg):
    if master:
        os.makedirs(outdir, exist_ok=True)
    iters, lr = default_iters(), args.lr or ((2e-3 if args.algo == "ctm" else 1e-3) if is_toy else 2e-4)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (and so for net_ema and ema, too)
    net = make_network(s_embedding=args.algo == "ctm").to(device)
    if args.init_from_teacher:  # every student starts as the teacher (CM, CTM and MCM all do)
        checkpoint.load_teacher_into_student(net, teacher_net)
    net_ema = copy.deepcopy(net).requires_grad_(False) if args.algo in ("cd", "ctm") else None  # target θ⁻
    ema = copy.deepcopy(net).requires_grad_(False)  # evaluation EMA (EDM-style half-life), never a teacher
    precond = None
    if args.precond == "analytic":  # Analytic-Precond statistics: once per teacher, cached beside the run
        stats_path = os.path.join(outdir, "analytic_precond_stats.pt")
        if os.path.exists(stats_path):  # refused if they were computed for another teacher (a fingerprint check)
            precond = analytic_precond.load(stats_path, teacher, device)
        else:
            t0 = time.time()
            ap_cfg = analytic_precond.Config(num_samples=1024 if is_toy else 256)
            idx = torch.randperm(num_train, generator=torch.Generator().manual_seed(args.seed))[:ap_cfg.num_samples]
            x0, y0 = get_batch(idx, None)
            precond = analytic_precond.compute_stats(ap_cfg, teacher, x0, y0, torch.Generator(device).manual_seed(1))
            if master:
                analytic_precond.save(precond, stats_path)
            log(f"Analytic-Precond statistics: {time.time() - t0:.1f}s")
        T, eps = torch.tensor([edm.SIGMA_MAX], dtype=torch.float64), torch.tensor([edm.SIGMA_MIN], dtype=torch.float64)
        alpha = analytic_precond.coefficients(precond, T, eps)[1].item()
        if abs(alpha) > 10 * edm.SIGMA_DATA:  # CTM's α(T, ε) ≈ σ_data; the paper says the two nearly coincide
            log(f"warning: Analytic-Precond's α(T, ε) = {alpha:.3g}, far from CTM's {edm.SIGMA_DATA}: on this data the "
                f"reconstructed coefficients are ill-conditioned and training may diverge (docs/results.md, claim 1)")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    torch.manual_seed(args.seed * 1009 + rank)  # per-rank seed for anything not driven by the explicit generators
    ddp_net = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    # CTM's adaptive DSM weight differentiates w.r.t. the output layer's weight: the last weight matrix or kernel
    # registered, skipping the s-input's layers, which every network registers after its output layer.
    last_layer = [p for k, p in net.named_parameters() if p.ndim > 1 and not checkpoint.is_s_key(k)][-1]

    outer = None if precond is None else lambda t, s: analytic_precond.coefficients(precond, t, s)
    distance = DISTANCES[args.distance or "squared_l2"]

    def training_loss(x, labels, step, g):
        if args.algo == "edm":
            return edm.loss(cfg, ddp_net, x, labels, generator=g)
        if args.algo == "cd":
            return cd.loss(cfg, ddp_net, net_ema, teacher, x, labels, generator=g, outer=outer, distance=distance)
        if args.algo == "ctm":
            return ctm.loss(cfg, ddp_net, net_ema, teacher, x, labels, generator=g, outer=outer, distance=distance,
                            last_layer=last_layer, grad_scale=scaler.get_scale() if scaler.is_enabled() else 1.0)
        return mcm.loss(cfg, ddp_net, teacher, x, labels, step=step, generator=g)

    def save_checkpoint(step):  # atomic, complete, loadable with weights_only=True
        state = dict(step=step, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                     scaler=scaler.state_dict(), rng_cpu=torch.get_rng_state(), args=vars(args))
        if net_ema is not None:
            state["net_ema"] = net_ema.state_dict()
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        path = os.path.join(outdir, f"ckpt-{step:07d}.pt")
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a kill leaves either the old file or the new one, never half of one
        for old in sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")))[:-2]:
            os.remove(old)

    step = 0
    if args.resume:  # the newest checkpoint that loads; a truncated or corrupt one is reported, kept and skipped
        for path in sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")), reverse=True):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure to read means "not a usable checkpoint"
                log(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {str(e)[:200]}")
                continue
            net.load_state_dict(state["net"]), ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"]), scaler.load_state_dict(state["scaler"])
            if net_ema is not None:
                net_ema.load_state_dict(state["net_ema"])
            torch.set_rng_state(state["rng_cpu"])
            if "rng_cuda" in state and device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            step = state["step"]
            log(f"resumed from {path} at iteration {step}")
            break

    stats_file = open(os.path.join(outdir, "stats.jsonl"), "a") if master else None
    skips_in_row, skips_total, t_start, step0 = 0, 0, time.time(), step
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count] since the last log line
    while step < iters:
        idx = global_batch_indices(step)
        opt.zero_grad(set_to_none=True)
        for m in range(accum):
            # A micro-batch's examples and noise depend only on its global position j, so N ranks and one rank with
            # N-fold accumulation see identical examples and identical noise.
            j = rank * accum + m
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 4099 + j)
            x, labels = get_batch(idx[j * batch_gpu:(j + 1) * batch_gpu], torch.Generator().manual_seed(step * 4099 + j))
            with ddp_net.no_sync() if ddp and m < accum - 1 else contextlib.nullcontext():
                with autocast():
                    loss = training_loss(x, labels, step, g).float().mean()
                scaler.scale(loss / accum).backward()
            loss_sum += torch.stack([loss.detach().double() * len(x), torch.tensor(len(x), device=device)])
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))  # measures, never clips
        if torch.isfinite(grad_norm):  # identical on every rank: DDP has averaged the gradients
            scaler.step(opt)
            skips_in_row = 0
        else:
            skips_in_row, skips_total = skips_in_row + 1, skips_total + 1
            log(f"iteration {step}: non-finite loss or gradient, step skipped ({skips_in_row} in a row)")
            if skips_in_row >= args.max_skips:
                raise SystemExit(f"stopping: {skips_in_row} non-finite steps in a row at iteration {step}; "
                                 f"try --precision fp32 or a lower --lr")
        scaler.update()
        step += 1
        with torch.no_grad():
            if net_ema is not None:  # target θ⁻ ← μ·θ⁻ + (1 − μ)·θ (CM Alg. 2 l. 9; CTM §8)
                for p_t, p in zip(net_ema.parameters(), net.parameters()):
                    p_t.lerp_(p, 1 - cfg.mu)
            beta = 0.5 ** (args.batch / max(args.ema_halflife, 1e-8))  # EDM: β = 0.5^(batch / half-life)
            for p_e, p in zip(ema.parameters(), net.parameters()):
                p_e.lerp_(p, 1 - beta)
        if step % args.log_every == 0 or step == iters:
            if ddp:
                dist.all_reduce(loss_sum)
            mean_loss = (loss_sum[0] / loss_sum[1]).item()
            loss_sum.zero_()
            elapsed = time.time() - t_start
            rate = (step - step0) * args.batch / elapsed
            log(f"iter {step:6d}/{iters}  {rate:8.0f} samples/s  loss {mean_loss:.4g}  skipped {skips_total}  "
                f"ETA {(iters - step) * args.batch / rate:5.0f}s", flush=True)
            if master:
                stats_file.write(json.dumps(dict(iter=step, loss=mean_loss, samples_per_s=rate,
                                                 skipped=skips_total, time=elapsed)) + "\n")
                stats_file.flush()
        if args.ckpt_every and step % args.ckpt_every == 0 and master:
            save_checkpoint(step)
            snapshot(outdir, cfg, ema, precond, step)
    if master and args.ckpt_every and step % args.ckpt_every:
        save_checkpoint(step)
    return evaluate(outdir, cfg, ema, precond, step, time.time() - t_start) if master else None


# ---------------------------------------------------------------- evaluation against the teacher (rank 0)
def picture(draw, path, *a, **k):
    """Write a picture with `plots.<draw>`; without the optional matplotlib, say so once per picture and go on."""
    try:
        import plots
    except ImportError as e:
        return log(f"no picture {path} ({e}); install the plot extra: pip install -e '.[plot]'")
    log(f"wrote {getattr(plots, draw)(path, *a, **k)}")


def describe():
    """The run as a picture title: algorithm and data and, for cd/ctm, the preconditioning."""
    pre = "Analytic-Precond" if args.precond == "analytic" else {"cd": "CM's", "ctm": "CTM's"}.get(args.algo)
    return f"{args.algo} on {data_name}" + (f", {pre} preconditioning" if pre else "")


@torch.no_grad()
def snapshot(outdir, cfg, net, precond, step, n=512):
    """A picture of the evaluation EMA's samples at the fewest NFE, written with each checkpoint."""
    nfe = eval_nfes(cfg)[0]
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(n if is_toy else 64, *data_shape, generator=g).to(device)
    was_training = net.training
    x = generate(cfg, net.eval(), noise, None if label_dim == 0 else images.one_hot(
        torch.arange(len(noise), device=device) % label_dim, label_dim), nfe, precond)
    net.train(was_training)
    picture("samples", os.path.join(outdir, f"samples-{step:07d}.png"), {f"{nfe} NFE": x},
            f"{describe()}, iteration {step}", x_train[:n] if is_toy else get_batch(torch.arange(len(noise)), None)[0])


@torch.no_grad()
def evaluate(outdir, cfg, net, precond, step, wall):
    """Samples from the evaluation EMA at each NFE, the teacher gap against the teacher's ODE solution from the
    same noise (exact for toys and digits, 35-NFE Heun for a network teacher), and the distance to data."""
    n = args.eval_samples if is_toy else min(args.eval_samples, 256)
    # Toys: float64 on the CPU, so that the gap measures distillation and not rounding. Images: the run's device.
    dev, dtype = (torch.device("cpu"), torch.float64) if is_toy else (device, torch.float32)
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(n, *data_shape, generator=g, dtype=dtype).to(dev)
    x_data, labels = get_batch(torch.randperm(num_train, generator=g)[:n], None)
    x_data, labels = x_data.to(dev, dtype), None if labels is None else labels.to(dev, dtype)
    net = copy.deepcopy(net).to(dev, dtype).eval()
    if teacher_net is not None:
        # A network teacher: its own 35-NFE Heun solution from the same noise is the reference.
        x_ref = edm.sample(edm.Config(), copy.deepcopy(teacher).to(dev, dtype), noise, labels)
    elif is_toy or data_name == "digits":
        # An exact teacher (or, for EDM, the exact denoiser of the data): the PF-ODE solved to float64 accuracy.
        D_exact = dataset.denoiser if is_toy else images.EmpiricalTeacher(dataset).to(dev)
        x_ref = toy.ode_solve(D_exact, noise * edm.SIGMA_MAX, edm.SIGMA_MAX, edm.SIGMA_MIN, labels).to(dtype)
    else:
        x_ref = None  # EDM on a real dataset: no reference short of the data itself
    res = {"algo": args.algo, "data": data_name, "iters": step, "wall_time_s": wall,
           "precond": args.precond or "paper",
           "sw2_teacher_to_data": None if x_ref is None else metrics.sliced_wasserstein(x_ref, x_data)}
    paths = {nfe: [] for nfe in eval_nfes(cfg)}
    samples = {nfe: generate(cfg, net, noise, labels, nfe, precond, paths[nfe]) for nfe in paths}
    res["by_nfe"] = {nfe: dict(teacher_gap=None if x_ref is None else metrics.teacher_gap(x, x_ref),
                               sw2_to_data=metrics.sliced_wasserstein(x, x_data)) for nfe, x in samples.items()}
    log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items() if k != "by_nfe"))
    for nfe, m in res["by_nfe"].items():
        log(f"  NFE {nfe:3d}: teacher gap {m['teacher_gap'] or float('nan'):.3e}   SW2 to data {m['sw2_to_data']:.4f}")
    if args.fid and not is_toy:  # the papers' FID (Inception features via torch-fidelity), on the run's device
        from data import fid
        net_fid = net.to(device, torch.float32)
        for nfe in eval_nfes(cfg):
            gen = lambda k: generate(cfg, net_fid, torch.randn(k, *data_shape, device=device), None, nfe, precond)
            res["by_nfe"][nfe]["fid"] = fid.fid(gen, dataset, args.fid)
            log(f"  NFE {nfe:3d}: FID {res['by_nfe'][nfe]['fid']:.3f} over {args.fid} samples")
    with open(os.path.join(outdir, "metrics.json"), "w") as f:
        json.dump(res, f, indent=2)
    panels = {**{f"{k} NFE": v for k, v in samples.items()}, **({} if x_ref is None else {"teacher": x_ref})}
    picture("samples", os.path.join(outdir, "samples.png"), panels, describe() +
            (f", S = {cfg.S}" if args.algo == "mcm" else ""), x_data, {f"{k} NFE": v for k, v in paths.items()})
    return res, samples, paths, x_data, x_ref


results = [run(d, cfg) for d, cfg in configs()]
if master and len(results) > 1:  # MCM over several S: one summary (and for toys a Fig. 1-style picture of the paths)
    summary = {f"S={nfe}": m for r in results for nfe, m in r[0]["by_nfe"].items()}
    summary["teacher_sw2_to_data"] = results[0][0]["sw2_teacher_to_data"]
    with open(os.path.join(outdir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    panels = {**{f"S = {k}": v for r in results for k, v in r[1].items()},
              **({} if results[0][4] is None else {"teacher": results[0][4]})}
    picture("samples", os.path.join(outdir, "samples.png"), panels, f"{describe()}, NFE = S", results[0][3])
    if is_toy:  # Heek et al. Fig. 1: the S-step paths against the teacher's ODE paths from the same noise
        paths = {f"S = {nfe}": torch.stack(p)[:, :32] for r in results for nfe, p in r[2].items()}  # [S+1, 32, 2]
        picture("mcm_paths", os.path.join(outdir, "trajectories.png"), dataset.denoiser, paths)
if ddp:
    dist.barrier()  # the other ranks wait for rank 0's evaluation: tearing gloo down under it aborts the process
    dist.destroy_process_group()
