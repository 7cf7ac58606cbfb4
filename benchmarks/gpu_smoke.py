"""A five-minute check of the CUDA paths on one GPU: `python -m benchmarks.gpu_smoke` prints one line per check.

What it runs: a one-process NCCL group with a collective; fp16 autocast with a GradScaler on a small UNet, with an
overflow injected (the scale must back off and the step be skipped); CUDA RNG state saved and restored (dropout
masks must repeat); Analytic-Precond's forward-mode JVP through attention under the math SDPA kernel; the TF32 and
cuDNN settings train.py makes; a few training iterations of train.py in fp16; generate.py from that run; and the
data loader with workers and pinned memory. `--device cpu` runs the same checks where a CPU can (gloo, bf16), which
is how CI keeps this script working.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(name, fn):
    t0 = time.time()
    try:
        detail = fn() or ""
        print(f"ok    {name:38s} {time.time() - t0:6.1f}s  {detail}", flush=True)
        return True
    except Exception as e:  # noqa: BLE001 - a smoke test reports every failure and goes on
        print(f"FAIL  {name:38s} {time.time() - t0:6.1f}s  {type(e).__name__}: {str(e)[:300]}", flush=True)
        return False


def tiny_unet(device, s_embedding=False):
    from networks.edm_unet import SONGUNET_CONFIGS, SongUNet
    torch.manual_seed(0)
    return SongUNet(**SONGUNET_CONFIGS["tiny-ddpmpp-16"], s_embedding=s_embedding).to(device)


def process_group(device):
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    x = torch.ones(4, device=device)
    dist.all_reduce(x)
    obj = [{"step": 3}]
    dist.broadcast_object_list(obj)
    dist.destroy_process_group()
    assert torch.equal(x, torch.ones(4, device=device))
    return f"backend {'nccl' if device.type == 'cuda' else 'gloo'}"


def fp16_scaler(device):
    from algorithms import edm
    net = tiny_unet(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    x = torch.randn(4, 3, 16, 16, device=device)
    for i in range(3):
        opt.zero_grad()
        with torch.autocast(device.type, dtype=dtype):
            loss = edm.loss(edm.Config(), net, x).mean() * (float("inf") if i == 1 else 1.0)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i == 1 and scaler.is_enabled():
            assert scaler.get_scale() < scale, "the scale did not back off after an overflow"
    return f"autocast {dtype}, scale {scaler.get_scale() if scaler.is_enabled() else 'off'}"


def rng_restore(device):
    net = tiny_unet(device).train()
    for m in net.modules():
        if hasattr(m, "dropout"):
            m.dropout = 0.5
    x, sigma = torch.randn(2, 3, 16, 16, device=device), torch.ones(2, device=device)
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    a = net(x, sigma)
    (torch.cuda.set_rng_state(state, device) if device.type == "cuda" else torch.set_rng_state(state))
    b = net(x, sigma)
    assert torch.equal(a, b), "the dropout masks differ after restoring the RNG state"


def sdpa_jvp(device):
    from algorithms import analytic_precond, edm
    from networks.edm_unet import SONGUNET_CONFIGS, SongUNet
    torch.manual_seed(0)
    net = SongUNet(**{**SONGUNET_CONFIGS["tiny-ddpmpp-16"], "attn_resolutions": [16, 8]}).to(device).eval()
    teacher = edm.Denoiser(net.requires_grad_(False))
    cfg = analytic_precond.Config(num_samples=8, num_intervals=4)
    x0 = torch.randn(8, 3, 16, 16, device=device)
    stats = analytic_precond.compute_stats(cfg, teacher, x0, generator=torch.Generator(device).manual_seed(0))
    assert torch.isfinite(stats.ell).all() and torch.isfinite(stats.kappa).all()
    return f"ℓ in [{stats.ell.min():.3f}, {stats.ell.max():.3f}]"


def tf32_settings(device):
    if device.type != "cuda":
        return "no CUDA: nothing to set"
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(256, 256, device=device, dtype=torch.float64)
    ref = (a @ a).float()
    err = ((a.float() @ a.float()) - ref).abs().max().item()
    assert err < 1e-2, f"float32 matmul error {err:.2e}: TF32 seems on"
    return f"float32 matmul error {err:.1e}"


def train_and_generate(device, tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    precision = "fp16" if device.type == "cuda" else "bf16"
    run = os.path.join(tmp, "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--algo", "cd", "--data", "digits", "--iters", "4",
           "--batch", "16", "--eval-samples", "16", "--log-every", "2", "--ckpt-every", "2", "--precision", precision,
           "--outdir", run]
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    out = os.path.join(tmp, "gen")
    subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--network", run, "--outdir", out,
                    "--seeds", "0-15", "--npz"], check=True, capture_output=True, env=env, cwd=ROOT)
    import numpy as np
    arr = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    assert arr.shape == (16, 8, 8, 3) and arr.dtype == np.uint8
    return f"train.py {precision} + generate.py: {arr.shape}"


def loader(device):
    import numpy as np
    from data import images
    from data import loader as data_loader
    ds = images.ImageDataset(np.random.default_rng(0).integers(0, 256, (512, 3, 16, 16), dtype=np.uint8), None, 0,
                             255, "random")
    it = data_loader.batches(ds, 0, 64, 32, 0, 2, 0, 8, xflip=True, workers=2, pin_memory=device.type == "cuda")
    n = sum(x.shape[0] for _, _, x, _ in it)
    assert n == 8 * 64
    return f"{n} images through 2 workers"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [check("process group and a collective", lambda: process_group(device)),
                   check("fp16 + GradScaler, injected overflow", lambda: fp16_scaler(device)),
                   check("RNG save and restore (dropout)", lambda: rng_restore(device)),
                   check("SDPA math kernel JVP (Analytic-Precond)", lambda: sdpa_jvp(device)),
                   check("TF32 off, cuDNN benchmark", lambda: tf32_settings(device)),
                   check("train.py and generate.py", lambda: train_and_generate(device, tmp)),
                   check("loader workers, pinned memory", lambda: loader(device))]
    print(f"{sum(results)}/{len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
