"""The training batch stream (data/loader.py) against its definition, written out here from the module docstring:
which examples and flips each micro-batch holds, and that ranks, accumulation, resuming and workers change none."""
import numpy as np
import pytest
import torch

from data import loader
from data.images import ImageDataset

N, C, R = 100, 3, 4
rng = np.random.default_rng(0)
PIXELS = rng.integers(0, 256, (N, C, R, R), dtype=np.uint8)
LABELS = rng.integers(0, 10, N)


@pytest.fixture
def images():
    return ImageDataset(PIXELS, LABELS, 10, 255, "test images")


def expected_micro_batch(n, seed, batch, batch_gpu, step, j):
    """Indices and flips of micro-batch j at `step`, from the definition in data/loader.py's docstring."""
    per_epoch = max(n // batch, 1)
    epoch, i = divmod(step, per_epoch)
    g = np.random.default_rng(np.random.SeedSequence([seed, 0, epoch]))
    order = np.concatenate([g.permutation(n) for _ in range(-(-per_epoch * batch // n))])[:per_epoch * batch]
    idx = order[i * batch:(i + 1) * batch][j * batch_gpu:(j + 1) * batch_gpu]
    flip = np.random.default_rng(np.random.SeedSequence([seed, 1, step, j])).random(batch_gpu) < 0.5
    return idx, flip


def stream(data, ranks, accum, batch_gpu, steps, start=0, **kw):
    """{step: the global batch's x, labels in micro-batch order j = rank·accum + m}, from every rank's stream."""
    parts = {}
    for rank in range(ranks):
        for step, m, x, labels in loader.batches(data, 7, ranks * accum * batch_gpu, batch_gpu, rank, accum, start,
                                                 steps, **kw):
            parts.setdefault(step, {})[rank * accum + m] = (x, labels)
    return {step: (torch.cat([p[j][0] for j in sorted(p)]), torch.cat([p[j][1] for j in sorted(p)]))
            for step, p in parts.items()}


def test_each_micro_batch_holds_the_documented_examples_mirrored_where_drawn(images):
    seen = 0
    for step, m, x, labels in loader.batches(images, 7, 32, 8, 1, 2, 0, 7, xflip=True):
        idx, flip = expected_micro_batch(N, 7, 32, 8, step, 1 * 2 + m)
        pixels = np.where(flip[:, None, None, None], PIXELS[idx][..., ::-1], PIXELS[idx])
        assert x.dtype == torch.float32 and x.shape == (8, C, R, R)
        assert torch.equal(x, torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1)
        assert labels.dtype == torch.int64 and labels.tolist() == LABELS[idx].tolist()
        seen += flip.sum()
    assert 0 < seen < 7 * 2 * 8  # flips happen, not always


def test_ranks_and_accumulation_split_the_same_global_batches(images):
    one = stream(images, ranks=1, accum=4, batch_gpu=8, steps=8, xflip=True)
    for ranks, accum in [(2, 2), (4, 1)]:
        other = stream(images, ranks=ranks, accum=accum, batch_gpu=8, steps=8, xflip=True)
        assert one.keys() == other.keys() == set(range(8))
        for step in one:
            assert torch.equal(one[step][0], other[step][0]) and torch.equal(one[step][1], other[step][1])


def test_a_run_resumed_at_step_k_reads_what_the_uninterrupted_run_read(images):
    whole = stream(images, ranks=2, accum=2, batch_gpu=4, steps=12, xflip=True)
    resumed = stream(images, ranks=2, accum=2, batch_gpu=4, steps=12, start=5, xflip=True)
    assert resumed.keys() == set(range(5, 12))
    for step in resumed:
        assert torch.equal(resumed[step][0], whole[step][0]) and torch.equal(resumed[step][1], whole[step][1])


def test_the_order_is_drawn_once_per_epoch_and_no_example_repeats_within_one(images, monkeypatch):
    calls = []
    real = loader.epoch_order
    monkeypatch.setattr(loader, "epoch_order", lambda *a: calls.append(a[1]) or real(*a))
    # N = 100, batch 32: 3 steps per epoch (4 examples left out each epoch), 10 steps = epochs 0, 1, 2, 3.
    keys = [(step, idx) for step, m, idx, flip in loader._Plan(N, 7, 32, 8, 0, 4, 0, 10, False)]
    assert calls == [0, 1, 2, 3]
    for epoch in range(3):
        drawn = np.concatenate([idx for step, idx in keys if step // 3 == epoch])
        assert len(drawn) == 96 and len(set(drawn.tolist())) == 96


def test_zero_and_two_workers_give_bitwise_equal_batches(images):
    kw = dict(seed=3, batch=16, batch_gpu=8, rank=1, accum=1, start_step=2, stop_step=9, xflip=True)
    inline = list(loader.batches(images, **kw))
    workers = list(loader.batches(images, **kw, workers=2))
    assert len(inline) == len(workers) == 7
    for a, b in zip(inline, workers):
        assert a[:2] == tuple(b[:2]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_a_dataset_smaller_than_the_batch_fills_every_micro_batch():
    small = ImageDataset(PIXELS[:10], None, 0, 255, "ten images")
    for _, _, x, labels in loader.batches(small, 0, 32, 16, 0, 2, 0, 3):
        assert x.shape == (16, C, R, R) and labels is None
    for step in range(3):  # 32 = 3 permutations of the 10 and 2 more: each image 3 or 4 times
        idx = np.concatenate([expected_micro_batch(10, 0, 32, 16, step, j)[0] for j in range(2)])
        assert sorted(np.bincount(idx, minlength=10).tolist())[0] == 3


def test_toy_tensors_take_the_same_path():
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(N) % 3
    for step, m, xb, yb in loader.batches((x, y), 7, 32, 16, 0, 2, 0, 4):
        idx, _ = expected_micro_batch(N, 7, 32, 16, step, m)
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
    assert next(loader.batches((x, None), 7, 32, 16, 0, 2, 0, 4))[3] is None
    with pytest.raises(ValueError, match="workers=0 and xflip=False"):
        loader.batches((x, y), 7, 32, 16, 0, 2, 0, 4, workers=2)
    with pytest.raises(ValueError, match="workers=0 and xflip=False"):
        loader.batches((x, y), 7, 32, 16, 0, 2, 0, 4, xflip=True)


def test_inconsistent_arguments_are_refused_when_called(images):
    with pytest.raises(ValueError, match="batch 30 is not a whole number of ranks x accum 2 x batch_gpu 8"):
        loader.batches(images, 0, 30, 8, 0, 2, 0, 4)
    with pytest.raises(ValueError, match="rank 2 out of range for 2 ranks"):
        loader.batches(images, 0, 32, 8, 2, 2, 0, 4)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        loader.batches(images, -1, 32, 8, 0, 2, 0, 4)
    with pytest.raises(TypeError, match="ImageDataset or a pair of tensors"):
        loader.batches(PIXELS, 0, 32, 8, 0, 2, 0, 4)
