"""Memory per rank and loader throughput on a large PNG dataset, against what a small UNet trains per second.

A zip of `--images` 32x32 RGB PNGs in EDM's layout (10 labelled classes; written once to a temporary folder, not
part of the project) is opened by `--ranks` processes at once, as the ranks of one node would, in two ways:

    in RAM   open_dataset(spec): every rank decodes the whole set into its own memory
    cached   open_dataset(spec, cache_dir): decoded once (one rank decodes, the others wait) into a uint8 .npy,
             which every rank memory-maps
    reopened the same again, as a later run (or a resumed one) opens it: the cache entry exists already

Each rank then reads `--steps` steps (by default one epoch) of its micro-batches through data.loader.batches with
`--workers` DataLoader workers and x-flips, and reports the time to open, the loader's images per second, and its
memory read from /proc/<pid>/smaps_rollup at the end: Rss, Pss (shared pages divided among the processes that map
them), and Anonymous (private memory, what grows with the dataset when it is held in RAM) of the rank, and Pss of the
rank and its workers together. The training rate is one forward and backward pass of the tiny DDPM++ (tiny-ddpmpp-32) at
the same per-rank batch, in one thread, for comparison.

    python -m benchmarks.data_loader                  # 100,000 images, 2 ranks, 2 workers each: about 5 minutes
    python -m benchmarks.data_loader --quick          # 3,000 images, 1 worker per rank: seconds of CPU
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch


def write_zip(path: Path, n: int):
    """n PNGs (smooth random pictures, a few distinct per class, reused) and a dataset.json with 10 classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(200):  # 200 distinct pictures, each 8x8 noise upsampled to 32x32
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(out, format="PNG")
        pool.append(out.getvalue())
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # stored, as EDM's dataset_tool writes
        for i, name in enumerate(names):
            archive.writestr(name, pool[i % len(pool)])
        archive.writestr("dataset.json", json.dumps({"labels": [[name, i % 10] for i, name in enumerate(names)]}))
    os.replace(tmp, path)


def memory(pid="self"):
    """kB figures of /proc/<pid>/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def children():
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids += f.read().split()
    return pids


def rank_main(spec, cache_dir, rank, ranks, batch_gpu, steps, workers):
    from data import loader
    from data.images import open_dataset

    torch.set_num_threads(1)
    start = time.perf_counter()
    ds = open_dataset(spec, cache_dir=cache_dir or None)
    opened = time.perf_counter() - start
    stream = loader.batches(ds, 0, ranks * batch_gpu, batch_gpu, rank, 1, 0, steps + 1, xflip=True, workers=workers)
    next(stream)  # the first batch pays for starting the workers
    start, images = time.perf_counter(), 0
    for _, _, x, _ in stream:
        images += len(x)
        if images == batch_gpu * (steps // 2):
            sample = memory(), [memory(pid) for pid in children()]  # while the workers are running
    rate = images / (time.perf_counter() - start)
    own, workers_mem = sample
    print(json.dumps(dict(rank=rank, opened=opened, rate=rate, rss=own["Rss"], pss=own["Pss"],
                          anon=own["Anonymous"], pss_all=own["Pss"] + sum(m["Pss"] for m in workers_mem))))


def training_rate(batch_gpu, steps):
    from networks.edm_unet import SONGUNET_CONFIGS, SongUNet

    torch.set_num_threads(1)
    net = SongUNet(**SONGUNET_CONFIGS["tiny-ddpmpp-32"])
    x, c_noise = torch.randn(batch_gpu, 3, 32, 32), torch.randn(batch_gpu)
    net(x, c_noise).square().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        net(x, c_noise).square().mean().backward()
    return steps * batch_gpu / (time.perf_counter() - start)


def main(quick=False, images=None, ranks=2, workers=None, batch_gpu=None, steps=None, folder=None):
    images = images or (3000 if quick else 100_000)
    workers = workers if workers is not None else 1 if quick else 2
    batch_gpu = batch_gpu or (16 if quick else 128)
    steps = steps or (4 if quick else images // (ranks * batch_gpu))  # full: one epoch, every image read once
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / f"pngs-{images}.zip"
        start = time.perf_counter()
        write_zip(path, images)
        print(f"{images:,} PNGs of 32x32x3 ({images * 3072 / 1e6:.0f} MB of pixels), a {path.stat().st_size / 1e6:.0f}"
              f" MB zip, written in {time.perf_counter() - start:.0f}s; {ranks} ranks x {workers} workers, "
              f"{steps} steps of {batch_gpu} images per rank", flush=True)
        print(f"{'':8} {'rank':>4} {'open s':>7} {'loader img/s':>12} {'Rss MB':>7} {'Pss MB':>7} {'Anon MB':>7} "
              f"{'Pss+workers MB':>14}")
        cache_dir = str(Path(tmp) / "cache")
        for mode, cache in (("in RAM", ""), ("cached", cache_dir), ("reopened", cache_dir)):
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.data_loader", "--rank-of", str(rank),
                                       str(ranks), f"zip:{path}", cache, str(batch_gpu), str(steps), str(workers)],
                                      stdout=subprocess.PIPE, text=True) for rank in range(ranks)]
            for proc in procs:
                out, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"a rank failed ({proc.returncode})")
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{mode:8} {r['rank']:4d} {r['opened']:7.1f} {r['rate']:12.0f} {r['rss'] / 1e3:7.0f} "
                      f"{r['pss'] / 1e3:7.0f} {r['anon'] / 1e3:7.0f} {r['pss_all'] / 1e3:14.0f}", flush=True)
        print(f"training (tiny-ddpmpp-32, forward + backward, batch {batch_gpu}, 1 thread): "
              f"{training_rate(batch_gpu, 1 if quick else 3):.0f} img/s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3,000 images, seconds")
    p.add_argument("--images", type=int, help="number of PNGs (default 100,000; quick 3,000)")
    p.add_argument("--ranks", type=int, default=2, help="processes opening the set at once (default 2)")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank (default 2; quick 1)")
    p.add_argument("--batch-gpu", type=int, help="images per micro-batch (default 128; quick 16)")
    p.add_argument("--steps", type=int, help="steps read per rank (default one epoch; quick 4)")
    p.add_argument("--dir", help="where the temporary zip and cache go (default: the system's temporary folder)")
    p.add_argument("--rank-of", nargs=7, help=argparse.SUPPRESS)  # one rank's run, started by main
    args = p.parse_args()
    if args.rank_of:
        rank, ranks, spec, cache, batch_gpu, steps, workers = args.rank_of
        rank_main(spec, cache, int(rank), int(ranks), int(batch_gpu), int(steps), int(workers))
    else:
        main(args.quick, args.images, args.ranks, args.workers, args.batch_gpu, args.steps, args.dir)
