"""The toy datasets are the mixtures they claim to be, and their denoiser is the Gaussian-mixture posterior mean
written out with the full squared distances (data/toy.py docstring), exactly, at every σ."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from data import toy

f64 = torch.float64


def posterior_mean(means, weights, std, x, sigma):
    """E[x_0 | x_σ = x] for Σ_k w_k N(μ_k, std²I) under x_σ = x_0 + σz: Gaussian conditioning per component, mixed by
    p(k | x_σ) ∝ w_k N(x_σ; μ_k, (std² + σ²)I)."""
    v = std**2 + sigma**2
    logp = torch.log(weights)[None] - ((x[:, None, :] - means[None]) ** 2).sum(-1) / (2 * v)   # [B, K]
    p = torch.softmax(logp, dim=1)
    per_k = means[None] + std**2 / v * (x[:, None, :] - means[None])                            # [B, K, d]
    return (p[:, :, None] * per_k).sum(1)


MIX = toy.GaussianMixture("mix", [[1.0, -2.0], [-0.5, 0.7], [2.0, 1.5]], 0.3,
                          weights=torch.tensor([0.2, 0.5, 0.3], dtype=f64), classes=[0, 1, 1])


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-3, 50.0), st.integers(0, 2**31))
def test_denoiser_is_the_mixture_posterior_mean(sigma, seed):
    x = 3 * torch.randn(16, 2, dtype=f64, generator=torch.Generator().manual_seed(seed))
    expected = posterior_mean(MIX.means, torch.tensor([0.2, 0.5, 0.3], dtype=f64), 0.3, x, sigma)
    torch.testing.assert_close(MIX.denoiser(x, sigma), expected, rtol=1e-10, atol=1e-12)


def test_labelled_denoiser_is_the_posterior_mean_within_the_class():
    """Class 1 holds components 1 and 2: the posterior is the two-component mixture renormalised (weights 0.5, 0.3)."""
    x = 2 * torch.randn(8, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    labels = toy.one_hot(torch.ones(8, dtype=torch.long), 2, f64)
    expected = posterior_mean(MIX.means[1:], torch.tensor([0.5, 0.3], dtype=f64), 0.3, x, 0.8)
    torch.testing.assert_close(MIX.denoiser(x, 0.8, labels), expected, rtol=1e-10, atol=1e-12)
    only_0 = toy.one_hot(torch.zeros(8, dtype=torch.long), 2, f64)
    torch.testing.assert_close(MIX.denoiser(x, 0.8, only_0), MIX.means[0] + 0.09 / 0.73 * (x - MIX.means[0]),
                               rtol=1e-10, atol=1e-12)


def test_samples_follow_the_weights_and_labels_name_their_component():
    """Component frequencies against w with 5 binomial standard errors; each sample lies within 6 std of a
    component of its labelled class (std = 0.3, modes ≥ 1.9 apart)."""
    n = 20_000
    x, labels = MIX.sample(n, torch.Generator().manual_seed(1))
    d = (x[:, None, :] - MIX.means[None]).norm(dim=-1)                         # [n, K]
    k = d.argmin(1)
    for j, w in enumerate([0.2, 0.5, 0.3]):
        assert abs(float((k == j).double().mean()) - w) < 5 * math.sqrt(w * (1 - w) / n)
    assert bool((d.min(1).values < 6 * 0.3).all())
    assert torch.equal(labels.argmax(1), MIX.classes[k]) and labels.shape == (n, 2)
    # within a component the spread is std
    for j in range(3):
        spread = (x[k == j] - MIX.means[j]).std(0)
        assert bool(((spread - 0.3).abs() < 0.02).all()), spread


def test_ring8_two_modes_and_gaussian_have_their_stated_geometry():
    r8 = toy.ring8()
    a = torch.arange(8, dtype=f64) * math.pi / 4
    torch.testing.assert_close(r8.means, torch.stack([a.cos(), a.sin()], 1), rtol=0, atol=1e-15)
    assert r8.std == 0.08 and r8.label_dim == 8 and torch.equal(r8.classes, torch.arange(8))
    tm = toy.two_modes()
    assert tm.means.tolist() == [[-1.0, 0.0], [1.0, 0.0]] and tm.std == 0.15 and tm.label_dim == 2
    g = toy.gaussian(std=0.7, dim=3)
    x, labels = g.sample(40_000, torch.Generator().manual_seed(2))
    assert labels is None and x.shape == (40_000, 3)
    assert bool((x.mean(0).abs() < 5 * 0.7 / 200).all()) and bool(((x.std(0) - 0.7).abs() < 5 * 0.7 / 283).all())


def test_spiral_is_archimedean_and_checkerboard_keeps_the_black_cells():
    sp = toy.spiral(n=50, turns=1.5, scale=2.0)
    u = torch.linspace(0.1, 1.0, 50, dtype=f64)
    torch.testing.assert_close(sp.means.norm(dim=1), 2.0 * u, rtol=1e-12, atol=0)          # r = scale·u
    angle = torch.atan2(sp.means[:, 1], sp.means[:, 0])
    wrapped = torch.remainder(angle - 2 * math.pi * 1.5 * u + math.pi, 2 * math.pi) - math.pi
    assert float(wrapped.abs().max()) < 1e-9 and sp.std == 0.0                           # θ = 2π·turns·u
    cb = toy.checkerboard(n_side=8, cells=4, scale=1.5)
    assert cb.means.shape == (32, 2) and cb.std == 0.0
    cell = ((cb.means / 1.5 + 1) / 2 * 4).floor().long()
    assert bool((cell.sum(1) % 2 == 0).all()) and float(cb.means.abs().max()) < 1.5
    assert len({tuple(p) for p in cb.means.tolist()}) == 32


@pytest.mark.parametrize("name", ["spiral", "checkerboard"])
def test_a_point_set_denoiser_returns_the_nearest_point_at_small_sigma_and_the_mean_at_large(name):
    ds = toy.DATASETS[name]()
    pts = ds.means[::7]
    torch.testing.assert_close(ds.denoiser(pts + 1e-5, 1e-4), pts, rtol=0, atol=1e-12)
    far = ds.denoiser(torch.zeros(3, 2, dtype=f64), 1e4)
    torch.testing.assert_close(far, ds.means.mean(0).expand(3, 2), rtol=0, atol=1e-6)


def test_nearest_component_is_the_posterior_mode_and_for_a_point_set_the_nearest_point():
    """argmax_k ln w_k − ‖x − μ_k‖²/(2 std²): the generating component of well-separated samples; at the midpoint of
    two equally distant components the heavier weight wins; for std = 0 the nearest point."""
    x, labels = MIX.sample(2000, torch.Generator().manual_seed(4))
    k = MIX.nearest_component(x)
    d = (x[:, None, :] - MIX.means[None]).norm(dim=-1)
    assert torch.equal(k, d.argmin(1))                                      # modes ≥ 1.9 apart, std = 0.3
    mid = ((MIX.means[1] + MIX.means[2]) / 2)[None]                         # weights 0.5 (k = 1) and 0.3 (k = 2)
    assert MIX.nearest_component(mid).tolist() == [1]
    sp = toy.spiral()
    q = sp.means[[3, 100, 399]] + 1e-4
    assert sp.nearest_component(q).tolist() == [3, 100, 399]
