"""Every benchmark, one after the other: `python -m benchmarks.all` (the full runs behind docs/results.md) or
`python -m benchmarks.all --quick` (a smoke run of each, which CI runs; its numbers mean nothing and nothing asserts
on them). Full runs write docs/results/<name>/; quick runs write runs/benchmarks-quick/<name>/. Finished training
runs are cached in runs/benchmark_cache/, so a second full run only re-evaluates.

    claim 1  ctm_analytic_precond   Analytic-Precond against vanilla CTM
    claim 2  mcm_steps              MCM trades student steps for quality
    claim 3  addim_vs_ddim          aDDIM against DDIM and Heun, exact denoiser
    claim 4  cd                     consistency distillation in 1 and 2 steps
    claim 5  mcm_teacher_step       DDIM or aDDIM as MCM's teacher step
    claim 6  cost                   cost per iteration against the count of network calls
             analytic_precond_report  Analytic-Precond's coefficients against CM's and CTM's on a toy
             mcm_questions          the reviewers' open questions about MCM, one experiment each
             network_speed          training throughput of the image networks
             pkl_load               the safe NVlabs-pickle loader against torch.load of the same weights
             data_loader            memory per rank and loader images/s on a synthetic 100k-PNG zip

Not here: `benchmarks.real_path` (the README's GPU command at full size on CPU, ~90 min) and `benchmarks.gpu_smoke`
(the CUDA paths, on a GPU).
"""
import argparse
import importlib
import os
import subprocess
import sys
import time

import torch

CLAIMS = ["ctm_analytic_precond", "mcm_steps", "addim_vs_ddim", "cd", "mcm_teacher_step", "cost",  # claims 1–6
          "mcm_questions"]  # the reviewers' questions about MCM

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke runs in seconds each (CI)")
    args = p.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread avoids OpenMP spin-waits on a shared machine
    root = os.path.join("runs", "benchmarks-quick") if args.quick else os.path.join("docs", "results")
    timings = {}
    for name in CLAIMS:
        t0 = time.time()
        print(f"=== benchmarks.{name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(quick=args.quick, out=os.path.join(root, name))
        timings[name] = time.time() - t0
    # The two command-line reports, as a reader would run them.
    report_out = os.path.join(root, "analytic_precond_report")
    os.makedirs(report_out, exist_ok=True)
    commands = {
        "analytic_precond_report": ["--out", report_out] + (["--quick"] if args.quick else []),
        "network_speed": ["--threads", "1"] + (["--quick"] if args.quick else []),
    }
    if not args.quick:  # their smoke runs are tests/test_loader.py and tests/test_checkpoint.py
        commands.update(pkl_load=[], data_loader=[])
    for name, extra in commands.items():
        t0 = time.time()
        print(f"=== benchmarks.{name}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra], check=True)
        timings[name] = time.time() - t0
    print("\n".join(f"benchmarks.{k}: {v:.0f}s" for k, v in timings.items()) + f"\ntotal {sum(timings.values()):.0f}s")
