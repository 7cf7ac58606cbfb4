"""Image datasets for real runs, and a small real image set with its exact denoiser for CPU demos.

One entry point, `open_dataset(spec)`, reads every format below, checks it completely and returns an
`ImageDataset`. Anything wrong (missing path, wrong format, mismatched shapes, a corrupt or truncated file,
labels that do not match the images) raises `DatasetError` naming the file, at open time, before any training.

| spec             | what it reads                                                                              |
|------------------|--------------------------------------------------------------------------------------------|
| `cifar10:PATH`   | CIFAR-10 "python version": the tarball `cifar-10-python.tar.gz`, its extracted folder       |
|                  | `cifar-10-batches-py`, or the folder that holds it. The 50,000 training images, 10 classes. |
| `folder:DIR`     | EDM's dataset layout (what its `dataset_tool.py` writes, e.g. FFHQ or ImageNet 64x64):      |
| `zip:FILE`       | PNGs in a folder or an uncompressed zip, in nested folders or not, sorted by path, with an  |
|                  | optional `dataset.json` at the top: `{"labels": [["00000/img00000000.png", 6], ...]}` or   |
|                  | `{"labels": null}`. All PNGs must be the same size, square, mode L (grey) or RGB.           |
| `npz:FILE`       | a NumPy `.npz` with uint8 images under `x`, `images` or `arr_0` (exactly one of them) and    |
|                  | optional int labels under `y` or `labels`.                                                  |
| `npy:FILE`       | a NumPy `.npy` of uint8 images, no labels; memory-mapped, so all ranks share one copy.       |
| `digits`         | scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 1 channel, 10 classes.         |

Array layouts accepted for npz/npy: [N, H, W, C] (tried first), [N, C, H, W] or [N, H, W], with C in {1, 3}
and H = W. Pixels are uint8 0..255 (0..16 for the digits) and come out of `ImageDataset.batch` as float32 in
[-1, 1], shape [B, C, H, W]; labels come out as int64 [B], and `one_hot` turns them into EDM's `class_labels`.

Memory: `open_dataset(spec)` decodes PNG, CIFAR-10 and npz images, at open, into one uint8 array per process
(CIFAR-10 150 MB, FFHQ-64 0.9 GB, ImageNet-64 15.7 GB): fine for small sets and tests. `open_dataset(spec,
cache_dir)` decodes them once into `cache_dir/<kind>-<name>-<fingerprint>/images.npy` (uint8 [N, C, H, W]) and
memory-maps that file, then and on every later open: the ranks of a node (and their loader workers) share one copy
in the page cache, and no process holds a private one, so memory per rank does not grow with the dataset. The
first process to open a new set decodes it while the others wait (a file lock), writing the pixels straight into
the file; the entry appears atomically. The fingerprint covers the source's path, sizes and modification times,
so an edited dataset is decoded afresh. A `.npy` is always memory-mapped in place. Decoding everything once, rather
than each PNG whenever it is drawn, keeps the complete check of every file at open and makes a batch a plain copy
out of the map.

Optional extras: Pillow for PNGs (`folder:`/`zip:`), scikit-learn for `digits`. Each is imported only when
needed, with an error that says how to install it.

`empirical_denoiser` is the exact denoiser of a finite point set, E[x_0 | x_σ = x] for x_0 uniform on the set
and x_σ = x_0 + σ·z (EDM's VE convention), and `EmpiricalTeacher` wraps it as a drop-in for an EDM teacher
network on any small `ImageDataset` (in practice the digits).

Sources: EDM = Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364v2 (and its code NVlabs/edm). CIFAR-10 = the format
described on Krizhevsky's CIFAR-10 page ("Dataset layout", python version). Digits = scikit-learn's
`sklearn.datasets.load_digits` documentation.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl  # POSIX file locks; elsewhere concurrent first opens each decode, and one rename wins
except ImportError:
    fcntl = None

from data.toy import GaussianMixture


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class ImageDataset:
    """Images held as integers [N, C, H, W] (a read-only memory map for .npy and cached sets), with optional labels."""

    images: np.ndarray  # uint8 [N, C, H, W], values 0..pixel_max
    labels: np.ndarray | None  # int64 [N] in [0, num_classes), or None when unlabelled
    num_classes: int  # 0 when unlabelled (EDM's label_dim = 0)
    pixel_max: int  # 255 for 8-bit images, 16 for the digits
    source: str  # where the images came from, for messages
    mapped: str | None = None  # the .npy file `images` is a memory map of, if it is one

    def __len__(self):
        return self.images.shape[0]

    def __reduce__(self):
        # A memory-mapped set travels (e.g. to DataLoader workers under spawn or forkserver) as its file name and is
        # mapped again on arrival, instead of being copied pixel by pixel into the pickle.
        if self.mapped is None:
            return super().__reduce__()
        return _remap, (self.mapped, self.images.shape[1:], self.labels, self.num_classes, self.pixel_max, self.source)

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def resolution(self):
        return self.images.shape[2]

    def batch(self, indices, xflip=False, generator=None):
        """Images `indices` as float32 [B, C, H, W] in [-1, 1] and their labels int64 [B] (or None).

        With `xflip`, each image is mirrored left-right with probability 1/2, drawn from `generator`, so a
        run that saves the generator's state replays the same flips.
        """
        flip = torch.rand(len(indices), generator=generator) < 0.5 if xflip else None  # [B]
        return self.take(indices, flip)

    def take(self, indices, flip=None):
        """Images `indices` as float32 [B, C, H, W] in [-1, 1], those where the bool mask `flip` [B] is set
        mirrored left-right, and their labels int64 [B] (or None)."""
        idx = np.asarray(indices, dtype=np.int64)
        # Fancy indexing copies (also out of a memory map); ascontiguousarray for a transposed HWC view.
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        x = pixels.to(torch.float32) / (self.pixel_max / 2) - 1  # EDM: data scaled to [-1, 1] (/ 127.5 - 1)
        if flip is not None:
            x = torch.where(torch.as_tensor(flip)[:, None, None, None], x.flip(3), x)
        labels = None if self.labels is None else torch.from_numpy(self.labels[idx])
        return x, labels


def _remap(path, chw, labels, num_classes, pixel_max, source):
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    if images.shape[1:] != chw:  # a .npy given as [N, H, W, C] or [N, H, W]: the same view as at open
        images = _nchw(images, source)
    if images.shape[1:] != chw:
        raise DatasetError(f"{path}: changed since it was opened (images now {list(images.shape)})")
    return ImageDataset(images, labels, num_classes, pixel_max, source, path)


def one_hot(labels, num_classes):
    """int64 labels [B] -> float32 [B, num_classes], the form EDM networks take as `class_labels`."""
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)


def open_dataset(spec, cache_dir=None):
    """Open and fully check the dataset named by `spec` (see the module docstring for the forms).

    With `cache_dir`, a PNG, CIFAR-10 or npz set is decoded once into a uint8 .npy under that folder and
    memory-mapped from there, now and on every later open (see "Memory" in the module docstring).
    """
    if spec == "digits":
        return digits_dataset()
    kind, _, path = spec.partition(":")
    openers = {"cifar10": _open_cifar10, "folder": _open_folder, "zip": _open_zip, "npz": _open_npz, "npy": _open_npy}
    if kind not in openers or not path:
        raise DatasetError(
            f"unknown dataset spec {spec!r}: expected cifar10:PATH, folder:DIR, zip:FILE, npz:FILE, npy:FILE or digits"
        )
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder (dataset spec {spec!r})")
    if cache_dir is None or kind == "npy":
        return openers[kind](path)
    return _cached(kind, path, openers[kind], Path(cache_dir).expanduser())


def default_cache_dir():
    """Where decoded datasets are cached unless a run says otherwise: $XDG_CACHE_HOME (or ~/.cache), then
    consistency-distillation/datasets."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "consistency-distillation" / "datasets"


# ----------------------------------------------------------------------------------------------------------
# Checks shared by all formats.


def _checked(images, labels, num_classes, source, pixel_max=255, mapped=None):
    """Refuse anything that is not uint8 [N, C, H, W] with C in {1, 3}, H = W, N > 0 and one label per image."""
    if images.dtype != np.uint8:
        raise DatasetError(f"{source}: images are {images.dtype}, expected uint8 pixels 0..255")
    n, c, h, w = images.shape
    if n == 0:
        raise DatasetError(f"{source}: no images")
    if c not in (1, 3) or h != w:
        raise DatasetError(f"{source}: images are {c}x{h}x{w} (CxHxW), expected 1 or 3 channels and square images")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != n:
            raise DatasetError(f"{source}: {n} images but labels of shape {list(labels.shape)}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DatasetError(f"{source}: labels must be integers >= 0, got {labels.dtype} min {labels.min()}")
        labels = labels.astype(np.int64)
        num_classes = num_classes or int(labels.max()) + 1
        if labels.max() >= num_classes:
            raise DatasetError(f"{source}: label {labels.max()} out of range for {num_classes} classes")
    return ImageDataset(images, labels, num_classes if labels is not None else 0, pixel_max, str(source), mapped)


def _nchw(array, source):
    """[N, H, W, C] (tried first), [N, C, H, W] or [N, H, W] -> a [N, C, H, W] view, C in {1, 3}, H = W."""
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4 and array.shape[3] in (1, 3) and array.shape[1] == array.shape[2]:
        return array.transpose(0, 3, 1, 2)
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[2] == array.shape[3]:
        return array
    raise DatasetError(
        f"{source}: array of shape {list(array.shape)} is not [N,H,W,C], [N,C,H,W] or [N,H,W] "
        "with 1 or 3 channels and square images"
    )


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10, python version.

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]  # the five training batches of the python version


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, strings, ints and uint8 numpy arrays.

    Any other global is refused, so a crafted file cannot run code the way plain `pickle.load` would let it.
    The batches were pickled by Python 2 (module `numpy.core.multiarray`); NumPy 2 pickles name
    `numpy._core.multiarray`. Both map to the function NumPy itself rebuilds arrays with.
    """

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}, which a CIFAR-10 batch never holds")
        return self._allowed[(module, name)]


def _cifar_batch(blob, source):
    """One pickled batch -> (uint8 [n, 3, 32, 32], int64 [n])."""
    try:
        # latin1: Python 2 byte strings (the pixel buffers among them) arrive as str; NumPy reads them back.
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:  # a corrupt pickle can raise almost anything; all of it means "bad file"
        raise DatasetError(f"{source}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{source}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{source}: 'data' must be a uint8 array [n, 3072]")
    if labels is None or len(labels) != len(data):
        raise DatasetError(f"{source}: {len(data)} images but {0 if labels is None else len(labels)} labels")
    # CIFAR-10 page: each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), np.asarray(labels)


def _open_cifar10(path):
    if path.is_dir():
        folder = path / _CIFAR_DIR if (path / _CIFAR_DIR).is_dir() else path
        missing = [name for name in _CIFAR_TRAIN if not (folder / name).is_file()]
        if missing:
            raise DatasetError(f"{folder}: no {missing[0]}; expected the extracted CIFAR-10 python version")
        parts = [_cifar_batch((folder / name).read_bytes(), folder / name) for name in _CIFAR_TRAIN]
    else:
        wanted = {f"{_CIFAR_DIR}/{name}": name for name in _CIFAR_TRAIN}
        blobs = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:  # one pass: seeking back in a .gz would decompress it again
                    name = member.name.removeprefix("./")
                    if name in wanted and member.isfile():
                        blobs[wanted[name]] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DatasetError(f"{path}: not a readable tar archive ({type(e).__name__}: {e})") from e
        missing = [name for name in _CIFAR_TRAIN if name not in blobs]
        if missing:
            raise DatasetError(f"{path}: no {_CIFAR_DIR}/{missing[0]} inside; is it the CIFAR-10 python version?")
        parts = [_cifar_batch(blobs[name], f"{path}:{_CIFAR_DIR}/{name}") for name in _CIFAR_TRAIN]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _checked(images, labels, 10, path)


# ----------------------------------------------------------------------------------------------------------
# EDM-style PNG datasets: a folder or a zip of PNGs with an optional dataset.json.


def _import_pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "reading PNG datasets needs Pillow, an optional extra: pip install pillow "
            "(or pip install 'consistency-distillation[images]')"
        ) from e
    return Image


def _open_folder(path, alloc=np.empty):
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder (use zip:{path} for a zip of PNGs)")
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return _png_dataset(path, names, lambda name: (path / name).read_bytes(), alloc)


def _open_zip(path, alloc=np.empty):
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if not n.endswith("/"))
            return _png_dataset(path, names, archive.read, alloc)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from e


def _png_dataset(root, names, read, alloc=np.empty):
    """Decode every PNG under `root` (sorted by path, as EDM does) into one uint8 [N, C, H, W] array made by
    `alloc(shape, dtype)`: in memory, or a memory-mapped file that the pixels go to directly."""
    Image = _import_pillow()
    pngs = [n for n in names if n.lower().endswith(".png")]
    if not pngs:
        raise DatasetError(f"{root}: no .png files")
    images = None
    for i, name in enumerate(pngs):
        try:
            with Image.open(io.BytesIO(read(name))) as image:
                mode, pixels = image.mode, np.asarray(image)  # decodes now: a corrupt file fails here, not in training
        except (OSError, SyntaxError, ValueError, zlib.error, zipfile.BadZipFile, EOFError) as e:
            raise DatasetError(f"{root}/{name}: not a readable PNG ({type(e).__name__}: {e})") from e
        if mode not in ("L", "RGB"):
            raise DatasetError(f"{root}/{name}: PNG mode {mode}, expected L (grey) or RGB")
        chw = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)  # [C, H, W]
        if images is None:
            images = alloc((len(pngs), *chw.shape), np.uint8)
        elif chw.shape != images.shape[1:]:
            raise DatasetError(
                f"{root}/{name}: {mode} {chw.shape[2]}x{chw.shape[1]}, but {pngs[0]} is "
                f"{images.shape[3]}x{images.shape[2]} with {images.shape[1]} channel(s); all images must match"
            )
        images[i] = chw
    labels = _edm_labels(root, pngs, read) if "dataset.json" in names else None
    return _checked(images, labels, 0, root)


def _edm_labels(root, pngs, read):
    """EDM's dataset.json: {"labels": [[fname, label], ...]} or {"labels": null} -> int64 [N] in `pngs` order."""
    source = f"{root}/dataset.json"
    try:
        pairs = json.loads(read("dataset.json"))["labels"]
        if pairs is None:
            return None
        table = dict(pairs)
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{source}: expected {{\"labels\": [[fname, label], ...]}} ({type(e).__name__}: {e})") from e
    if len(table) != len(pairs):
        raise DatasetError(f"{source}: {len(pairs)} label entries but {len(table)} distinct file names")
    unlabelled = [n for n in pngs if n not in table]
    unknown = sorted(set(table) - set(pngs))
    if unlabelled or unknown:
        raise DatasetError(
            f"{source}: {len(pngs)} PNGs and {len(table)} labels do not match "
            f"(first unlabelled: {unlabelled[:1]}, first label without a PNG: {unknown[:1]})"
        )
    values = [table[n] for n in pngs]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DatasetError(f"{source}: class labels must be integers")
    return np.array(values, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# Plain NumPy arrays.


def _starts_with(path, magic, what):
    """Refuse early a file of another kind, before NumPy calls it "pickled data" and suggests unsafe loading."""
    if not path.is_file():
        raise DatasetError(f"{path}: a folder, not {what}")
    with open(path, "rb") as f:
        if f.read(len(magic)) != magic:
            raise DatasetError(f"{path}: not {what} (it does not start with {magic!r})")


def _open_npz(path):
    _starts_with(path, b"PK", "an .npz archive (a zip)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from e
    with archive:
        image_keys = [k for k in ("x", "images", "arr_0") if k in archive.files]
        label_keys = [k for k in ("y", "labels") if k in archive.files]
        if len(image_keys) != 1 or len(label_keys) > 1:
            raise DatasetError(
                f"{path}: holds {archive.files}; expected exactly one image array (x, images or arr_0) "
                "and at most one label array (y or labels)"
            )
        try:
            images = archive[image_keys[0]]
            labels = archive[label_keys[0]] if label_keys else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DatasetError(f"{path}: a corrupt array inside ({type(e).__name__}: {e})") from e
    return _checked(_nchw(images, path), labels, 0, path)


def _open_npy(path):
    _starts_with(path, b"\x93NUMPY", "a .npy array")
    try:
        # mmap: the file stays on disk and in the page cache, shared by every process that opens it.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from e
    return _checked(_nchw(array, path), None, 0, path, mapped=str(path))


# ----------------------------------------------------------------------------------------------------------
# The decoded-image cache: one memory-mapped uint8 .npy per dataset and node.

_CACHE_FORMAT = 1  # bump when the cache layout changes


def _fingerprint(kind, path):
    """What identifies the source's contents cheaply: path, size and modification time of the file, or of every
    file it reads from the folder, so an edited or replaced dataset never reuses a stale cache."""
    if not path.is_dir():
        files = [path]
    elif kind == "cifar10":  # only the five training batches, wherever the folder is
        folder = path / _CIFAR_DIR if (path / _CIFAR_DIR).is_dir() else path
        files = [folder / name for name in _CIFAR_TRAIN if (folder / name).is_file()]  # a missing one: said later
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{path.resolve()}\n".encode())
    for p in files:
        st = p.stat()
        digest.update(f"{p.relative_to(path) if path.is_dir() else ''}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _cached(kind, path, opener, cache_dir):
    """The dataset at `path`, decoded once into `cache_dir/<kind>-<name>-<fingerprint>/` and memory-mapped from there.

    Of several processes that open the same dataset at once (the ranks of a node), the first to take the entry's
    lock decodes it, the others wait on the lock and then map the finished entry; every process holds the same
    page-cache copy of the pixels, none a private one. The entry is assembled in a temporary folder and renamed into
    place, so it either exists complete or not at all, also if the decoding fails or is killed, or if processes on
    several machines share the folder (the lock then only saves repeated work).
    """
    entry = cache_dir / f"{kind}-{path.name}-{_fingerprint(kind, path)}"
    if not entry.is_dir():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            lock = open(cache_dir / f"{entry.name}.lock", "a")  # noqa: SIM115 -- held for the whole build below
        except OSError as e:
            raise DatasetError(f"{cache_dir}: cannot write the dataset cache there ({e.strerror or e})") from e
        with lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if not entry.is_dir():
                _build_entry(entry, kind, path, opener)
    images = np.load(entry / "images.npy", mmap_mode="r", allow_pickle=False)
    info = json.loads((entry / "info.json").read_text())
    labels = np.load(entry / "labels.npy", allow_pickle=False) if (entry / "labels.npy").is_file() else None
    return _checked(images, labels, info["num_classes"], path, info["pixel_max"], mapped=str(entry / "images.npy"))


def _build_entry(entry, kind, path, opener):
    tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=entry.parent))  # unique, also across machines
    try:
        if kind in ("folder", "zip"):  # decoded straight into the file: no copy of the set in this process either
            ds = opener(path, lambda shape, dtype: np.lib.format.open_memmap(tmp / "images.npy", "w+", dtype, shape))
            ds.images.flush()
        else:
            ds = opener(path)
            np.save(tmp / "images.npy", np.ascontiguousarray(ds.images))
        if ds.labels is not None:
            np.save(tmp / "labels.npy", ds.labels)
        (tmp / "info.json").write_text(json.dumps(
            {"source": str(path.resolve()), "num_classes": ds.num_classes, "pixel_max": ds.pixel_max,
             "shape": list(ds.images.shape)}))
        del ds
        os.rename(tmp, entry)  # atomic; fails only if another machine finished the same entry first
    except OSError:
        if not entry.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# A built-in image set for CPU demos, and the exact denoiser of a finite image set.


def digits_dataset():
    """scikit-learn's bundled 8x8 digits (no download): 1,797 images, 1 channel, 10 classes, pixels 0..16."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn, an optional extra: pip install scikit-learn "
            "(or pip install 'consistency-distillation[digits]')"
        ) from e
    X, y = load_digits(return_X_y=True)  # float64 [1797, 64], integers 0..16 (sklearn docs); int [1797]
    images = X.astype(np.uint8).reshape(-1, 1, 8, 8)  # each row is one 8x8 image, row-major
    return _checked(images, y, 10, "scikit-learn digits", pixel_max=16)


def empirical_denoiser(points, x, sigma):
    """E[x_0 | x_σ = x] for x_0 uniform on `points` [N, d], x [B, d], σ [B] -> [B, d], in float64: the exact
    ("ideal", EDM App. B.3) denoiser of a finite set, which is `data.toy.GaussianMixture` with std = 0."""
    return GaussianMixture("points", points, 0.0).denoiser(x, sigma).double()


class EmpiricalTeacher(torch.nn.Module):
    """The exact denoiser of an image set, called like an EDM teacher: `D(x, sigma, class_labels=None)`.

    x is [B, C, H, W], sigma [B] (or one value for all), class_labels one-hot [B, num_classes] or None. With
    class labels, each image is denoised against the training images of its own class only: the exact
    class-conditional posterior mean. It carries EDM's `img_resolution`, `img_channels` and `label_dim` so a run
    can check it against its data as it would a network. Cost is O(B·N·C·H·W) per call: meant for the digits.
    """

    def __init__(self, dataset):
        super().__init__()
        x0, labels = dataset.batch(np.arange(len(dataset)))
        # The training images as a point set (float64 [N, C·H·W]); each point's class is its label.
        self.points = GaussianMixture("images", x0.double().flatten(1), 0.0, classes=labels)
        self.img_resolution, self.img_channels = dataset.resolution, dataset.channels
        self.label_dim = dataset.num_classes

    def _apply(self, fn, recurse=True):
        # .to(device) moves the point set too, in float64 whatever the dtype asked, so no call copies it again.
        device, pts = fn(torch.empty(0, dtype=torch.float64)).device, self.points
        pts.means, pts.log_w = pts.means.to(device), pts.log_w.to(device)
        pts.classes = None if pts.classes is None else pts.classes.to(device)
        return super()._apply(fn, recurse)

    def forward(self, x, sigma, class_labels=None):
        if class_labels is not None and self.label_dim == 0:
            raise ValueError("class_labels given, but this teacher's dataset has no labels")
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])  # [B]
        # float64 inside whatever the caller's autocast: autocast leaves float64 ops alone.
        return self.points.denoiser(x.flatten(1), sigma, class_labels).reshape(x.shape)
