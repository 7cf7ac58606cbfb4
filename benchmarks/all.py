"""Every claim of docs/results.md, one after the other: `python -m benchmarks.all` (full, about an hour on 2 cores)
or `python -m benchmarks.all --quick` (a smoke run of each in a few minutes, which CI runs; its numbers mean
nothing and nothing asserts on them). Full runs write docs/results/<name>/; quick runs write runs/benchmarks-quick/."""
import argparse
import importlib
import os
import subprocess
import sys
import time

import torch

CLAIMS = ["ctm_analytic_precond", "mcm_steps", "addim_vs_ddim", "cd", "mcm_teacher_step", "cost"]  # issue 8's 1–6

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke runs in seconds each (CI)")
    args = p.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread avoids OpenMP spin-waits on a shared machine
    root = os.path.join("runs", "benchmarks-quick") if args.quick else os.path.join("docs", "results")
    for name in CLAIMS:
        t0 = time.time()
        print(f"=== benchmarks.{name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(quick=args.quick, out=os.path.join(root, name))
        print(f"=== benchmarks.{name}: {time.time() - t0:.0f}s", flush=True)
    speed = [sys.executable, "-m", "benchmarks.network_speed", "--threads", "1"] + (["--quick"] if args.quick else [])
    subprocess.run(speed, check=True)
