"""Training batches: which examples every micro-batch of every step holds, and DataLoader workers that read them.

A run of global batch `batch` on W ranks, each doing `accum` micro-batches of `batch_gpu` per step
(batch = W · accum · batch_gpu), sees these examples, a function of (seed, step, j) alone:

    per_epoch = max(N // batch, 1)                       steps per epoch (the remainder of an epoch is dropped)
    epoch, i  = divmod(step, per_epoch)
    order     = ceil(per_epoch·batch / N) random permutations of range(N), end to end, cut to per_epoch·batch
                (one permutation whenever N >= batch), drawn from numpy's Generator on SeedSequence([seed, 0, epoch])
    global batch of `step`   = order[i·batch : (i+1)·batch]
    micro-batch j = rank·accum + m  takes  global batch[j·batch_gpu : (j+1)·batch_gpu]
    its x-flips (with `xflip`)      = Generator(SeedSequence([seed, 1, step, j])).random(batch_gpu) < 0.5

So W ranks and one rank with W-fold accumulation see identical examples and flips, a run resumed at step k needs
no loader state, and no rank talks to another about data. The order is drawn once per epoch, not once per step.

`batches(...)` yields (step, m, x, labels) for this rank in that order: x float32 [batch_gpu, C, H, W] in [-1, 1]
(or the rows of a toy's [N, d] tensor), labels int64 [batch_gpu] or None. The main process plans the indices and
flips; `workers` DataLoader processes gather and convert them (a copy out of the memory map, see data/images.py),
and with `pin_memory` the batches arrive in page-locked memory for an asynchronous copy to the GPU. The workers
draw no random numbers, so every figure is the same with 0 or any number of workers.
"""
import math

import numpy as np
import torch

from data import images, toy
from data.images import ImageDataset


def epoch_order(seed, epoch, n, length):
    """The example order of one epoch: int64 [length], ceil(length / n) permutations of range(n) end to end."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, epoch]))
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(length / n))])[:length]


def flips(seed, step, j, size):
    """The x-flip mask bool [size] of micro-batch j at `step`."""
    return np.random.default_rng(np.random.SeedSequence([seed, 1, step, j])).random(size) < 0.5


class _Plan:
    """(step, m, indices, flip) of this rank's micro-batches from start_step to stop_step, in order."""

    def __init__(self, n, seed, batch, batch_gpu, rank, accum, start_step, stop_step, xflip):
        self.n, self.seed, self.batch, self.batch_gpu = n, seed, batch, batch_gpu
        self.rank, self.accum, self.start_step, self.stop_step, self.xflip = rank, accum, start_step, stop_step, xflip

    def __iter__(self):
        per_epoch = max(self.n // self.batch, 1)
        epoch, order = None, None
        for step in range(self.start_step, self.stop_step):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = epoch_order(self.seed, epoch, self.n, per_epoch * self.batch)
            i = step % per_epoch
            idx = order[i * self.batch:(i + 1) * self.batch]  # the global batch
            for m in range(self.accum):
                j = self.rank * self.accum + m  # the micro-batch's position in the global batch
                flip = flips(self.seed, step, j, self.batch_gpu) if self.xflip else None
                yield step, m, idx[j * self.batch_gpu:(j + 1) * self.batch_gpu], flip


class _Tensors:
    """A toy's training points x [N, d] and labels [N] (or None), read like an ImageDataset."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def take(self, idx, flip=None):
        idx = torch.from_numpy(idx)
        return self.x[idx], None if self.y is None else self.y[idx]


class _Read(torch.utils.data.Dataset):
    """One micro-batch per planned key; runs in the DataLoader workers."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, key):
        step, m, idx, flip = key
        x, labels = self.data.take(idx, flip)
        return step, m, x, labels


def batches(data, seed, batch, batch_gpu, rank, accum, start_step, stop_step, xflip=False, workers=0,
            pin_memory=False):
    """This rank's micro-batches (step, m, x, labels) for steps start_step .. stop_step - 1, m = 0 .. accum - 1.

    `data` is an ImageDataset or a toy's (x [N, d], labels [N] or None) pair of tensors, which is read in this
    process (workers=0, no flips). The arguments are checked here, before anything is read.
    """
    if isinstance(data, tuple):
        x, y = data
        if not (isinstance(x, torch.Tensor) and (y is None or isinstance(y, torch.Tensor) and len(y) == len(x))):
            raise ValueError("toy data must be a pair (x [N, d] tensor, labels [N] tensor or None)")
        if workers or xflip:
            raise ValueError("toy data is read in the training process: workers=0 and xflip=False")
        data = _Tensors(x, y)
    elif not isinstance(data, ImageDataset):
        raise TypeError(f"data must be an ImageDataset or a pair of tensors, not {type(data).__name__}")
    for name, value in dict(seed=seed, start_step=start_step, stop_step=stop_step, workers=workers).items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name, value in dict(batch=batch, batch_gpu=batch_gpu, accum=accum).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if batch % (accum * batch_gpu):
        raise ValueError(f"batch {batch} is not a whole number of ranks x accum {accum} x batch_gpu {batch_gpu}")
    if not 0 <= rank < batch // (accum * batch_gpu):
        raise ValueError(f"rank {rank} out of range for {batch // (accum * batch_gpu)} ranks")
    plan = _Plan(len(data), seed, batch, batch_gpu, rank, accum, start_step, stop_step, xflip)
    return _read(data, plan, workers, pin_memory)


def _read(data, plan, workers, pin_memory):
    if workers == 0:
        for key in plan:
            step, m, x, labels = _Read(data)[key]
            if pin_memory:
                x, labels = x.pin_memory(), None if labels is None else labels.pin_memory()
            yield step, m, x, labels
        return
    # batch_size=None: each planned key is one sample, i.e. one whole micro-batch, assembled in a worker.
    # A generator of its own: a DataLoader otherwise draws its base seed from the global RNG, which would shift the
    # training's random stream (dropout) by one draw after a resume. The workers draw nothing, so its seed is unused.
    loader = torch.utils.data.DataLoader(_Read(data), batch_size=None, sampler=plan, num_workers=workers,
                                         pin_memory=pin_memory, generator=torch.Generator())
    for step, m, x, labels in loader:
        yield step, m, x, labels


class TrainingData:
    """A run's training data on `device`: a 2D toy's 65,536 points drawn from `seed`, or an image dataset decoded
    once per node into a memory-mapped cache that every rank and loader worker shares (data/images.py), with the
    exact denoiser where there is one (toys, digits). Raises images.DatasetError (or ImportError) if unreadable."""

    def __init__(self, name, seed, cond, device):
        self.name, self.device, self.is_toy = name, device, name in toy.DATASETS
        if self.is_toy:
            self.dataset = toy.DATASETS[name]()
            self.x, self.y = self.dataset.sample(65536, torch.Generator().manual_seed(seed), torch.float32)
            self.label_dim, self.shape = self.dataset.label_dim if cond else 0, [self.dataset.dim]
            self.exact = self.dataset.denoiser
        else:
            self.dataset = images.open_dataset(name, cache_dir=images.default_cache_dir())
            self.label_dim = self.dataset.num_classes if cond else 0
            self.shape = [self.dataset.channels, self.dataset.resolution, self.dataset.resolution]
            self.exact = images.EmpiricalTeacher(self.dataset).to(device) if name == "digits" else None
        self.record = dict(name=name, shape=self.shape, label_dim=self.label_dim)  # the checkpoint's `data`

    def __len__(self):
        return len(self.x) if self.is_toy else len(self.dataset)

    def source(self):
        """What `batches` reads."""
        return (self.x, self.y) if self.is_toy else self.dataset

    def on_device(self, x, y):
        """A batch and its one-hot labels (None for an unconditional run) on the device."""
        y = None if y is None or not self.label_dim else y if self.is_toy else images.one_hot(y, self.label_dim)
        return x.to(self.device, non_blocking=True), (None if y is None else y.to(self.device, non_blocking=True))

    def examples(self, idx):
        """The examples at `idx` (a LongTensor) on the device, with their labels."""
        return self.on_device(*((self.x[idx], None if self.y is None else self.y[idx]) if self.is_toy else
                                self.dataset.batch(idx)))

    def panel(self, n):
        """The data beside the samples in pictures: n toy points, or the first 64 images."""
        return self.x[:n] if self.is_toy else self.examples(torch.arange(min(len(self), 64)))[0]
