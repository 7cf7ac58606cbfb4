"""Time to load a teacher: the restricted NVlabs-pickle reader against plain `torch.load` of the same weights.

A full-size CIFAR-10 DDPM++ network (SongUNet `cifar10-ddpmpp-uncond`, 55.7M parameters, random weights) is written
once in the layout of NVlabs' `edm-cifar10-32x32-uncond-vp.pkl` (tests/edm_pickle.py) and its state dict as a `.pt`.
Then, in one process, paired and interleaved so that drift of a shared machine hits both alike, each repeat times

    pkl     networks.checkpoint.load_edm_pickle(pkl): restricted unpickling, the network built and loaded
    pt      torch.load(pt, weights_only=True): the state dict only, no network (the target: pkl within 1.5x)
    pt+net  plain PyTorch: SongUNet(**kwargs), with its initialisation, then load_state_dict(torch.load(pt))

and prints min / median / max of each and of the ratio pkl/pt pair by pair. With `--only pkl|pt PATH` it loads one
file and exits, for timing whole processes from outside.

    python -m benchmarks.pkl_load                      # full size, 7 repeats, about a minute
    python -m benchmarks.pkl_load --quick              # a tiny network, seconds
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from networks.checkpoint import load_edm_pickle
from networks.edm_unet import SONGUNET_CONFIGS, SongUNet
from tests.edm_pickle import write_edm_pickle


def write_files(folder: Path, config: str):
    kwargs = SONGUNET_CONFIGS[config]
    torch.manual_seed(0)
    net = SongUNet(**kwargs).eval()
    pkl, pt = folder / f"edm-{config}.pkl", folder / f"{config}.pt"
    write_edm_pickle(pkl, net, kwargs)
    torch.save(net.state_dict(), pt)
    return pkl, pt, kwargs, sum(p.numel() for p in net.parameters())


def load_pt_and_build(pt, kwargs):
    """What plain PyTorch code does: build the network (with its initialisation) and load the state dict."""
    net = SongUNet(**kwargs)
    net.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True), strict=True)
    return net


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values, unit="s"):
    return f"{min(values):8.3f} {statistics.median(values):8.3f} {max(values):8.3f} {unit}"


def main(quick=False, repeats=None, folder=None):
    config = "tiny-ddpmpp-32" if quick else "cifar10-ddpmpp-uncond"
    repeats = repeats or (3 if quick else 7)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        pkl, pt, kwargs, n_params = write_files(Path(tmp), config)
        print(f"{config}: {n_params / 1e6:.1f}M parameters; {pkl.stat().st_size / 1e6:.0f} MB .pkl, "
              f"{pt.stat().st_size / 1e6:.0f} MB .pt; {repeats} interleaved repeats after one warm-up of each")
        ckpt = load_edm_pickle(pkl)
        reference = torch.load(pt, weights_only=True)
        assert all(torch.equal(v, reference[k]) for k, v in ckpt.net.state_dict().items())  # the same weights
        load_pt_and_build(pt, kwargs)
        times = {"pkl": [], "pt": [], "pt+net": []}
        for _ in range(repeats):
            times["pkl"].append(timed(lambda: load_edm_pickle(pkl)))
            times["pt"].append(timed(lambda: torch.load(pt, map_location="cpu", weights_only=True)))
            times["pt+net"].append(timed(lambda: load_pt_and_build(pt, kwargs)))
        print(f"{'':8} {'min':>8} {'median':>8} {'max':>8}")
        for name, values in times.items():
            print(f"{name:8} {summary(values)}")
        for other in ("pt", "pt+net"):
            ratios = [a / b for a, b in zip(times["pkl"], times[other])]
            print(f"{'pkl/' + other:10} {summary(ratios, 'x')[2:]}  (pair by pair)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny network, seconds")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 7, quick 3)")
    p.add_argument("--dir", help="where to write the temporary files (default: the system's temporary folder)")
    p.add_argument("--write", metavar="DIR", help="only write the .pkl and .pt of the full-size network into DIR")
    p.add_argument("--only", nargs=2, metavar=("KIND", "PATH"), help="load one file (KIND pkl or pt) and exit")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.only:
        kind, path = args.only
        load_edm_pickle(path) if kind == "pkl" else torch.load(path, map_location="cpu", weights_only=True)
    elif args.write:
        print(*write_files(Path(args.write), "cifar10-ddpmpp-uncond")[:2])
    else:
        main(args.quick, args.repeats, args.dir)
