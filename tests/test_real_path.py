"""The path a GPU user takes, on CPU: published-format EDM teachers, two DDP processes, conditional image data,
and sampling from the results with generate.py.

Every architecture family of the published checkpoints (DDPM++ with its augment embedding, dropout and attention;
NCSN++ conditional; ADM conditional with attention) is built at reduced width but with the published structure,
written as an NVlabs `.pkl` whose embedded code would leave a marker file if it ever ran, and distilled with
cd, ctm and mcm for 2 iterations by `torchrun --nproc_per_node=2` over gloo, on an EDM-layout zip of PNGs with
fewer images than the evaluation draws. generate.py then samples 64 seeds from each run and from each `.pkl`,
once with 2 ranks as PNGs and a grid, once with 1 rank and another batch size as an `.npz`: the two must hold
the same images, seed for seed.
"""
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from networks.edm_unet import DHARIWALUNET_CONFIGS, SONGUNET_CONFIGS, DhariwalUNet, SongUNet
from edm_pickle import marker_src, write_edm_pickle

Image = pytest.importorskip("PIL.Image")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
RES, NUM_IMAGES, NUM_CLASSES = 8, 24, 10

# Reduced width (32 channels, two levels at 8x8), published structure: DDPM++ and NCSN++ as EDM's CIFAR-10
# presets (augment_dim 9, dropout 0.13, attention at the second level), ADM as EDM's ImageNet preset (dropout 0.1,
# attention, no augment embedding).
ARCHS = {
    "ddpmpp-uncond": (SongUNet, dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], augment_dim=9, dropout=0.13)),
    "ncsnpp-cond": (SongUNet, dict(SONGUNET_CONFIGS["tiny-ncsnpp-16"], img_resolution=RES, channel_mult=[1, 2],
                                   attn_resolutions=[4], label_dim=NUM_CLASSES, augment_dim=9, dropout=0.13)),
    "adm-cond": (DhariwalUNet, dict(DHARIWALUNET_CONFIGS["tiny-adm-cond-16"], img_resolution=RES,
                                    attn_resolutions=[4], dropout=0.1)),
}
ALGO_FLAGS = {"cd": [], "ctm": [], "mcm": ["--student-steps", "2"]}


def launch(script, args, launcher=(sys.executable,)):
    p = subprocess.run([*launcher, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=900)
    assert p.returncode == 0 and "Traceback" not in p.stderr, f"{script} failed ({p.returncode}):\n" \
                                                               f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An EDM-layout zip (what dataset_tool.py writes): 00000/img00000000.png, ... and dataset.json labels."""
    path = tmp_path_factory.mktemp("data") / "images.zip"
    rng = np.random.default_rng(0)
    labels = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(NUM_IMAGES):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
            labels.append([name, i % NUM_CLASSES])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, (cls, kwargs) in ARCHS.items():
        torch.manual_seed(0)
        out[name] = write_edm_pickle(d / f"edm-{name}.pkl", cls(**kwargs), kwargs, marker_src(d / "module_src_ran"))
    yield out
    assert not (d / "module_src_ran").exists(), "code inside a .pkl was executed"


def check_generate(network, out):
    """64 seeds as PNGs + grid on 2 ranks (batch 8), and as an .npz on 1 rank (batch 64): the same images."""
    launch("generate.py", ["--network", network, "--outdir", out / "png", "--seeds", "0-63", "--batch", "8"],
           TORCHRUN)
    launch("generate.py", ["--network", network, "--outdir", out / "npz", "--seeds", "0-63", "--batch", "64",
                           "--npz"])
    pngs = sorted((out / "png").glob("*/*.png"))
    assert [p.relative_to(out / "png").as_posix() for p in pngs] == [f"000000/{i:06d}.png" for i in range(64)]
    with Image.open(out / "png" / "grid.png") as grid:
        assert grid.width >= 8 * RES and grid.height >= 8 * RES  # 8x8 tiles
    arr = np.load(out / "npz" / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (64, RES, RES, 3)
    for i, p in enumerate(pngs):
        with Image.open(p) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), arr[i]), f"seed {i}: 2 ranks (batch 8) != 1 rank"
    assert len({a.tobytes() for a in arr}) == 64  # every seed its own image


@pytest.mark.parametrize("algo", list(ALGO_FLAGS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_gloo_processes_distil_a_published_architecture_then_generate(tmp_path, data, pickles, arch, algo):
    label_dim = ARCHS[arch][1].get("label_dim", 0)
    run = tmp_path / "run"
    p = launch("train.py", ["--algo", algo, "--data", f"zip:{data}", "--teacher", pickles[arch], "--init-from-teacher",
                            *(["--cond"] if label_dim else []), *ALGO_FLAGS[algo], "--batch", "4", "--iters", "2",
                            "--log-every", "1", "--eval-samples", "32", "--ckpt-every", "100", "--outdir", run],
               TORCHRUN)
    assert "iter      2/2" in p.stdout
    m = json.loads((run / "metrics.json").read_text())  # evaluation with more samples (32) than images (24)
    assert m["iters"] == 2 and m["by_nfe"]
    for by in m["by_nfe"].values():  # against the teacher network's own ODE from the same noise
        r = by["vs_teacher_ode"]
        assert r["n"] == 32 and all(np.isfinite(r[k]) for k in ("gap_mean", "gap_se", "energy_to_ode")), by
    assert (run / "ckpt-0000002.pt").exists()
    check_generate(run, tmp_path)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_samples_a_published_pickle(tmp_path, pickles, arch):
    check_generate(pickles[arch], tmp_path)


def write_cifar10(folder, per_batch, seed=0):
    """The CIFAR-10 python version's layout: data_batch_1..5, each a pickled dict of uint8 rows and labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=4))
    return folder


@pytest.mark.slow
def test_the_readme_gpu_command_with_the_full_size_cifar10_teacher(tmp_path):
    # The published CIFAR-10 DDPM++ (56M parameters, augment_dim 9), random weights, as edm-cifar10-32x32-uncond-vp.pkl.
    # bf16 stands in for the README's fp16, whose CPU autocast kernels are about 100x slower than bf16's.
    kwargs = SONGUNET_CONFIGS["cifar10-ddpmpp-uncond"]
    torch.manual_seed(0)
    pkl = write_edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", SongUNet(**kwargs), kwargs,
                           marker_src(tmp_path / "module_src_ran"))
    cifar = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=4)
    run = tmp_path / "run"
    p = launch("train.py", ["--algo", "ctm", "--data", f"cifar10:{cifar}", "--teacher", pkl, "--init-from-teacher",
                            "--batch", "4", "--iters", "2", "--precision", "bf16", "--log-every", "1",
                            "--eval-samples", "4", "--ckpt-every", "0", "--outdir", run], TORCHRUN)
    assert "iter      1/2" in p.stdout and "iter      2/2" in p.stdout
    state = torch.load(run / "ckpt-0000002.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 2 and state["model"]["network"]["kwargs"]["augment_dim"] == 9
    assert json.loads((run / "metrics.json").read_text())["iters"] == 2
    assert not (tmp_path / "module_src_ran").exists()
