"""Image datasets (data/images.py) on tiny files each test writes itself, the digits and their exact denoiser,
and the Fréchet-distance core of FID (data/fid.py) against closed forms."""

import importlib.util
import io
import json
import math
import os
import pickle
import struct
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch

from data.fid import dataset_statistics, feature_statistics, fid, frechet_distance, inception_features, to_uint8_rgb
from data.images import DatasetError, EmpiricalTeacher, empirical_denoiser, one_hot, open_dataset

rng = np.random.default_rng(0)


def images_nhwc(n, size=8, channels=3):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10, python version: five pickled batches written the way Python 2 wrote them.


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 8-bit strings and NumPy's array rebuilder under its old module name, as in the
    official CIFAR-10 batches, which Python 2 pickled."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def cifar_batch_bytes(data, labels):
    out = io.BytesIO()
    batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(data)}
    Python2Pickler(out, protocol=2).dump(batch)
    return out.getvalue()


def write_cifar(tmp_path, per_batch=2, corrupt=None):
    """A cifar-10-batches-py folder and its cifar-10-python.tar.gz; returns (tarball, folder, data, labels)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 5 * per_batch).tolist()
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        (folder / f"data_batch_{b + 1}").write_bytes(cifar_batch_bytes(data[rows], labels[rows]))
    (folder / "test_batch").write_bytes(cifar_batch_bytes(data[:per_batch], labels[:per_batch]))
    meta = io.BytesIO()
    Python2Pickler(meta, protocol=2).dump({b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
    (folder / "batches.meta").write_bytes(meta.getvalue())
    (folder / "readme.html").write_text("<html></html>")
    if corrupt is not None:
        corrupt(folder)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return tarball, folder, data, labels


def test_cifar10_tarball_folder_and_parent_folder_read_the_official_layout(tmp_path):
    tarball, folder, data, labels = write_cifar(tmp_path)
    for spec in (f"cifar10:{tarball}", f"cifar10:{folder}", f"cifar10:{tmp_path}"):
        ds = open_dataset(spec)
        assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (10, 3, 32, 10)
        # Each row: 1024 red values, then green, then blue, each 32x32 row-major (CIFAR-10 page).
        assert np.array_equal(ds.images[3, 0], data[3, :1024].reshape(32, 32))
        assert np.array_equal(ds.images[3, 2, 5], data[3, 2048 + 5 * 32 : 2048 + 6 * 32])
        x, y = ds.batch([3, 7])
        assert y.tolist() == [labels[3], labels[7]]
        assert torch.equal(x[0, 1], torch.from_numpy(data[3, 1024:2048].reshape(32, 32)).float() / 127.5 - 1)


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    def plant(folder):
        (folder / "data_batch_2").write_bytes(pickle.dumps({"data": RunsCode()}))

    tarball, folder, _, _ = write_cifar(tmp_path, corrupt=plant)
    for path in (tarball, folder):
        with pytest.raises(DatasetError, match=r"data_batch_2.*refusing global (posix|nt)\.system"):
            open_dataset(f"cifar10:{path}")


def test_cifar10_bad_inputs_name_the_file(tmp_path):
    tarball, folder, data, labels = write_cifar(tmp_path)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated.tar.gz: not a readable tar archive"):
        open_dataset(f"cifar10:{truncated}")

    (folder / "data_batch_4").write_bytes(cifar_batch_bytes(data[:2], labels[:3]))
    with pytest.raises(DatasetError, match="data_batch_4: 2 images but 3 labels"):
        open_dataset(f"cifar10:{folder}")
    (folder / "data_batch_4").write_bytes(cifar_batch_bytes(data[:2, :3000], labels[:2]))
    with pytest.raises(DatasetError, match=r"data_batch_4: 'data' must be a uint8 array \[n, 3072\]"):
        open_dataset(f"cifar10:{folder}")
    (folder / "data_batch_4").write_bytes(cifar_batch_bytes(data[:2], labels[:2])[:-40])
    with pytest.raises(DatasetError, match="data_batch_4: not a readable CIFAR-10 batch"):
        open_dataset(f"cifar10:{folder}")
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="no data_batch_4"):
        open_dataset(f"cifar10:{folder}")

    npz = tmp_path / "images.npz"
    np.savez(npz, x=images_nhwc(2))
    with pytest.raises(DatasetError, match="images.npz: not a readable tar archive"):
        open_dataset(f"cifar10:{npz}")


# ----------------------------------------------------------------------------------------------------------
# EDM-style PNG datasets.


def write_pngs(root, images, names):
    Image = pytest.importorskip("PIL.Image")
    for image, name in zip(images, names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(root / name)


def zip_folder(folder, path):
    with zipfile.ZipFile(path, "w") as archive:  # stored, not deflated, as EDM's dataset_tool writes
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                archive.write(p, p.relative_to(folder).as_posix())
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_and_zip_with_dataset_json(tmp_path, channels):
    images = images_nhwc(5, channels=channels)
    # EDM's dataset_tool layout: nested folders; read back sorted by path, not by write order.
    names = [f"0000{i // 3}/img0000000{i}.png" for i in (3, 1, 0, 4, 2)]
    folder = tmp_path / "ds"
    write_pngs(folder, images, names)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}))
    order = np.argsort(names)
    for spec in (f"folder:{folder}", f"zip:{zip_folder(folder, tmp_path / 'ds.zip')}"):
        ds = open_dataset(spec)
        assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (5, channels, 8, 3)
        assert np.array_equal(ds.images, images[order].transpose(0, 3, 1, 2))
        assert ds.labels.tolist() == [i % 3 for i in order]


def test_png_folder_without_labels_or_with_null_labels(tmp_path):
    write_pngs(tmp_path, images_nhwc(3), ["a.png", "b.png", "c.png"])
    assert open_dataset(f"folder:{tmp_path}").labels is None
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": None}))
    ds = open_dataset(f"folder:{tmp_path}")
    assert (ds.labels, ds.num_classes) == (None, 0)
    assert ds.batch([0, 2])[1] is None


def test_png_bad_inputs_name_the_file(tmp_path):
    folder = tmp_path / "ds"
    write_pngs(folder, images_nhwc(3), ["a.png", "b.png", "c.png"])
    labels = folder / "dataset.json"

    labels.write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1]]}))
    with pytest.raises(DatasetError, match=r"dataset.json: 3 PNGs and 2 labels do not match .*c\.png"):
        open_dataset(f"folder:{folder}")
    labels.write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["c.png", 1], ["d.png", 2]]}))
    with pytest.raises(DatasetError, match=r"3 PNGs and 4 labels do not match .*d\.png"):
        open_dataset(f"folder:{folder}")
    labels.write_text('{"labels": [["a.png", 0],')
    with pytest.raises(DatasetError, match=r"dataset.json: expected \{\"labels\""):
        open_dataset(f"folder:{folder}")
    labels.unlink()

    good_zip = zip_folder(folder, tmp_path / "good.zip").read_bytes()
    (tmp_path / "truncated.zip").write_bytes(good_zip[: len(good_zip) // 2])
    with pytest.raises(DatasetError, match="truncated.zip: not a readable zip archive"):
        open_dataset(f"zip:{tmp_path / 'truncated.zip'}")

    png = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(DatasetError, match="b.png: not a readable PNG"):
        open_dataset(f"folder:{folder}")
    with pytest.raises(DatasetError, match="b.png: not a readable PNG"):
        open_dataset(f"zip:{zip_folder(folder, tmp_path / 'bad.zip')}")

    write_pngs(folder, images_nhwc(1, size=16), ["b.png"])
    with pytest.raises(DatasetError, match=r"b.png: RGB 16x16, but a.png is 8x8 with 3 channel"):
        open_dataset(f"folder:{folder}")
    write_pngs(folder, images_nhwc(1, channels=1), ["b.png"])
    with pytest.raises(DatasetError, match=r"b.png: L 8x8, but a.png is 8x8 with 3 channel"):
        open_dataset(f"folder:{folder}")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty: no .png files"):
        open_dataset(f"folder:{empty}")
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset(f"folder:{tmp_path / 'good.zip'}")


def test_png_datasets_without_pillow_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(ImportError, match="pip install pillow"):
        open_dataset(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------------------------------------
# Plain NumPy arrays.


@pytest.mark.parametrize(
    "layout, image_key, label_key",
    [("nhwc", "x", "y"), ("nchw", "images", "labels"), ("nhw", "arr_0", None)],
)
def test_npz_layouts_and_keys(tmp_path, layout, image_key, label_key):
    nhwc = images_nhwc(4, channels=1 if layout == "nhw" else 3)
    array = {"nhwc": nhwc, "nchw": nhwc.transpose(0, 3, 1, 2), "nhw": nhwc[..., 0]}[layout]
    labels = np.array([2, 0, 1, 2])
    arrays = {image_key: array, **({label_key: labels} if label_key else {})}
    np.savez(tmp_path / "d.npz", **arrays)
    ds = open_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert np.array_equal(ds.images, nhwc.transpose(0, 3, 1, 2))
    assert (ds.num_classes, None if ds.labels is None else ds.labels.tolist()) == (
        (3, labels.tolist()) if label_key else (0, None)
    )


def test_npy_is_memory_mapped_and_read_as_nchw(tmp_path):
    nhwc = images_nhwc(6)
    np.save(tmp_path / "d.npy", nhwc)
    ds = open_dataset(f"npy:{tmp_path / 'd.npy'}")
    assert isinstance(ds.images.base, np.memmap)
    x, y = ds.batch([5, 1])
    assert y is None
    assert torch.equal(x, torch.from_numpy(nhwc[[5, 1]].transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1)


def test_array_bad_inputs_name_the_file(tmp_path):
    def expect(spec, message):
        with pytest.raises(DatasetError, match=message):
            open_dataset(spec)

    npz, npy = tmp_path / "d.npz", tmp_path / "d.npy"
    np.savez(npz, x=images_nhwc(4), y=np.arange(3))
    expect(f"npz:{npz}", r"d.npz: 4 images but labels of shape \[3\]")
    np.savez(npz, x=images_nhwc(4).astype(np.float32))
    expect(f"npz:{npz}", "d.npz: images are float32, expected uint8")
    np.savez(npz, x=rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8))
    expect(f"npz:{npz}", r"d.npz: array of shape \[4, 8, 6, 3\] is not")
    np.savez(npz, x=images_nhwc(4), images=images_nhwc(4))
    expect(f"npz:{npz}", "d.npz: holds .* expected exactly one image array")
    np.savez(npz, x=images_nhwc(4), y=np.array([0, 1, -1, 2]))
    expect(f"npz:{npz}", "d.npz: labels must be integers >= 0")
    np.savez(npz, x=images_nhwc(2))
    whole = npz.read_bytes()
    npz.write_bytes(whole[: len(whole) // 2])
    expect(f"npz:{npz}", "d.npz: not a readable .npz archive")
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0xFF  # inside the stored array: the zip's CRC-32 no longer matches
    npz.write_bytes(bytes(flipped))
    expect(f"npz:{npz}", "d.npz: a corrupt array inside")

    np.save(npy, images_nhwc(4))
    whole = npy.read_bytes()
    npy.write_bytes(whole[: len(whole) - 10])
    expect(f"npy:{npy}", "d.npy: not a readable .npy array")
    npy.write_bytes(b"certainly not numpy")
    expect(f"npy:{npy}", "d.npy: not a .npy array")
    np.savez(npz, x=images_nhwc(2))
    expect(f"npy:{npz}", "d.npz: not a .npy array")
    np.save(npy, images_nhwc(2))
    expect(f"npz:{npy}", r"d.npy: not an .npz archive")
    expect(f"npz:{tmp_path}", "a folder, not an .npz archive")


def test_open_dataset_refuses_missing_paths_and_unknown_specs(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.npz: no such file or folder"):
        open_dataset(f"npz:{tmp_path / 'nowhere.npz'}")
    for spec in ("imagenet:/data", "npz:", str(tmp_path)):
        with pytest.raises(DatasetError, match="unknown dataset spec .* expected cifar10:PATH, folder:DIR"):
            open_dataset(spec)


def test_batch_scales_to_minus_one_one_and_xflip_is_reproducible(tmp_path):
    nhwc = images_nhwc(64)
    nhwc[0] = 0
    nhwc[1] = 255
    np.save(tmp_path / "d.npy", nhwc)
    ds = open_dataset(f"npy:{tmp_path / 'd.npy'}")
    plain, _ = ds.batch(range(64))
    assert plain.dtype == torch.float32 and plain.shape == (64, 3, 8, 8)
    assert plain[0].eq(-1).all() and plain[1].eq(1).all()
    flipped, _ = ds.batch(range(64), xflip=True, generator=torch.Generator().manual_seed(1))
    again, _ = ds.batch(range(64), xflip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(flipped, again)
    mirrored = (flipped == plain.flip(3)).flatten(1).all(1)
    assert ((flipped == plain).flatten(1).all(1) | mirrored).all()
    assert 10 < mirrored.sum() < 54  # about half; each image is either itself or its mirror


def test_one_hot_gives_edm_class_labels():
    assert torch.equal(one_hot(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))


# ----------------------------------------------------------------------------------------------------------
# The digits and their exact empirical denoiser.


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return open_dataset("digits")


def test_digits_without_scikit_learn_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes the import raise ImportError, loaded or not
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        open_dataset("digits")


def brute_force_posterior_mean(points, x, sigma):
    """Σ_i N(x; x_i, σ²I) x_i / Σ_i N(x; x_i, σ²I), written out directly (no log-sum-exp, no expansion)."""
    d2 = ((x[:, None, :] - points[None, :, :]) ** 2).sum(-1)  # [B, N]
    w = torch.exp(-d2 / (2 * sigma[:, None] ** 2))
    return (w[:, :, None] * points[None]).sum(1) / w.sum(1, keepdim=True)


def test_digits_are_1797_grey_8x8_images_in_minus_one_one(digits):
    assert (len(digits), digits.channels, digits.resolution, digits.num_classes) == (1797, 1, 8, 10)
    x, y = digits.batch(range(len(digits)))
    assert x.min() == -1 and x.max() == 1
    assert torch.bincount(y).min() > 170  # every digit is there


def test_empirical_denoiser_equals_brute_force_posterior_mean(digits):
    points = digits.batch(range(len(digits)))[0].double().flatten(1)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.3, 0.7, 1.5, 4.0, 20.0], dtype=torch.float64)
    x = points[[5, 100, 900, 1500, 1700]] + sigma[:, None] * torch.randn(5, 64, generator=gen, dtype=torch.float64)
    D = empirical_denoiser(points, x, sigma)
    expected = brute_force_posterior_mean(points, x, sigma)
    assert D.dtype == torch.float64
    torch.testing.assert_close(D, expected, rtol=1e-10, atol=1e-10)


def test_empirical_denoiser_tends_to_the_nearest_image_as_sigma_goes_to_zero(digits):
    points = digits.batch(range(len(digits)))[0].double().flatten(1)
    gen = torch.Generator().manual_seed(1)
    x = points[:32] + 1e-3 * torch.randn(32, 64, generator=gen, dtype=torch.float64)
    nearest = points[torch.cdist(x, points).argmin(1)]
    D = empirical_denoiser(points, x, torch.full((32,), 1e-3, dtype=torch.float64))
    assert torch.isfinite(D).all()  # brute force would divide 0 by 0 here: every Gaussian weight underflows
    torch.testing.assert_close(D, nearest, rtol=0, atol=1e-12)


def test_empirical_denoiser_tends_to_the_data_mean_as_sigma_goes_to_infinity(digits):
    points = digits.batch(range(len(digits)))[0].double().flatten(1)
    sigma = torch.full((4,), 1e8, dtype=torch.float64)
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = points[:4] + sigma[:, None] * z
    torch.testing.assert_close(empirical_denoiser(points, x, sigma), points.mean(0).expand(4, -1), rtol=0, atol=1e-5)


def test_empirical_teacher_is_an_edm_style_denoiser_with_exact_class_conditioning(digits):
    teacher = EmpiricalTeacher(digits)
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (8, 1, 10)
    x0, y0 = digits.batch([0, 1, 2, 3])
    sigma = torch.tensor([0.5, 1.0, 2.0, 5.0])
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    D_x = teacher(x, sigma)
    assert D_x.dtype == torch.float32 and D_x.shape == x.shape
    points = teacher.points.means  # the training images, float64 [N, 64]
    expected = brute_force_posterior_mean(points, x.double().flatten(1), sigma.double())
    torch.testing.assert_close(D_x, expected.float().reshape(x.shape))

    wanted = torch.tensor([7, 7, 3, 0])  # a class other than the clean image's, for most rows
    D_c = teacher(x, sigma, class_labels=one_hot(wanted, 10))
    for b in range(4):
        members = digits.labels == wanted[b].item()
        x_b, sigma_b = x[b : b + 1].double().flatten(1), sigma[b : b + 1].double()
        expected = brute_force_posterior_mean(points[members], x_b, sigma_b)
        torch.testing.assert_close(D_c[b], expected.float().reshape(1, 8, 8))

    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under --precision bf16: computed in float64 anyway
        torch.testing.assert_close(teacher(x, sigma), D_x)


# ----------------------------------------------------------------------------------------------------------
# FID: the Fréchet-distance core against closed forms.


def random_covariance(d, gen):
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(16, generator=gen, dtype=torch.float64) for _ in range(2))
    v1, v2 = (torch.rand(16, generator=gen, dtype=torch.float64) + 0.1 for _ in range(2))
    closed_form = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(closed_form.item(), rel=1e-10)


def test_frechet_distance_of_non_commuting_2x2_covariances_is_the_closed_form():
    # For a 2x2 matrix A with eigenvalues λ1, λ2 >= 0: Tr A^{1/2} = √λ1 + √λ2 = sqrt(tr A + 2 sqrt(det A)).
    gen = torch.Generator().manual_seed(1)
    s1, s2 = random_covariance(2, gen), random_covariance(2, gen)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    A = s1 @ s2
    tr_sqrt = math.sqrt(torch.trace(A).item() + 2 * math.sqrt(torch.det(A).item()))
    mu1, mu2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    closed_form = ((mu1 - mu2) ** 2).sum().item() + torch.trace(s1 + s2).item() - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(closed_form, rel=1e-10)


def test_fid_of_a_feature_set_against_itself_is_zero_even_with_singular_covariance():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(50, 64, generator=gen) @ torch.randn(64, 64, generator=gen) + 3  # rank 49 < 64
    mu, sigma = feature_statistics(features.split(16))
    assert torch.trace(sigma) > 1000
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    assert frechet_distance(mu, sigma, mu + 0.1, sigma) == pytest.approx(64 * 0.01, rel=1e-9)


def test_feature_statistics_streams_to_the_sample_mean_and_covariance():
    features = torch.randn(103, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    mu, sigma = feature_statistics(features.split(10))
    torch.testing.assert_close(mu, features.mean(0))
    torch.testing.assert_close(sigma, torch.cov(features.T))


def test_to_uint8_round_trips_dataset_pixels(tmp_path):
    nhwc = images_nhwc(8, channels=1)
    np.save(tmp_path / "d.npy", nhwc)
    x, _ = open_dataset(f"npy:{tmp_path / 'd.npy'}").batch(range(8))
    pixels = to_uint8_rgb(x)
    assert pixels.shape == (8, 3, 8, 8)
    assert torch.equal(pixels, torch.from_numpy(nhwc).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))


def test_fid_pipeline_with_a_stand_in_feature_extractor(tmp_path):
    """`fid` end to end with a fixed linear map in place of Inception (whose weights cannot be fetched here)."""
    np.save(tmp_path / "d.npy", images_nhwc(40, size=4))
    ds = open_dataset(f"npy:{tmp_path / 'd.npy'}")
    W = torch.randn(48, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    features = lambda pixels: pixels.flatten(1).double() @ W  # uint8 [B, 3, 4, 4] -> [B, 6]
    cursor = iter(range(len(ds)))
    replay = lambda n: ds.batch([next(cursor) for _ in range(n)])[0]  # generates the dataset itself, in order
    assert abs(fid(replay, ds, num_samples=40, batch_size=16, features=features)) < 1e-6
    darker = lambda n: (ds.batch(range(n))[0] - 0.5).clip(-1, 1)
    mu, sigma = feature_statistics([features(to_uint8_rgb(darker(40)))])
    expected = frechet_distance(mu, sigma, *dataset_statistics(ds, features))
    assert fid(darker, ds, num_samples=40, batch_size=40, features=features) == pytest.approx(expected)
    assert expected > 1


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_features_without_torch_fidelity_say_how_to_install_it():
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_features("cpu")


# ----------------------------------------------------------------------------------------------------------
# The decoded-image cache: decoded once per dataset, memory-mapped by every process that opens it.


def labelled_png_zip(tmp_path, n=6, name="ds.zip", seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    names = [f"{i // 4:05d}/img{i:08d}.png" for i in range(n)]
    folder = tmp_path / f"{name}.src"
    write_pngs(folder, images, names)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n_, i % 3] for i, n_ in enumerate(names)]}))
    return zip_folder(folder, tmp_path / name), images


def entries(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_a_cached_dataset_is_decoded_once_then_memory_mapped(tmp_path, monkeypatch):
    import data.images

    path, images = labelled_png_zip(tmp_path)
    cache = tmp_path / "cache"
    first = open_dataset(f"zip:{path}", cache_dir=cache)
    monkeypatch.setattr(data.images, "_png_dataset", lambda *a: pytest.fail("decoded again"))
    again = open_dataset(f"zip:{path}", cache_dir=cache)
    for ds in (first, again):
        assert isinstance(ds.images, np.memmap) and ds.mapped.startswith(str(cache))
        assert np.array_equal(ds.images, images.transpose(0, 3, 1, 2))
        assert ds.labels.tolist() == [i % 3 for i in range(6)] and ds.num_classes == 3
    assert len(entries(cache)) == 1


def test_an_edited_dataset_is_decoded_afresh(tmp_path):
    path, _ = labelled_png_zip(tmp_path)
    cache = tmp_path / "cache"
    open_dataset(f"zip:{path}", cache_dir=cache)
    _, new_images = labelled_png_zip(tmp_path, seed=1)  # rewrites ds.zip with other pixels
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    ds = open_dataset(f"zip:{path}", cache_dir=cache)
    assert np.array_equal(ds.images, new_images.transpose(0, 3, 1, 2))
    assert len(entries(cache)) == 2


def test_every_format_but_npy_is_cached_and_npy_is_mapped_in_place(tmp_path):
    tarball, _, data, labels = write_cifar(tmp_path)
    np.savez(tmp_path / "d.npz", x=images_nhwc(4), y=np.array([1, 0, 1, 1]))
    np.save(tmp_path / "d.npy", images_nhwc(4))
    cache = tmp_path / "cache"
    for spec in (f"cifar10:{tarball}", f"npz:{tmp_path / 'd.npz'}", f"npy:{tmp_path / 'd.npy'}"):
        plain, cached = open_dataset(spec), open_dataset(spec, cache_dir=cache)
        assert np.array_equal(plain.images, cached.images) and isinstance(cached.images, np.memmap)
        assert (plain.num_classes, None if plain.labels is None else plain.labels.tolist()) == (
            cached.num_classes, None if cached.labels is None else cached.labels.tolist())
    assert len(entries(cache)) == 2


def _open_in_child(spec, cache, out):
    ds = open_dataset(spec, cache_dir=cache)
    np.save(out, np.asarray(ds.images))


def test_processes_opening_a_new_dataset_at_once_decode_it_once(tmp_path, monkeypatch):
    import multiprocessing

    import data.images

    path, images = labelled_png_zip(tmp_path, n=40)
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    real = data.images._build_entry

    def logged(*args):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)  # long enough that the other processes look for the entry while it is being built
        return real(*args)

    monkeypatch.setattr(data.images, "_build_entry", logged)  # inherited by the forked children
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_open_in_child, args=(f"zip:{path}", cache, tmp_path / f"{i}.npy"))
                for i in range(3)]
    for c in children:
        c.start()
    for c in children:
        c.join(60)
    assert [c.exitcode for c in children] == [0, 0, 0]
    assert log.read_text() == "built\n"
    for i in range(3):
        assert np.array_equal(np.load(tmp_path / f"{i}.npy"), images.transpose(0, 3, 1, 2))
    assert len(entries(cache)) == 1


def test_a_dataset_that_fails_to_decode_leaves_no_cache_entry(tmp_path):
    folder = tmp_path / "ds"
    write_pngs(folder, images_nhwc(3), ["a.png", "b.png", "c.png"])
    (folder / "b.png").write_bytes((folder / "b.png").read_bytes()[:30])
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="b.png: not a readable PNG"):
        open_dataset(f"folder:{folder}", cache_dir=cache)
    assert entries(cache) == []


def test_a_memory_mapped_dataset_travels_as_its_file_name(tmp_path):
    np.save(tmp_path / "d.npy", images_nhwc(500, size=16))
    ds = open_dataset(f"npy:{tmp_path / 'd.npy'}")
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # the pixels are 384,000 bytes
    back = pickle.loads(blob)
    assert isinstance(back.images, np.memmap) and np.array_equal(back.images, ds.images)
    assert torch.equal(back.take([3, 1], np.array([True, False]))[0], ds.take([3, 1], np.array([True, False]))[0])
