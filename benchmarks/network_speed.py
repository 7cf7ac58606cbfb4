"""Training throughput of the image networks on this machine's CPU: forward + backward images per second.

For every named configuration of networks/edm_unet.py and networks/uvit.py (tiny ones at batch 8 and 32, the
paper-size ones at batch 8), in float32 and under bfloat16 autocast, one training step is timed (after a warm-up
step for the tiny ones): forward with noise labels (and class labels where the net is conditional), a
mean-square loss, backward. The table also gives the parameter count and the forward GFLOPs per image counted by
torch.utils.flop_counter (matmuls, convolutions and attention; 2 FLOPs per multiply-add).

    python -m benchmarks.network_speed            # everything, a few minutes on 2 cores
    python -m benchmarks.network_speed --quick    # tiny networks at batch 8, seconds
"""
import argparse
import os
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


def images_per_second(net, B: int, bf16: bool, steps: int, warm_up: bool) -> float:
    batch = make_batch(net, B)
    if warm_up:
        train_step(net, batch, bf16)                                        # allocations, oneDNN kernel selection
    start = time.perf_counter()
    for _ in range(steps):
        train_step(net, batch, bf16)
    return steps * B / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny networks only, batch 8, one timed step")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Other processes on the same cores slow every number down; the load average says how busy the machine was.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; fwd+bwd images/s over {args.steps} step(s), after a warm-up step "
          f"for the tiny networks")
    print(f"| {'config':<22} | {'params':>9} | {'GFLOPs/img':>10} | {'batch':>5} | {'fp32 img/s':>10} | "
          f"{'bf16 img/s':>10} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 12}|{'-' * 7}|{'-' * 12}|{'-' * 12}|")
    for name, cls, cfg in CONFIGS:
        tiny = name.startswith("tiny")
        if args.quick and not tiny:
            continue
        net = cls(**cfg).train()
        params = sum(p.numel() for p in net.parameters())
        gflops = forward_gflops_per_image(net)
        for B in ((8,) if args.quick or not tiny else (8, 32)):
            # A paper-size step takes seconds to minutes, so its warm-up would double the run for a few percent.
            fp32 = images_per_second(net, B, bf16=False, steps=args.steps, warm_up=tiny)
            bf16 = images_per_second(net, B, bf16=True, steps=args.steps, warm_up=tiny)
            print(f"| {name:<22} | {params / 1e6:>8.2f}M | {gflops:>10.3f} | {B:>5} | {fp32:>10.3g} | {bf16:>10.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
