"""One entry point for every algorithm, under plain `python` or `torchrun`.

    torchrun train.py --algo mcm                               # MCM, S = 1, 2, 4, 8, on a 2D toy: a few minutes on CPU
    torchrun --nproc_per_node=8 train.py --algo cd --data cifar10:PATH --teacher edm-cifar10-32x32-uncond-vp.pkl \
        --init-from-teacher --precision fp16

Top to bottom: each algorithm's defaults, the arguments (every one checked before any work), distributed set-up,
data, teacher, then `run()`: networks, optimizer, resume, the training loop (AMP, non-finite guard, EMAs, logging,
checkpoints) and the evaluation (`evaluate.py`); once, or once per S for MCM. The algorithms are pure functions in
`algorithms/`; run folders, resume checks and checkpoint files are `rundir.py`'s.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import evaluate
import rundir
from algorithms import edm
from data import images, loader, toy
from networks import checkpoint

# Each algorithm's defaults: toy data, iterations on toys (twice as many on images), Adam's lr on toys and images,
# the target rate μ on toys (the papers' μ is tuned for 100k+ iterations; None: no target network), the s-input of
# CTM's network, the student's dropout on images (None: the architecture's), and the flags that apply only to it.
# The evaluation NFEs follow from the Config (`evaluate.eval_nfes`): EDM's Heun 35, MCM's S, else 1, 2 and 4.
ALGOS = {
    "edm": dict(data="ring8", iters=2000, lr=(1e-3, 2e-4), mu=None, s_input=False, dropout=None, flags=()),
    "cd": dict(data="ring8", iters=3000, lr=(1e-3, 2e-4), mu=0.95, s_input=False, dropout=0.0,  # CM: student 0
               flags=("teacher", "init_from_teacher", "precond", "distance", "mu")),
    "ctm": dict(data="ring8", iters=3000, lr=(2e-3, 2e-4), mu=0.99, s_input=True, dropout=0.13,  # CTM's SongUNet
                flags=("teacher", "init_from_teacher", "precond", "distance", "mu", "gamma", "no_dsm")),
    "mcm": dict(data="two_modes", iters=1500, lr=(1e-3, 2e-4), mu=None, s_input=False, dropout=None,
                flags=("teacher", "init_from_teacher", "student_steps", "ct", "teacher_step")),
}
DISTANCES = {"squared_l2": edm.squared_l2, "l2": edm.l2, "pseudo_huber": edm.pseudo_huber}  # --distance -> d(a, b)
ARCHS = checkpoint.architectures()
AMP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype

parser = argparse.ArgumentParser(description="Train EDM, CD, CTM or MCM (see README.md).")
arg = parser.add_argument
arg("--algo", required=True, choices=sorted(ALGOS), help="algorithm to train")
arg("--data", help=f"2D toy ({', '.join(toy.DATASETS)}; default ring8, two_modes for mcm) or images: digits, "
    "cifar10:PATH, folder:DIR, zip:FILE, npz:FILE, npy:FILE")
arg("--arch", help=f"image network (default tiny-ddpmpp at the data's resolution): {', '.join(ARCHS)}")
arg("--outdir", help="output folder (default runs/<algo>-<data>[-<variant>])")
arg("--iters", type=rundir.pos_int, help="training iterations (default: per algorithm)")
arg("--batch", type=rundir.pos_int, default=256, help="global batch size, split across ranks")
arg("--batch-gpu", type=rundir.pos_int, help="per-rank micro-batch (gradient accumulation)")
arg("--lr", type=rundir.pos_float, help="Adam learning rate (default: per algorithm, toys and images)")
arg("--seed", type=rundir.nonneg_int, default=0)
arg("--precision", default="fp32", choices=list(AMP))
arg("--xflip", action="store_true", help="images: random horizontal flips")
arg("--cond", action="store_true", help="class-conditional, when the data has labels (as EDM's --cond)")
arg("--teacher", help="'exact' (default; toys, digits), an NVlabs EDM .pkl, or a run of this script's --algo edm")
arg("--init-from-teacher", action="store_true", help="initialise the student from the teacher network")
arg("--precond", choices=["paper", "analytic"], help="cd/ctm: outer coefficients")
arg("--distance", choices=sorted(DISTANCES), help="cd/ctm: the distance d (default squared_l2)")
arg("--mu", type=rundir.rate, help="cd/ctm: target EMA rate μ of θ⁻, in [0, 1)")
arg("--gamma", type=rundir.fraction, help="ctm: γ of the γ-sampler (0 deterministic, 1 CM's)")
arg("--no-dsm", action="store_true", help="ctm: train without the DSM term")
arg("--student-steps", type=rundir.step_list, help="mcm: S, or a comma list trained in turn (default 1,2,4,8)")
arg("--teacher-step", choices=["addim", "ddim"], help="mcm: the teacher's step (default aDDIM, Alg. 1; DDIM is the "
    "Table 4 ablation, docs/results.md claim 5)")
arg("--ct", action="store_true", help="mcm: consistency training, no teacher (Heek et al. Alg. 1 with the true x)")
arg("--dropout", type=rundir.rate, help="images: the student's dropout (default: the paper's)")
arg("--ema-halflife", type=rundir.pos_float, help="evaluation EMA half-life in samples (default 20k toys, 500k images)")
arg("--ema-rampup", type=rundir.fraction, default=0.05, help="EMA half-life ramp-up ratio (EDM: 0.05; 0: off)")
arg("--log-every", type=rundir.pos_int, default=100)
arg("--ckpt-every", type=rundir.nonneg_int, default=500, help="checkpoint interval in iterations (0: at the end)")
arg("--max-skips", type=rundir.pos_int, default=20, help="stop after this many non-finite steps in a row")
arg("--eval-samples", type=rundir.at_least(4), help="evaluation samples (default 16384 on toys, 256 on images)")
arg("--fid", type=rundir.nonneg_int, default=0, help="images: FID over this many samples at the end (fid extra)")
arg("--workers", type=rundir.nonneg_int, help="images: data loader workers (default 2)")
arg("--resume", action="store_true", help="continue from the newest checkpoint in --outdir")
args = parser.parse_args()
A = ALGOS[args.algo]
rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                                      ("WORLD_SIZE", 1)))
master, ddp = rank == 0, world_size > 1


def fail(message):
    """A clear error on rank 0 (exit code 2, as argparse), a silent exit 2 elsewhere; nothing has been written."""
    parser.error(message) if master else sys.exit(2)


data_name = args.data or A["data"]
is_toy = data_name in toy.DATASETS
steps = args.student_steps or ([1, 2, 4, 8] if args.algo == "mcm" else [None])
variants = {"cond": args.cond, "analytic": args.precond == "analytic", "ct": args.ct, "teacher-net": args.teacher
            not in (None, "exact"), f"S{steps[0]}": bool(args.student_steps) and len(steps) == 1}
outdir = args.outdir or rundir.default_outdir({**vars(args), "data": data_name},
                                              vars(parser.parse_args(["--algo", args.algo])), variants)
try:
    rundir.check_flags(args, ALGOS, data_name if is_toy else None)
    batch_gpu, accum = rundir.micro_batches(args.batch, args.batch_gpu, world_size)  # accum: micro-batches per step
    if args.ct and args.teacher and not args.init_from_teacher:
        raise rundir.RunError("--teacher with --ct only initialises the student: add --init-from-teacher")
    # Rank 0 only: on nodes without a shared filesystem the other ranks' folders may lack the checkpoint (they get
    # it from rank 0); if rank 0 stops here, torchrun stops the others.
    if master and (why := rundir.early_check(outdir, {**vars(args), "data": data_name, "student_steps": steps},
                                             args.resume)):
        raise rundir.RunError(why)
    rundir.check_writable(outdir)
    if args.fid:
        import torch_fidelity  # noqa: F401 - only checked here; data/fid.py uses it after training
except rundir.RunError as e:
    fail(str(e))
except ImportError:
    fail("--fid needs torch-fidelity (the fid extra): pip install -e '.[fid]'")

# ---------------------------------------------------------------- distributed set-up (read from torchrun's env)
device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True  # EDM's settings: autotuned convolutions, and no TF32 anywhere
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
if ddp:  # a generous timeout: rank 0 alone computes Analytic-Precond statistics and the small evaluations
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
log = print if master else (lambda *a, **k: None)

# ---------------------------------------------------------------- data: checked in full before any training
if is_toy:
    torch.set_num_threads(1)  # 2D batches are tiny: one thread avoids OpenMP spin-waits, which cost 10x on busy cores
try:
    train_set = loader.TrainingData(data_name, args.seed, args.cond, device)
except (images.DatasetError, ImportError) as e:
    fail(f"--data {data_name}: {e}")
if args.cond and not train_set.label_dim:
    fail(f"--cond: the dataset {data_name!r} has no class labels")
exact, data_record = train_set.exact, train_set.record


# ---------------------------------------------------------------- the teacher φ (frozen) and the student's network
teacher_info = None  # a teacher network (checkpoint.Teacher), when the teacher is one
if args.teacher not in (None, "exact"):
    if args.arch:
        fail(f"--arch {args.arch}: the teacher {args.teacher} fixes the student's architecture")
    try:
        teacher_info = checkpoint.load_teacher(args.teacher, data_record, by_name=is_toy or data_name == "digits")
    except checkpoint.CheckpointError as e:
        fail(f"--teacher {args.teacher}: {e}")
elif args.init_from_teacher:
    fail("--init-from-teacher needs a teacher network (--teacher FILE), not the exact denoiser")
elif args.algo != "edm" and not args.ct and exact is None:
    fail(f"--teacher: {data_name} has no exact denoiser (only the toys and digits do); give a teacher network")
teacher = None if args.algo == "edm" or args.ct else exact if teacher_info is None else edm.Denoiser(
    teacher_info.net, fp16=teacher_info.use_fp16).to(device)
arch = None if is_toy or teacher_info else args.arch or f"tiny-ddpmpp-{data_record['shape'][-1]}"
if arch is not None and arch not in ARCHS:
    fail(f"--arch {arch}: choose one of {', '.join(ARCHS)}" if args.arch else f"--data {data_name}: no default "
         f"architecture for {data_record['shape'][-1]}x{data_record['shape'][-1]} images; choose --arch")
iters = args.iters or A["iters"] * (1 if is_toy else 2)
lr = args.lr or A["lr"][0 if is_toy else 1]
ema_halflife = args.ema_halflife or (20_000 if is_toy else 500_000)
spec = checkpoint.student_spec(teacher_info, arch, data_record, A["dropout"] if args.dropout is None else args.dropout,
                               A["s_input"])
run_args = {**vars(args), "data": data_name, "arch": arch, "lr": lr, "ema_halflife": ema_halflife, "outdir": outdir,
            "dropout": spec["kwargs"].get("dropout"), "student_steps": steps}


def configs():
    """The algorithm's Config with the paper's defaults, overridden by the flags given: one per run (per S)."""
    over = {k: getattr(args, k) for k in ("mu", "gamma") if getattr(args, k) is not None}
    if args.teacher_step:
        over["addim_teacher"] = args.teacher_step == "addim"
    over.update({"use_dsm": False} if args.no_dsm else {}, **{"mu": A["mu"]} if is_toy and args.mu is None and A["mu"]
                else {}, **{"anneal_iters": iters // 2} if args.algo == "mcm" else {})  # MCM App. A.1: half the run
    cfg = dataclasses.replace(evaluate.ALGOS[args.algo].Config(), **over)
    return [(os.path.join(outdir, f"S{S}") if len(steps) > 1 else outdir,
             cfg if S is None else dataclasses.replace(cfg, S=S)) for S in steps]


def claim(folder):
    """This run's folder, claimed by rank 0 (refused if it holds another run)."""
    status, message = rundir.on_master(lambda: rundir.claim(folder, run_args, resume=args.resume), world_size)
    if status == "error":
        fail(f"--outdir {message}")


# ---------------------------------------------------------------- one training run
def run(outdir, cfg):
    torch.manual_seed(args.seed)  # the same initial weights on every rank (and so for net_ema and ema, too)
    net = checkpoint.build_network(spec).to(device)
    if args.init_from_teacher:  # every student starts as the teacher (CM, CTM and MCM all do)
        checkpoint.load_teacher_into_student(net, teacher_info.net)
    for name, p in net.named_parameters():
        # No augmentation labels are passed (EDM samples without them too), so EDM's augment embedding gets no
        # gradient; frozen, DDP expects none and the layer keeps the teacher's weights.
        p.requires_grad_(not name.startswith("map_augment"))
    net_ema = copy.deepcopy(net).requires_grad_(False) if A["mu"] is not None else None  # target θ⁻ (cd, ctm)
    ema = copy.deepcopy(net).requires_grad_(False)  # evaluation EMA (EDM-style half-life), never a teacher
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step, elapsed, stats = 0, 0.0, None
    if args.resume and (len(steps) == 1 or rundir.checkpoints(outdir)):  # rank 0 chooses the checkpoint
        try:
            state = rundir.restore(outdir, run_args, dict(net=net, ema=ema, opt=opt, scaler=scaler, net_ema=net_ema),
                                   rank, world_size, device, log)
        except rundir.RunError as e:
            fail(f"--resume: {e}")
        step, elapsed, stats = state["step"], state["elapsed"], state["model"]["analytic_stats"]
    else:  # a new run (or, resuming several S, one that had not reached its first checkpoint)
        if args.precond == "analytic":  # once per run, on rank 0, sent to every rank; refused if out of bounds
            x0, y0 = train_set.examples(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(
                args.seed))[:1024 if is_toy else 256])
            stats, why = rundir.on_master(lambda: evaluate.analytic_record(teacher, x0, y0, log), world_size)[1]
            if why:
                fail(f"--precond analytic: {why}")
        claim(outdir)
        torch.manual_seed(args.seed * 1009 + rank)  # per-rank seed for anything not driven by explicit generators
    model = dict(algo=args.algo, network=spec, cfg=dataclasses.asdict(cfg), data=data_record, analytic_stats=stats)
    outer = evaluate.outer_coefficients(model, device)
    ddp_net = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False) if ddp else net
    # CTM's adaptive DSM weight differentiates w.r.t. the output layer's weight: the last weight matrix or kernel
    # registered, skipping the s-input's layers, which every network registers after its output layer.
    last_layer = [p for k, p in net.named_parameters() if p.ndim > 1 and not checkpoint.is_s_key(k)][-1]
    algo, distance = evaluate.ALGOS[args.algo], DISTANCES[args.distance or "squared_l2"]

    def training_loss(x, labels, step, g):
        if args.algo == "edm":
            return edm.loss(cfg, ddp_net, x, labels, generator=g)
        if args.algo == "mcm":
            return (algo.loss_ct(cfg, ddp_net, x, labels, step=step, generator=g) if args.ct else
                    algo.loss(cfg, ddp_net, teacher, x, labels, step=step, generator=g))
        if args.algo == "cd":
            return algo.loss(cfg, ddp_net, net_ema, teacher, x, labels, g, outer, distance)
        # λ's gradients are taken of the scaled losses: unscaled, they underflow in fp16
        return algo.loss(cfg, ddp_net, net_ema, teacher, x, labels, g, outer, distance, last_layer,
                         grad_scale=scaler.get_scale() if scaler.is_enabled() else 1.0)

    def save(step):  # every rank's RNG state is gathered, so each continues its own stream after a resume
        rngs = rundir.rng_states(device, world_size)
        if master:
            state = dict(step=step, net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), rng=rngs,
                         scaler=scaler.state_dict(), args=run_args, model=model,
                         elapsed=elapsed + time.time() - t_start)
            if net_ema is not None:
                state["net_ema"] = net_ema.state_dict()
            try:
                rundir.save_checkpoint(state, outdir, step)
            except rundir.RunError as e:
                raise SystemExit(f"stopping: {e}") from None
            evaluate.snapshot(os.path.join(outdir, f"samples-{step:07d}.png"), model, copy.deepcopy(ema), device,
                              log, train_set.panel(512), outer)

    log_file = rundir.StatsLog(os.path.join(outdir, "stats.jsonl"), step) if master else None
    skips_in_row, skips_total, t_start, step0 = 0, 0, time.time(), step
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, count] since the last log line
    # The examples of a micro-batch, and its noise, depend only on (seed, step, its global position j), so N ranks
    # and one rank with N-fold accumulation see identical examples and noise, and a resume needs no loader state.
    batches = loader.batches(train_set.source(), args.seed, args.batch, batch_gpu, rank, accum,
                             step, iters, args.xflip, 0 if is_toy else 2 if args.workers is None else args.workers,
                             device.type == "cuda")
    while step < iters:
        opt.zero_grad(set_to_none=True)
        for m in range(accum):
            x, labels = train_set.on_device(*next(batches)[2:])
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 4099 + rank * accum + m)
            with ddp_net.no_sync() if ddp and m < accum - 1 else contextlib.nullcontext():
                with torch.autocast(device.type, AMP[args.precision], enabled=args.precision != "fp32"):  # φ, θ⁻ too
                    loss = training_loss(x, labels, step, g).float().mean()
                scaler.scale(loss / accum).backward()
            loss_sum += torch.stack([loss.detach().double() * len(x), torch.tensor(len(x), device=device)])
        scaler.unscale_(opt)
        # One host sync per step: the finite check (identical on every rank, as DDP has averaged the gradients).
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))  # measures, never clips
        if torch.isfinite(grad_norm):
            scaler.step(opt)
            skips_in_row = 0
        elif not (scaler.is_enabled() and scaler.get_scale() > 1.0):
            # (fp16: above a scale of 1 an overflow is GradScaler's ordinary signal to halve the scale, not a failure)
            skips_in_row, skips_total = skips_in_row + 1, skips_total + 1
            log(f"iteration {step}: non-finite loss or gradient, step skipped ({skips_in_row} in a row)")
            if skips_in_row >= args.max_skips:
                raise SystemExit(f"stopping: {skips_in_row} non-finite steps in a row at iteration {step}; "
                                 f"try --precision fp32 or a lower --lr")
        scaler.update()
        step += 1
        if net_ema is not None:  # target θ⁻ ← stopgrad(μ·θ⁻ + (1 − μ)·θ), CM Alg. 2
            edm.ema_update_(net_ema, net, cfg.mu)
        beta = edm.ema_beta(args.batch, ema_halflife, step * args.batch, args.ema_rampup or None)
        edm.ema_update_(ema, net, beta)
        if step % args.log_every == 0 or step == iters:
            if ddp:
                dist.all_reduce(loss_sum)
            mean_loss, rate = (loss_sum[0] / loss_sum[1]).item(), (step - step0) * args.batch / (time.time() - t_start)
            loss_sum.zero_()
            half_life = -args.batch / math.log2(beta)  # the evaluation EMA's, after its ramp-up
            log(f"iter {step:6d}/{iters}  {rate:8.0f} samples/s  loss {mean_loss:.4g}  skipped {skips_total}  EMA "
                f"half-life {half_life / 1000:.3g}k  ETA {(iters - step) * args.batch / rate:5.0f}s", flush=True)
            if master:
                log_file.write(iter=step, loss=mean_loss, samples_per_s=rate, skipped=skips_total,
                               time=elapsed + time.time() - t_start)
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == iters:
            save(step)
    return finish(outdir, model, ema, outer, step)


# ---------------------------------------------------------------- evaluation against the teacher and the data
_refs = {}  # the ODE references from the evaluation noise, shared by the students of one command


def finish(outdir, model, ema, outer, step):
    """Rank 0: samples at every NFE from the same noise as the references, metrics.json and a picture. Every rank:
    FID, sharded over the ranks."""
    res, n = {"by_nfe": {nfe: {} for nfe in evaluate.eval_nfes(model)}}, args.eval_samples or (16384 if is_toy else 256)
    if master:
        out = evaluate.evaluate_run(model, ema, teacher, exact, train_set.dataset, n, device, args.seed, outer, _refs)
        res = dict(algo=args.algo, data=data_name, iters=step, precond=args.precond or "paper", ct=args.ct,
                   eval_samples=n, by_nfe=out["by_nfe"], _out=out)
        for nfe, m in res["by_nfe"].items():
            log(f"  NFE {nfe:3d}: " + evaluate.summary(m))
        evaluate.run_picture(os.path.join(outdir, "samples.png"), model, out, train_set.panel(2000), log)
    if args.fid:
        for nfe, fid in evaluate.fid_by_nfe(model, ema, train_set.dataset, args.fid, rank, world_size, device, outer,
                                            log).items():
            res["by_nfe"][nfe]["fid"] = fid
    if master:
        rundir.write_json(os.path.join(outdir, "metrics.json"), {k: v for k, v in res.items() if k != "_out"})
    return res


if len(steps) > 1:  # several S: the parent folder is this run's too (its summary, picture and args.json)
    claim(outdir)
results = [run(d, cfg) for d, cfg in configs()]
if master and len(results) > 1:  # MCM over several S: one summary (and for toys a Fig. 1-style picture of the paths)
    outs = [r["_out"] for r in results]
    rundir.write_json(os.path.join(outdir, "metrics.json"), {f"S={S}": m for o in outs for S, m in o["by_nfe"].items()})
    evaluate.mcm_summary(outdir, outs, train_set.panel(2000) if is_toy else None, exact if is_toy else None, log)
if ddp:
    dist.barrier()  # the other ranks wait for rank 0's evaluation: tearing gloo down under it aborts the process
    dist.destroy_process_group()
