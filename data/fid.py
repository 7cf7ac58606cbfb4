r"""Fréchet Inception Distance (FID): our own Fréchet-distance core, and an optional Inception feature extractor.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
arXiv 1706.08500v6) fits a Gaussian to the Inception-v3 pool features (2048-d) of generated and of real images
and reports the Fréchet (2-Wasserstein) distance between the two Gaussians (Dowson & Landau 1982):

    d^2 = |μ_1 - μ_2|^2 + Tr(Σ_1 + Σ_2 - 2 (Σ_1 Σ_2)^{1/2})

| code                     | symbol                 |
|--------------------------|------------------------|
| `mu1`, `mu2`             | μ_1, μ_2  [d]          |
| `sigma1`, `sigma2`       | Σ_1, Σ_2  [d, d]       |

`frechet_distance` and `feature_statistics` are plain float64 torch code, tested here against closed forms.
The Inception network comes from torch-fidelity, an optional extra (`pip install torch-fidelity`), whose
InceptionV3 is the port of the TensorFlow FID network that published numbers use. It downloads its weights on
first use, so it needs network access once (or `weights_path=` to a local copy): fine on a GPU node, impossible
on an offline machine, and never needed for training or for the tests. torch-fidelity also needs torchvision,
which must match the installed torch.

Papers report FID over 50,000 generated samples (EDM, CM and CTM alike), and `fid` defaults to that; the
reference statistics are those of every image of the dataset given, the training set as in EDM's `fid.py`.
FID on the 8x8 digits runs (the images are upsampled to 299x299) but is not a number to compare with anything.
These functions run in one process: under DDP, compute FID on rank 0.
"""

import torch


def frechet_distance(mu1, sigma1, mu2, sigma2):
    r"""|μ_1 - μ_2|^2 + Tr(Σ_1 + Σ_2 - 2 (Σ_1 Σ_2)^{1/2}) between two Gaussians, in float64, as a float.

    The trace of the matrix square root is taken without forming one. Σ_1 Σ_2 has the eigenvalues of
    Σ_1^{1/2} Σ_2 Σ_1^{1/2} = B Bᵀ with B = Σ_1^{1/2} Σ_2^{1/2}, so Tr (Σ_1 Σ_2)^{1/2} is the sum of the
    singular values of B (its nuclear norm). Symmetric square roots (`eigh`) and an SVD are stable, and taking singular
    values of B rather than square roots of the eigenvalues of B Bᵀ keeps full precision when a covariance is
    singular (fewer samples than feature dimensions), where the square root of a rounding error would not.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    B = _sqrt_psd(sigma1) @ _sqrt_psd(sigma2)
    tr_sqrt = torch.linalg.svdvals(B).sum()  # Tr (Σ_1 Σ_2)^{1/2} = ‖Σ_1^{1/2} Σ_2^{1/2}‖_*
    d2 = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_sqrt  # FID definition
    return d2.item()


def _sqrt_psd(sigma):
    """Σ^{1/2} of a symmetric PSD matrix, by eigendecomposition."""
    lam, U = torch.linalg.eigh(sigma)
    return U @ torch.diag(lam.clamp(min=0).sqrt()) @ U.T  # clamp: rounding makes zero eigenvalues slightly negative


def feature_statistics(feature_batches):
    """Mean [d] and unbiased covariance [d, d] (as `numpy.cov`) of feature batches [b, d], in float64, streaming."""
    n, s, S = 0, 0.0, 0.0
    for f in feature_batches:
        f = f.to(torch.float64)
        n, s, S = n + f.shape[0], s + f.sum(0), S + f.T @ f  # count, Σ f, Σ f fᵀ
    mu = s / n
    sigma = (S - n * torch.outer(mu, mu)) / (n - 1)  # sample covariance: (Σ f fᵀ - n μ μᵀ) / (n - 1)
    return mu, sigma


def to_uint8_rgb(x):
    """Images in [-1, 1] [B, C, H, W] -> uint8 [B, 3, H, W], as EDM saves them; grey images repeated to RGB."""
    pixels = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)  # as EDM's generate.py: x·127.5 + 128, clipped
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def inception_features(device="cuda", weights_path=None):
    """torch-fidelity's InceptionV3 (TensorFlow-FID port): uint8 [B, 3, H, W] -> pool features float32 [B, 2048]."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(
            "FID needs torch-fidelity, an optional extra: pip install torch-fidelity "
            "(or pip install 'consistency-distillation[fid]'); it also needs a torchvision that matches torch"
        ) from e
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path)
    net = net.to(device)

    @torch.no_grad()
    def features(images):
        (pool,) = net(images.to(device))
        return pool

    return features


def dataset_statistics(dataset, features, batch_size=250):
    """FID statistics (μ, Σ) of every image of an `ImageDataset` (data/images.py), in order, without flips."""
    batches = (
        features(to_uint8_rgb(dataset.batch(range(i, min(i + batch_size, len(dataset))))[0]))
        for i in range(0, len(dataset), batch_size)
    )
    return feature_statistics(batches)


def sample_statistics(generate, features, num_samples=50_000, batch_size=250):
    """FID statistics (μ, Σ) of `num_samples` images from `generate(n) -> [n, C, H, W] in [-1, 1]`."""
    batches = (
        features(to_uint8_rgb(generate(min(batch_size, num_samples - i))))
        for i in range(0, num_samples, batch_size)
    )
    return feature_statistics(batches)


def fid(generate, dataset, num_samples=50_000, batch_size=250, features=None):
    """FID of `num_samples` generated images against all images of `dataset`, with Inception unless `features`."""
    features = inception_features() if features is None else features
    mu_gen, sigma_gen = sample_statistics(generate, features, num_samples, batch_size)
    mu_ref, sigma_ref = dataset_statistics(dataset, features, batch_size)
    return frechet_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)


def _moments(feature_batches, device):
    """[count, Σ f, Σ f fᵀ] of feature batches in float64: sums, so that shards add up across ranks."""
    n, s, S = torch.zeros((), dtype=torch.float64, device=device), 0.0, 0.0
    for f in feature_batches:
        f = f.to(device, torch.float64)
        n, s, S = n + f.shape[0], s + f.sum(0), S + f.T @ f
    return n, s, S


def _all_reduce(moments, world_size):
    if world_size > 1:
        import torch.distributed as dist
        for m in moments:
            dist.all_reduce(m)
    return moments


def _stats(n, s, S):
    mu = s / n
    return mu, (S - n * torch.outer(mu, mu)) / (n - 1)  # as `feature_statistics`


def fid_sharded(generate, dataset, num_samples, rank=0, world_size=1, batch_size=250, features=None,
                cache_dir="runs/fid-refs", device=None):
    """FID of `num_samples` images `generate(seeds) -> [len(seeds), C, H, W]` in [-1, 1] against all images of
    `dataset`, with the seeds 0, 1, … sharded over the ranks (rank r takes seeds r, r + W, …): each rank sums its
    features, the sums are all-reduced, so every rank returns the same value. The reference statistics are
    computed once per dataset (also sharded) and cached in `cache_dir` under the dataset's source and size."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    features = inception_features(device) if features is None else features
    seeds = list(range(rank, num_samples, world_size))
    gen = (features(to_uint8_rgb(generate(seeds[i:i + batch_size]))) for i in range(0, len(seeds), batch_size))
    mu_gen, sigma_gen = _stats(*_all_reduce(_moments(gen, device), world_size))
    import hashlib
    import os
    key = hashlib.sha1(f"{dataset.source}|{len(dataset)}|{tuple(dataset.images.shape)}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        ref = torch.load(path, map_location=device, weights_only=True)
        mu_ref, sigma_ref = ref["mu"], ref["sigma"]
    else:
        idx = list(range(rank, len(dataset), world_size))
        real = (features(to_uint8_rgb(dataset.batch(idx[i:i + batch_size])[0])) for i in range(0, len(idx), batch_size))
        mu_ref, sigma_ref = _stats(*_all_reduce(_moments(real, device), world_size))
        if rank == 0:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(dict(mu=mu_ref.cpu(), sigma=sigma_ref.cpu(), source=dataset.source), path + ".tmp")
            os.replace(path + ".tmp", path)
    return frechet_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)
