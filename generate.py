"""Samples from a trained student, an EDM run of this project, or a published NVlabs EDM teacher.

    python generate.py --network runs/cd-cifar10 --outdir out --seeds 0-49999 [--batch B] [--class C] [--nfe N] [--npz]
    torchrun --nproc_per_node=8 generate.py --network edm-cifar10-32x32-cond-vp.pkl --outdir out --seeds 0-49999

`--network` is a run folder or checkpoint written by train.py (everything needed to rebuild the network and its
sampler is in the checkpoint), or an NVlabs `.pkl` (read without running its code), sampled with EDM's Heun
sampler (Karras et al. Alg. 1, NFE = 2·steps − 1; 35 by default) or with aDDIM (Heek et al. Alg. 3, any NFE).
As in EDM's generate.py, each image depends only on its seed (its noise, its class when the network is
conditional, and any noise a multistep sampler injects), so neither the batch size nor the number of ranks
changes it; under torchrun the seeds are shared out over the ranks.

Images go to `outdir` as PNGs in EDM's layout (`000000/000123.png`, a folder per thousand seeds) and a `grid.png`
of the first 64, or with `--npz` into one `samples.npz` holding uint8 [N, H, W, 3] as `arr_0` (the layout that
the usual FID tools read). Toy runs write `points.npy` [N, 2] and `scatter.png`.
"""
import argparse
import dataclasses
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist

import evaluate
from algorithms import edm
from networks import checkpoint


def seed_list(text):
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of seeds such as 0-63 or 1,5,7-9")
        out.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return out


def pos_int(text):
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


parser = argparse.ArgumentParser(description="Generate samples from a trained network (see README.md).")
parser.add_argument("--network", required=True, help="a train.py run folder or checkpoint, or an NVlabs EDM .pkl")
parser.add_argument("--outdir", required=True, help="where to write the samples")
parser.add_argument("--seeds", type=seed_list, default=seed_list("0-63"), help="seeds, e.g. 0-49999 (default 0-63)")
parser.add_argument("--batch", type=pos_int, default=64, help="samples per forward pass and rank")
parser.add_argument("--class", dest="class_idx", type=int, default=None, help="a fixed class (conditional networks)")
parser.add_argument("--nfe", type=pos_int, default=None, help="network evaluations per sample (default: the run's "
                    "fewest; 35 for an EDM network)")
parser.add_argument("--sampler", choices=["heun", "addim"], default="heun", help="EDM networks: Heun or aDDIM")
parser.add_argument("--npz", action="store_true", help="one samples.npz instead of PNGs")
args = parser.parse_args()
rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def fail(message):
    parser.error(message) if rank == 0 else sys.exit(2)


# ---------------------------------------------------------------- the network and its sampler, all checked first
try:
    if args.network.endswith(".pkl"):
        published = checkpoint.load_edm_pickle(args.network)
        net, kw = published.net, published.net_kwargs
        cfg = edm.Config(sigma_data=published.precond.get("sigma_data", edm.SIGMA_DATA))
        model = dict(algo="edm", cfg=dataclasses.asdict(cfg),
                     data=dict(name=args.network, shape=[kw["in_channels"], kw["img_resolution"], kw["img_resolution"]],
                               label_dim=kw.get("label_dim") or 0), analytic_stats=None)
    else:
        state = checkpoint.read_run_checkpoint(args.network)
        model = state["model"]
        net = checkpoint.build_network(model["network"], state["path"])
        net.load_state_dict(state["ema"])
except checkpoint.CheckpointError as e:
    fail(f"--network {e}")
if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
    fail(f"--outdir {args.outdir} is a file, not a folder")
label_dim, shape, algo = model["data"]["label_dim"], model["data"]["shape"], model["algo"]
if args.class_idx is not None and not (label_dim and 0 <= args.class_idx < label_dim):
    fail(f"--class {args.class_idx}: " + (f"the network has {label_dim} classes (0..{label_dim - 1})" if label_dim else
                                          "the network is unconditional"))
nfe = args.nfe or (2 * evaluate.algo_config(model).num_steps - 1 if algo == "edm" else evaluate.eval_nfes(model)[0])
if algo == "edm" and args.sampler == "heun":
    if nfe % 2 == 0:
        fail(f"--nfe {nfe}: EDM's Heun sampler takes 2·steps − 1 evaluations, an odd number (or use --sampler addim)")
    model["cfg"]["num_steps"] = (nfe + 1) // 2
elif algo == "edm":
    model = {**model, "sampler": "addim"}
elif algo == "mcm" and nfe != model["cfg"]["S"]:
    fail(f"--nfe {nfe}: this MCM student takes exactly S = {model['cfg']['S']} steps")
elif args.sampler != "heun":
    fail(f"--sampler {args.sampler}: applies to EDM networks, not a {algo} student")

# ---------------------------------------------------------------- generation, seeds shared out over the ranks
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
if world_size > 1:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
net = net.to(device).eval()
outer = evaluate.outer_coefficients(model, device)
toy = len(shape) == 1
mine = args.seeds[rank::world_size]
results = []
for i in range(0, len(mine), args.batch):
    seeds = mine[i:i + args.batch]
    noise, labels, gens = evaluate.seeded(seeds, shape, label_dim, args.class_idx, device)
    x = evaluate.sample(model, net, noise, labels, nfe, gens, outer=outer)
    if toy:
        results.append((seeds, x.cpu()))
        continue
    pixels = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # EDM's [-1, 1] -> uint8
    pixels = np.repeat(pixels, 3, axis=3) if pixels.shape[3] == 1 else pixels
    if args.npz:
        results.append((seeds, pixels))
    else:
        from PIL import Image
        for seed, img in zip(seeds, pixels):
            folder = os.path.join(args.outdir, f"{seed - seed % 1000:06d}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{seed:06d}.png"))
    print(f"rank {rank}: {min(i + args.batch, len(mine))}/{len(mine)} samples", flush=True)

if world_size > 1:  # arrays (npz, toys) are gathered on rank 0; PNGs are already in the shared outdir
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(results, gathered)
    results = [r for part in gathered for r in part] if rank == 0 else []
if rank == 0:
    os.makedirs(args.outdir, exist_ok=True)
    order = {s: j for j, s in enumerate(args.seeds)}
    flat = sorted(((s, a) for seeds, arr in results for s, a in zip(seeds, arr)), key=lambda p: order[p[0]])
    if toy:
        points = torch.stack([a for _, a in flat])
        np.save(os.path.join(args.outdir, "points.npy"), points.numpy())
        try:
            import plots
            from data import toy as toys
            x_data = toys.DATASETS[model["data"]["name"]]().sample(2000, torch.Generator().manual_seed(0))[0]
            plots.samples(os.path.join(args.outdir, "scatter.png"), {f"{nfe} NFE": points}, f"{algo}, {nfe} NFE",
                          x_data)
        except ImportError as e:
            print(f"no scatter.png ({e}); install the plot extra: pip install -e '.[plot]'")
    elif args.npz:
        np.savez(os.path.join(args.outdir, "samples.npz"), arr_0=np.stack([a for _, a in flat]))
    first = args.seeds[:64]
    if not toy:
        from PIL import Image
        imgs = ([a for _, a in flat][:64] if args.npz else
                [np.asarray(Image.open(os.path.join(args.outdir, f"{s - s % 1000:06d}", f"{s:06d}.png")).convert("RGB"))
                 for s in first])
        n = int(np.ceil(np.sqrt(len(imgs))))
        H, W = imgs[0].shape[:2]
        grid = np.full((n * (H + 2) + 2, n * (W + 2) + 2, 3), 255, np.uint8)  # white gutters of 2 pixels
        for j, img in enumerate(imgs):
            r, c = divmod(j, n)
            grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
        Image.fromarray(grid).save(os.path.join(args.outdir, "grid.png"))
    print(f"wrote {len(args.seeds)} samples to {args.outdir}")
if world_size > 1:
    dist.destroy_process_group()
