"""Training throughput of the image networks on this machine's CPU: forward + backward images per second.

For every named configuration of networks/edm_unet.py and networks/uvit.py (tiny ones at batch 8 and 32, the
paper-size ones at batch 8), a training step (forward with noise labels, and class labels where the net is
conditional, a mean-square loss, backward) is timed in float32 and under bfloat16 autocast, after a warm-up step of
each. The two are measured in pairs, fp32 then bf16 and bf16 then fp32 in alternate repeats, so that a change of
load on a shared machine hits both alike. The table gives the median images/s over the repeats with their range
(min–max), the median of the paired bf16/fp32 ratios, the parameter count and the forward GFLOPs per image counted
by torch.utils.flop_counter (matmuls, convolutions and attention; 2 FLOPs per multiply-add).

    python -m benchmarks.network_speed            # everything, several minutes on 2 cores
    python -m benchmarks.network_speed --quick    # tiny networks at batch 8, 2 repeats, seconds
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from networks.edm_unet import DHARIWALUNET_CONFIGS, SONGUNET_CONFIGS, DhariwalUNet, SongUNet
from networks.uvit import UVIT_CONFIGS, UViT

ALL = ([(name, SongUNet, cfg) for name, cfg in SONGUNET_CONFIGS.items()]
       + [(name, DhariwalUNet, cfg) for name, cfg in DHARIWALUNET_CONFIGS.items()]
       + [(name, UViT, cfg) for name, cfg in UVIT_CONFIGS.items()])
CONFIGS = sorted(ALL, key=lambda c: (not c[0].startswith("tiny"), c[0].startswith("imagenet")))  # ADM last


def make_batch(net, B):
    R, C = net.img_resolution, net.img_channels
    x, c_noise = torch.randn(B, C, R, R), torch.randn(B) * 0.3 - 0.3
    labels = F.one_hot(torch.randint(net.label_dim, (B,)), net.label_dim).float() if net.label_dim else None
    return x, c_noise, labels


def forward_gflops_per_image(net) -> float:
    x, c_noise, labels = make_batch(net, 1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, c_noise, labels)
    return counter.get_total_flops() / 1e9


def train_step(net, batch, bf16: bool) -> None:
    x, c_noise, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = net(x, c_noise, labels).square().mean()
    loss.backward()
    net.zero_grad(set_to_none=True)


def images_per_second(net, batch, bf16: bool, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        train_step(net, batch, bf16)
    return steps * len(batch[0]) / (time.perf_counter() - start)


def paired(net, B: int, steps: int, repeats: int):
    """Images/s in fp32 and bf16, `repeats` pairs in alternating order, after one warm-up step of each."""
    batch = make_batch(net, B)
    train_step(net, batch, False), train_step(net, batch, True)            # allocations, oneDNN kernel selection
    fp32, bf16 = [], []
    for r in range(repeats):
        for use_bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            (bf16 if use_bf16 else fp32).append(images_per_second(net, batch, use_bf16, steps))
    return fp32, bf16


def spread(v):
    return f"{statistics.median(v):.3g} [{min(v):.3g}–{max(v):.3g}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny networks only, batch 8, 2 repeats")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="paired measurements (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Other processes on the same cores slow every number down; the load average says how busy the machine was.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; fwd+bwd images/s, median [min–max] over {repeats} paired "
          f"measurements of {args.steps} step(s)")
    print(f"| {'config':<22} | {'params':>9} | {'GFLOPs/img':>10} | {'batch':>5} | {'fp32 img/s':>20} | "
          f"{'bf16 img/s':>20} | {'bf16/fp32':>9} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 12}|{'-' * 7}|{'-' * 22}|{'-' * 22}|{'-' * 11}|")
    for name, cls, cfg in CONFIGS:
        tiny = name.startswith("tiny")
        if args.quick and not tiny:
            continue
        net = cls(**cfg).train()
        params = sum(p.numel() for p in net.parameters())
        gflops = forward_gflops_per_image(net)
        for B in ((8,) if args.quick or not tiny else (8, 32)):
            fp32, bf16 = paired(net, B, args.steps, repeats if tiny else 1)  # paper-size steps take minutes each
            ratio = statistics.median(b / f for f, b in zip(fp32, bf16))
            print(f"| {name:<22} | {params / 1e6:>8.2f}M | {gflops:>10.3f} | {B:>5} | {spread(fp32):>20} | "
                  f"{spread(bf16):>20} | {ratio:>9.2f} |", flush=True)


if __name__ == "__main__":
    main()
