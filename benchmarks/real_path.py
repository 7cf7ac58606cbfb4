"""The README's GPU command on CPU, at full size: `python -m benchmarks.real_path` (about 90 minutes on 2 cores).

It writes the published CIFAR-10 DDPM++ teachers (unconditional and conditional: 56M parameters, augment_dim 9,
dropout 0.13, random weights) as NVlabs-format pickles and a small dataset in CIFAR-10's python layout, then for
cd, ctm and mcm, unconditional and conditional, runs 3 iterations of the README's command under
`torchrun --nproc_per_node=2` (gloo; bf16 stands in for fp16, whose CPU kernels are far slower), and generate.py
from each run and from each pickle: a 64-image grid and an .npz, with the same seeds on 1 and 2 ranks, which must
give the same images. It prints one line per command with its wall time. Most of the time is the teachers' own
sampling (EDM's Heun, 35 NFE, 64 images on one thread per rank: 10–13 min on 2 ranks, 20 min on 1); each training
run takes 2–5 min. `--quick` does the same at reduced width (tests/test_real_path.py runs that structure in CI).
"""
import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from edm_pickle import write_edm_pickle  # noqa: E402 - the test helper that writes NVlabs' layout

from networks.edm_unet import SONGUNET_CONFIGS, SongUNet  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def timed(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return time.time() - t0


def write_cifar10(folder, per_batch=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=4))
    return folder


def same_images(network, out, log):
    """64 seeds as PNGs + grid on 2 ranks (batch 8) and as an .npz on 1 rank (batch 64): identical images."""
    t_png = timed([*TORCHRUN, ROOT / "generate.py", "--network", network, "--outdir", out / "png", "--seeds", "0-63",
                   "--batch", "8"])
    t_npz = timed([sys.executable, ROOT / "generate.py", "--network", network, "--outdir", out / "npz", "--seeds",
                   "0-63", "--npz"])
    from PIL import Image
    arr = np.load(out / "npz" / "samples.npz")["arr_0"]
    same = all(np.array_equal(np.asarray(Image.open(out / "png" / "000000" / f"{i:06d}.png").convert("RGB")), arr[i])
               for i in range(64))
    log(f"    generate.py: grid on 2 ranks {t_png:6.1f}s, npz on 1 rank {t_npz:6.1f}s, same images: {same}")
    if not same:
        raise SystemExit("generate.py gave different images on 1 and 2 ranks")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced width (32 channels at 8x8), a minute or two")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_cifar10(tmp / "cifar-10-batches-py")
        for cond in (False, True):
            name = "cifar10-ddpmpp-" + ("cond" if cond else "uncond")
            kwargs = dict(SONGUNET_CONFIGS[name])
            if a.quick:
                kwargs.update(img_resolution=32, model_channels=32, channel_mult=[1, 2], num_blocks=1)
            torch.manual_seed(0)
            pkl = write_edm_pickle(tmp / f"edm-{name}.pkl", SongUNet(**kwargs), kwargs)
            print(f"{name}: {sum(t.numel() for t in SongUNet(**kwargs).parameters()) / 1e6:.1f}M parameters")
            same_images(pkl, tmp / f"gen-{name}", print)
            for algo in ("cd", "ctm", "mcm"):
                run = tmp / f"{algo}-{name}"
                cmd = [*TORCHRUN, ROOT / "train.py", "--algo", algo, "--data", f"cifar10:{data}", "--teacher", pkl,
                       "--init-from-teacher", "--batch", "4", "--iters", "3", "--precision", "bf16", "--log-every",
                       "1", "--eval-samples", "4", "--outdir", run, *(["--cond"] if cond else []),
                       *(["--student-steps", "2"] if algo == "mcm" else [])]
                print(f"  {algo:3s} {'cond' if cond else 'uncond'}: train.py 3 iterations on 2 processes "
                      f"{timed(cmd):6.1f}s", flush=True)
                same_images(run, tmp / f"gen-{algo}-{name}", print)


if __name__ == "__main__":
    main()
