"""The consistency function f_θ (CM, arXiv:2303.01469v2, App. C) and CTM's jumper G_θ (arXiv:2310.02279v3) are the
papers' coefficients around the raw network, written out in tests/paper.py; an `outer` (t, s) -> (β, α) replaces
exactly the outer pair and nothing else; and the distances of the consistency losses are what their names say."""
import math

import torch
from hypothesis import given, settings, strategies as st

import paper
from algorithms import cd, ctm, edm

f64 = torch.float64
times = st.floats(0.01, 20.0)


def x_and_labels(seed, B=4):
    return torch.randn(B, 2, dtype=f64, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(times, st.integers(0, 2**16))
def test_consistency_function_is_cms_app_c_parametrisation(t, seed):
    cfg = cd.Config(sigma_min=0.01, sigma_max=20.0, sigma_data=0.6)
    x, tt = x_and_labels(seed), torch.full((4,), t, dtype=f64)
    got = cd.f(cfg, paper.Probe(2, seed=seed % 5), x, tt)
    torch.testing.assert_close(got, paper.cm_f(paper.Probe(2, seed=seed % 5), x, tt, eps=0.01, sd=0.6),
                               rtol=1e-12, atol=1e-14)


def test_an_outer_replaces_c_skip_and_c_out_at_s_equal_epsilon_only():
    cfg = cd.Config(sigma_min=0.01, sigma_data=0.6)
    seen = []

    def outer(t, s):
        seen.append(s)
        return 1 + t.sin(), t.cos() - 2

    x, t = x_and_labels(0), torch.tensor([0.01, 0.3, 2.0, 15.0], dtype=f64)
    got = cd.f(cfg, paper.Probe(2), x, t, outer=outer)
    _, _, c_in, c_noise = paper.edm_c(t, 0.6)
    F = paper.Probe(2)(c_in[:, None] * x, c_noise)
    torch.testing.assert_close(got, (1 + t.sin())[:, None] * x + (t.cos() - 2)[:, None] * F, rtol=1e-13, atol=1e-15)
    assert torch.equal(seen[0], torch.full((4,), 0.01, dtype=f64))


@settings(max_examples=60, deadline=None)
@given(times, st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_ctm_jumper_is_s_over_t_x_plus_one_minus_s_over_t_g(t, frac, seed):
    s = max(0.01, frac * t)
    x, net = x_and_labels(seed), paper.Probe(2, seed=seed % 5)
    torch.testing.assert_close(ctm.G(net, x, t, s, sigma_data=0.6), paper.ctm_G(net, x, t, s, sd=0.6),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ctm.g(net, x, t, s, sigma_data=0.6), paper.ctm_g(net, x, t, s, sd=0.6),
                               rtol=1e-12, atol=1e-14)
    c_skip, c_out, _, _ = paper.edm_c(t, 0.6)
    beta, alpha = ctm.ctm_outer(torch.tensor([t], dtype=f64), torch.tensor([s], dtype=f64), 0.6)
    torch.testing.assert_close(beta, (s / t + (1 - s / t) * c_skip).reshape(1), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(alpha, ((1 - s / t) * c_out).reshape(1), rtol=1e-13, atol=1e-15)


def test_ctm_outer_is_called_at_t_and_s_and_multiplies_the_raw_network():
    seen = []

    def outer(t, s):
        seen.append((t, s))
        return t / (1 + s), s - t

    x = x_and_labels(1)
    t, s = torch.tensor([0.5, 2.0, 9.0, 19.0], dtype=f64), torch.tensor([0.01, 1.0, 3.0, 19.0], dtype=f64)
    got = ctm.G(paper.Probe(2), x, t, s, sigma_data=0.6, outer=outer)
    _, _, c_in, c_noise = paper.edm_c(t, 0.6)
    NN = paper.Probe(2)(c_in[:, None] * x, c_noise, noise_labels_s=s.log() / 4)
    torch.testing.assert_close(got, (t / (1 + s))[:, None] * x + (s - t)[:, None] * NN, rtol=1e-13, atol=1e-15)
    assert torch.equal(seen[0][0], t) and torch.equal(seen[0][1], s)


def test_distances_are_the_mean_square_the_norm_and_icts_pseudo_huber():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, 4, dtype=f64, generator=g), torch.randn(6, 3, 4, dtype=f64, generator=g)
    sq = ((a - b) ** 2).reshape(6, -1).sum(1)
    torch.testing.assert_close(edm.squared_l2(a, b), sq / 12, rtol=1e-14, atol=0)          # a mean over 12 values
    torch.testing.assert_close(edm.l2(a, b), sq.sqrt(), rtol=1e-14, atol=0)
    c = 0.00054 * math.sqrt(12)                                                            # iCT: c = 0.00054·sqrt(d)
    torch.testing.assert_close(edm.pseudo_huber(a, b), (sq + c**2).sqrt() - c, rtol=1e-13, atol=0)
    torch.testing.assert_close(edm.pseudo_huber(a, b, c=0.3), (sq + 0.09).sqrt() - 0.3, rtol=1e-13, atol=0)
    # the two limits: ‖δ‖²/(2c) for ‖δ‖ ≪ c (relative error ‖δ‖²/(4c²) ≈ 1e-6 here), ‖δ‖ − c for ‖δ‖ ≫ c
    small = a + 1e-6
    torch.testing.assert_close(edm.pseudo_huber(a, small), torch.full((6,), 12e-12 / (2 * c), dtype=f64),
                               rtol=1e-5, atol=0)
    large = a + 1e3
    torch.testing.assert_close(edm.pseudo_huber(a, large), torch.full((6,), 1e3 * math.sqrt(12) - c, dtype=f64),
                               rtol=1e-10, atol=0)


def test_f_and_g_broadcast_per_example_times_over_image_shaped_data():
    x = torch.randn(3, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(0))
    t, s = torch.tensor([0.01, 1.0, 15.0], dtype=f64), torch.tensor([0.01, 0.5, 2.0], dtype=f64)
    net = lambda x_in, c_noise, labels=None, noise_labels_s=None: torch.tanh(x_in) * (
        c_noise if noise_labels_s is None else c_noise - noise_labels_s)[:, None, None, None]
    cfg = cd.Config(sigma_min=0.01, sigma_data=0.6)
    torch.testing.assert_close(cd.f(cfg, net, x, t), paper.cm_f(net, x, t, eps=0.01, sd=0.6), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ctm.G(net, x, t, s, sigma_data=0.6), paper.ctm_G(net, x, t, s, sd=0.6), rtol=1e-13,
                               atol=1e-15)
