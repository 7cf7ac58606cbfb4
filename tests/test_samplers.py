"""Samplers against their algorithms written out step by step (tests/paper.py): network-call counts, the σ's of every
call, the last step, and the branches the closed-form tests do not reach.

EDM: Karras et al., arXiv:2206.00364v2, Alg. 1. aDDIM: Heek et al., arXiv:2403.06807v3, Sec. 3, Alg. 3.
CM: Song et al., arXiv:2303.01469v2, Alg. 1. CTM: Kim et al., arXiv:2310.02279v3, γ-sampling."""
import math

import pytest
import torch

import paper
from algorithms import addim, cd, ctm, edm
from data import toy

f64 = torch.float64


class Recording:
    """A denoiser that records the σ of every call and returns a toy's exact D."""

    def __init__(self, D):
        self.D, self.sigmas = D, []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(torch.as_tensor(sigma, dtype=f64).flatten())
        return self.D(x, sigma, labels)


def test_edm_sampler_takes_2n_minus_1_calls_at_the_karras_levels_and_ends_with_an_euler_step_to_zero():
    """Alg. 1 with t_N = 0: N − 1 Heun steps (calls at t_i and t_{i+1}), then one Euler step t_{N−1} → 0, whose
    result x + (0 − t)(x − D)/t is D(x; t_{N−1}) itself. NFE = 2N − 1."""
    ds = toy.ring8()
    noise = torch.randn(16, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    for N in (2, 3, 7):
        cfg = edm.Config(sigma_min=0.01, sigma_max=20.0, rho=5.0)
        D = Recording(ds.denoiser)
        got = edm.sample(cfg, D, noise, num_steps=N)
        t = paper.karras_grid(N, 0.01, 20.0, 5.0)
        expected_sigmas = [t[0]] + [v for v in t[1:] for _ in range(2)]       # t0, t1, t1, …, t_{N−1}, t_{N−1}
        assert len(D.sigmas) == 2 * N - 1
        torch.testing.assert_close(torch.stack([s[0] for s in D.sigmas]), torch.tensor(expected_sigmas, dtype=f64),
                                   rtol=1e-12, atol=0)
        x = noise * t[0]                                                          # Alg. 1 l. 2
        for t_cur, t_next in zip(t, t[1:] + [0.0]):
            x_prev, x = x, paper.heun(ds.denoiser, x, t_cur, t_next)
        torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(got, ds.denoiser(x_prev, t[-1]), rtol=1e-11, atol=1e-12)


def test_edm_sampler_default_is_18_steps_and_35_calls():
    D = Recording(toy.gaussian().denoiser)
    edm.sample(edm.Config(), D, torch.randn(4, 2, dtype=f64))
    assert len(D.sigmas) == 35 and float(D.sigmas[0][0]) == 80.0 and float(D.sigmas[-1][0]) == 0.002


def test_addim_sampler_default_x_var_is_the_analytic_ten_percent_posterior_variance():
    """Alg. 3 with x_var = 0.1/(2 + SNR) (Sec. 3), SNR = 1/σ² in VE terms, on the cosine grid σ(k/N); N calls."""
    ds = toy.ring8()
    noise = torch.randn(32, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    for N in (1, 3, 6):
        D = Recording(ds.denoiser)
        got = addim.sample(addim.Config(), D, noise, num_steps=N)
        sig = [float(paper.vp_time_to_sigma(k / N)) for k in range(N, -1, -1)]
        x = noise * sig[0]
        for s_t, s_s in zip(sig, sig[1:]):
            x_var = 0.1 / (2 + 1 / s_t**2)                                           # Sec. 3
            x = paper.addim(ds.denoiser(x, s_t), x, s_t, s_s, x_var)               # Eq. 14
        assert len(D.sigmas) == N
        torch.testing.assert_close(torch.stack([s[0] for s in D.sigmas]), torch.tensor(sig[:-1], dtype=f64),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12)


def test_addim_sampler_refuses_an_x_var_of_the_wrong_length():
    try:
        addim.sample(addim.Config(), toy.ring8().denoiser, torch.randn(4, 2, dtype=f64), num_steps=4,
                     x_var=torch.zeros(3, dtype=f64))
    except ValueError as e:
        assert "one value per step (4)" in str(e)
    else:
        raise AssertionError("an x_var of 3 values for 4 steps was accepted")


# ---- CM's multistep sampler (Alg. 1) and its default τ's ---------------------------------------------------------

@pytest.mark.parametrize("nfe", [2, 3, 5])
def test_cd_default_taus_are_the_inner_levels_of_a_karras_grid_of_nfe_plus_1_levels(nfe):
    cfg = cd.Config(sigma_min=0.01, sigma_max=20.0, rho=5.0)
    expected = paper.karras_grid(nfe + 1, 0.01, 20.0, 5.0)[1:-1]
    got = cd.default_taus(cfg, nfe)
    assert len(got) == nfe - 1
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(got, expected))


def test_cd_default_tau_for_two_steps_is_2_52():
    assert math.isclose(cd.default_taus(cd.Config(), 2)[0], 2.5152, rel_tol=1e-4)   # EDM Eq. 5, N = 3, middle level
    assert cd.default_taus(cd.Config(), 1) == []


def test_cd_multistep_sampling_is_alg_1_at_the_default_taus():
    """x ← f(T z, T); for each τ: x ← f(x + sqrt(τ² − ε²) z_k, τ), with the z_k from the generator, NFE calls."""
    cfg = cd.Config(sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=0.6)
    noise = torch.randn(16, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    net = paper.Probe(2, seed=3)
    got = cd.sample(cfg, net, noise, nfe=4, generator=torch.Generator().manual_seed(1))
    assert len(net.calls) == 4
    f = lambda x_, t_: paper.cm_f(paper.Probe(2, seed=3), x_, t_, eps=0.01, sd=0.6)
    g = torch.Generator().manual_seed(1)
    x = f(20.0 * noise, 20.0)
    for tau in paper.karras_grid(5, 0.01, 20.0, 5.0)[1:-1]:
        x = f(x + math.sqrt(tau**2 - 0.01**2) * torch.randn(noise.shape, dtype=f64, generator=g), tau)
    torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="nfe=3 needs 2"):
        cd.sample(cfg, net, noise, nfe=3, taus=[1.0])


# ---- CTM's γ-sampler --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.3, 0.8])
def test_ctm_gamma_sampler_jumps_to_t_tilde_and_renoises_to_the_next_level(gamma):
    """For 0 < γ < 1, per step: x ← G(x, t_n, t̃) with t̃ = sqrt(1 − γ²)(t_{n+1} − σ_min) + σ_min (the official code's
    σ_min-shifted t̃), then, except after the last jump, x ← x + sqrt(t_{n+1}² − t̃²)·z; nfe network calls."""
    cfg = ctm.Config(gamma=gamma, sigma_min=0.01, sigma_max=20.0, rho=5.0, sigma_data=0.6)
    noise = torch.randn(16, 2, dtype=f64, generator=torch.Generator().manual_seed(0))
    net, path = paper.Probe(2, seed=4), []
    got = ctm.sample(cfg, net, noise, nfe=3, generator=torch.Generator().manual_seed(1), path=path)
    assert len(net.calls) == 3 and len(path) == 4
    t = paper.karras_grid(4, 0.01, 20.0, 5.0)
    g = torch.Generator().manual_seed(1)
    x = 20.0 * noise
    for n in range(3):
        t_tilde = math.sqrt(1 - gamma**2) * (t[n + 1] - 0.01) + 0.01
        x = paper.ctm_G(paper.Probe(2, seed=4), x, t[n], t_tilde, sd=0.6)
        if n < 2:
            x = x + math.sqrt(t[n + 1] ** 2 - t_tilde**2) * torch.randn(x.shape, dtype=f64, generator=g)
        torch.testing.assert_close(path[n + 1], x, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(got, x, rtol=1e-11, atol=1e-13)


def test_samplers_return_the_dtype_of_their_noise():
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))                      # float32
    D = lambda x_, s_, labels=None: toy.ring8().denoiser(x_, s_).to(x_.dtype)
    assert edm.sample(edm.Config(), D, noise, num_steps=3).dtype == torch.float32
    assert addim.sample(addim.Config(), D, noise, num_steps=3).dtype == torch.float32
    net = lambda x_in, c_noise, labels=None, noise_labels_s=None: torch.tanh(x_in)
    assert cd.sample(cd.Config(), net, noise, nfe=2).dtype == torch.float32
    assert ctm.sample(ctm.Config(gamma=0.5), net, noise, nfe=2).dtype == torch.float32
