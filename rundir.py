"""A run folder belongs to one run: its identity (`args.json`), its checkpoints, its log, and nothing else.

`train.py` calls these before any training, so a rerun, a resume with other settings or a full disk is refused
with a message instead of mixing or destroying two runs:

- `claim(outdir, args)`: a new run writes `args.json` first; a folder that already holds a run is refused.
- `resume_state(outdir, args)`: the newest readable checkpoint, after checking that the saved arguments agree
  with the new ones on every flag that changes the result (`RUN_FLAGS`).
- `save_checkpoint(state, outdir, step)`: atomic, after a free-space check; it rotates only this run's older files.
- `StatsLog`: `stats.jsonl`, cut back to the resumed step on resume, with non-finite numbers written as `null`.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import shutil

import torch

# Flags whose change alters what a run computes: a resume must repeat them exactly. Every other flag (iterations,
# logging and checkpoint intervals, evaluation size, loader workers, micro-batch size) may change on resume.
RUN_FLAGS = ("algo", "data", "teacher", "init_from_teacher", "arch", "batch", "seed", "precision", "xflip", "cond",
             "precond", "distance", "mu", "gamma", "no_dsm", "student_steps", "ema_halflife", "ema_rampup",
             "dropout", "ct", "lr", "teacher_step")
RUN_FILES = ("args.json", "metrics.json", "stats.jsonl")


class RunError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and says what to do."""


def checkpoints(outdir):
    """This folder's checkpoints `ckpt-NNNNNNN.pt`, oldest first, as (step, path)."""
    out = []
    for path in glob.glob(os.path.join(outdir, "ckpt-*.pt")):
        stem = os.path.basename(path)[5:-3]
        if stem.isdigit():
            out.append((int(stem), path))
    return sorted(out)


def check_writable(outdir):
    """Refuse an --outdir that is a file or cannot be written, before anything is created."""
    probe = outdir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    if not os.path.isdir(probe):
        raise RunError(f"--outdir {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"--outdir {probe} is not writable")


IMAGE_FLAGS = ("xflip", "fid", "arch", "workers", "dropout")  # flags that only image data takes


def check_flags(args, algos, toy=None):
    """Refuse a flag given to an algorithm (an entry of train.ALGOS, whose "flags" it takes) or to data (`toy`: the
    2D toy's name, None for images) it does not apply to, naming the flag and what it applies to."""
    algo_flags = dict.fromkeys(f for a in algos.values() for f in a["flags"])
    for name in (*algo_flags, *(IMAGE_FLAGS if toy else ())):
        if vars(args)[name] not in (None, False, 0) and (name in IMAGE_FLAGS or name not in algos[args.algo]["flags"]):
            owners = " or ".join(a for a, d in algos.items() if name in d["flags"])
            raise RunError(f"--{name.replace('_', '-')} applies to " + (
                f"image data, not the 2D toy {toy!r}" if name in IMAGE_FLAGS else f"--algo {owners}, "
                f"not {args.algo}"))


def micro_batches(batch, batch_gpu, world_size):
    """(per-rank micro-batch, micro-batches per rank and step) of a global batch; RunError naming the bad flag."""
    if batch % world_size:
        raise RunError(f"--batch {batch} is not divisible by the number of processes ({world_size})")
    per_rank = batch // world_size
    batch_gpu = batch_gpu or per_rank
    if per_rank % batch_gpu:
        raise RunError(f"--batch-gpu {batch_gpu} does not divide the per-rank batch {per_rank}")
    return batch_gpu, per_rank // batch_gpu


def holds_run(outdir):
    """What in `outdir` belongs to a run (empty if nothing)."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(outdir, f))]
    n = len(checkpoints(outdir))
    return found + ([f"{n} checkpoint(s)"] if n else [])


def claim(outdir, args, resume=False):
    """Start a new run in `outdir`: refuse a folder that holds another run, else write `args.json` atomically. With
    `resume`, a folder of this same run that stopped before its first checkpoint is started again."""
    found = holds_run(outdir)
    if resume and not checkpoints(outdir) and os.path.exists(os.path.join(outdir, "args.json")):
        with open(os.path.join(outdir, "args.json")) as f:
            diff = differences(json.load(f), args)
        if diff:
            raise RunError(f"{outdir} was started with different settings: {', '.join(diff)}")
        found = []
    if found:
        raise RunError(f"{outdir} already holds a run ({', '.join(found)}); continue it with --resume or choose "
                       f"another --outdir")
    os.makedirs(outdir, exist_ok=True)
    write_json(os.path.join(outdir, "args.json"), args)


def differences(saved, new):
    """The run-altering flags on which two argument dicts differ, as '--flag SAVED (now NEW)'."""
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {new.get(k)!r})" for k in RUN_FLAGS
            if saved.get(k) != new.get(k)]


def resume_state(outdir, args, log=print):
    """The newest checkpoint of the run in `outdir` that loads, checked against `args`; a truncated or corrupt one
    is reported, kept and skipped. Raises RunError if there is none or if the settings differ."""
    if not checkpoints(outdir):
        raise RunError(f"no checkpoint in {outdir}")
    for _, path in reversed(checkpoints(outdir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read means "not a usable checkpoint"
            log(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}: {str(e)[:200]}")
            continue
        diff = differences(state.get("args", {}), args)
        if diff:
            raise RunError(f"{outdir} was trained with different settings: {', '.join(diff)}; start a new run "
                           f"with another --outdir to change them")
        return path, state
    raise RunError(f"no checkpoint in {outdir} could be read")


def save_checkpoint(state, outdir, step):
    """Write `ckpt-{step}.pt` atomically (a kill leaves the old file or the new one, never half of one) after checking
    the free space, then remove this run's older checkpoints, keeping the newest two."""
    path = os.path.join(outdir, f"ckpt-{step:07d}.pt")
    needed = sum(t.numel() * t.element_size() for t in _tensors(state)) * 1.1 + (1 << 20)
    free = shutil.disk_usage(outdir).free
    if free < needed:
        raise RunError(f"cannot write {path}: it needs about {needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are "
                       f"free; the previous checkpoint is intact")
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise RunError(f"cannot write {path}: {e}; the previous checkpoint is intact") from None
    for old_step, old in checkpoints(outdir)[:-2]:
        if old_step < step:  # only this run's older files: never the one just written
            os.remove(old)
    return path


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def json_safe(obj):
    """`obj` with every non-finite float replaced by None, so that the file is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
    os.replace(path + ".tmp", path)


class StatsLog:
    """`stats.jsonl`, one JSON object per log line. On resume at `step`, lines of later iterations (written after the
    checkpoint, before a kill) are cut away, so the file reads as one monotone run."""

    def __init__(self, path, step):
        self.path, lines = path, []
        if step and os.path.exists(path):
            with open(path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("iter", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)
        self.file = open(path, "a")

    def write(self, **record):
        self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.file.flush()


# --------------------------------------------------------------------------------------------------------------
# Argument types that refuse bad values when parsed, with a message naming the value

def checked(cast, ok, what):
    """An argparse type: `cast(text)`, refused unless `ok(value)`, with 'is not {what}'."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


def _step_list(text):
    steps = [int(s) if s.strip().isdigit() else 0 for s in text.split(",")]
    return steps if all(S > 0 for S in steps) and len(set(steps)) == len(steps) else None


pos_int = checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "an integer >= 0")
pos_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")
step_list = checked(_step_list, bool, "a comma list of distinct positive integers")
rate = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
at_least = lambda n: checked(int, lambda v: v >= n, f"an integer >= {n}")
fraction = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


# --------------------------------------------------------------------------------------------------------------
# Distributed resume: rank 0 decides, every rank gets the same state and its own random stream

def load_everywhere(path, world_size):
    """The checkpoint at `path` on every rank: read locally where the file is visible (a shared filesystem), else
    sent from rank 0, which chose it (nodes without a shared filesystem)."""
    import torch.distributed as dist
    have = [os.path.exists(path)] * world_size
    if world_size > 1:
        dist.all_gather_object(have, have[0])
    state = torch.load(path, map_location="cpu", weights_only=True) if all(have) or dist.get_rank() == 0 else None
    if not all(have):
        box = [state]
        dist.broadcast_object_list(box)
        state = box[0]
    return state


def restore(outdir, args, modules, rank, world_size, device, log=print):
    """Resume every rank from the newest usable checkpoint in `outdir`, which rank 0 chooses (`resume_state`): the
    state_dicts of `modules` (name -> module or None), and this rank's own RNG stream. The checkpoint, or RunError."""
    status, path = on_master(lambda: resume_state(outdir, args, log)[0], world_size)
    if status == "error":
        raise RunError(path)
    state = load_everywhere(path, world_size)  # a rank that cannot see the file gets it from rank 0
    if len(state["rng"]) != world_size:
        raise RunError(f"{outdir} ran on {len(state['rng'])} processes, not {world_size}")
    for key, module in modules.items():
        if module is not None:
            module.load_state_dict(state[key])
    set_rng_state(state["rng"][rank], device)  # every rank continues its own stream (dropout)
    log(f"resumed from {path} at iteration {state['step']}")
    return state


def rng_states(device, world_size):
    """Every rank's CPU (and CUDA) random state, gathered: checkpoint entry `rng`, indexed by rank."""
    import torch.distributed as dist
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    out = [rng] * world_size
    if world_size > 1:
        dist.all_gather_object(out, rng)
    return out


def set_rng_state(rng, device):
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def on_master(fn, world_size):
    """fn() on rank 0, its result (or the message of a RunError, CheckpointError or ValueError) sent to every rank
    as ("ok", result) or ("error", message), so that every rank stops alike."""
    import torch.distributed as dist
    box = [None]
    if world_size == 1 or dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ValueError as e:  # RunError and CheckpointError are ValueErrors
            box = [("error", str(e))]
    if world_size > 1:
        dist.broadcast_object_list(box)
    return box[0]


def default_outdir(args, defaults, named):
    """runs/<algo>-<data>[-<variant>…]: `named` variants (name -> on) spelled out, then a short hash of every other
    run-altering flag that differs from its default, so that two settings never share a default folder."""
    others = {k: v for k, v in sorted(args.items()) if k in RUN_FLAGS and v != defaults.get(k) and k not in
              ("algo", "data", "cond", "precond", "ct", "teacher", "student_steps")}
    variant = [k for k, on in named.items() if on] + ([hashlib.sha1(repr(others).encode()).hexdigest()[:6]]
                                                      if others else [])
    data = os.path.basename(str(args["data"]).split(":")[-1].rstrip("/"))
    return os.path.join("runs", "-".join([args["algo"], data] + variant))


def early_check(outdir, args, resume):
    """The folder checks that need nothing but the arguments, made before any data or network is loaded: a new run
    in a folder that holds one, `--resume` without a checkpoint, or with other settings than the saved ones (of the
    flags known now; `resume_state` checks the resolved ones, such as the default lr, again). A message, or None."""
    if not resume:
        found = holds_run(outdir)
        return None if not found else (f"--outdir {outdir} already holds a run ({', '.join(found)}); continue it "
                                       f"with --resume or choose another --outdir")
    if not checkpoints(outdir) and not glob.glob(os.path.join(outdir, "S*", "ckpt-*.pt")):
        return f"--resume: no checkpoint in {outdir}"
    try:
        with open(os.path.join(outdir, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None  # no readable args.json: the checkpoint's own record is checked when it is loaded
    # Flags that take a default later (lr, arch, …) are compared here only when given; resume_state checks the rest.
    resolved_later = {k for k in ("arch", "lr", "ema_halflife", "dropout") if args.get(k) is None}
    diff = [d for d in differences(saved, args) if d.split()[0][2:].replace("-", "_") not in resolved_later]
    return None if not diff else (f"--resume: {outdir} was trained with different settings: {', '.join(diff)}; "
                                  f"start a new run with another --outdir to change them")
