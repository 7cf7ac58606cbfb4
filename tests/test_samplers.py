"""Samplers against their algorithms written out step by step (tests/paper.py): network-call counts, the σ's of every
call, the last step, and the branches the closed-form tests do not reach.

EDM: Karras et al., arXiv:2206.00364v2, Alg. 1. aDDIM: Heek et al., arXiv:2403.06807v3, Sec. 3, Alg. 3."""
import torch

import paper
from algorithms import addim, edm
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
