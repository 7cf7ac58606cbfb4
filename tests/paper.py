"""The papers' formulas, written out for the tests, independently of the code under test.

Nothing here imports `algorithms/`: a test that compares the code with these lines compares it with the paper, so an
error in a helper of the code cannot cancel against itself. Float64 throughout.

EDM: Karras et al., arXiv:2206.00364v2. CM: Song et al., arXiv:2303.01469v2. CTM: Kim et al., arXiv:2310.02279v3.
aDDIM: Heek et al., arXiv:2403.06807v3.
"""
import math

import torch

f64 = torch.float64
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0                  # EDM Table 1


def col(v, x):
    """A per-example scalar (or a float) as a float64 column that broadcasts against x [B, d]."""
    v = torch.as_tensor(v, dtype=f64)
    return (v.expand(x.shape[0]) if v.ndim == 0 else v).reshape(-1, *([1] * (x.ndim - 1)))


def karras_grid(N, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """EDM Eq. 5, σ_0 = σ_max > … > σ_{N−1} = σ_min, as a Python list."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (N - 1) * (b - a)) ** rho for i in range(N)]


def edm_c(sigma, sd=SIGMA_DATA):
    """EDM Table 1: c_skip, c_out, c_in, c_noise."""
    sigma = torch.as_tensor(sigma, dtype=f64)
    return (sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2), 1 / torch.sqrt(sd**2 + sigma**2),
            torch.log(sigma) / 4)


def edm_lambda(sigma, sd=SIGMA_DATA):
    """EDM Table 1: λ(σ) = (σ² + σ_d²)/(σ·σ_d)²."""
    return (sigma**2 + sd**2) / (sigma * sd) ** 2


def edm_D(net, x, sigma, labels=None, sd=SIGMA_DATA):
    """EDM Eq. 7: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), σ a float or [B]."""
    sigma = torch.as_tensor(sigma, dtype=f64).expand(x.shape[0])
    c_skip, c_out, c_in, c_noise = edm_c(sigma, sd)
    return col(c_skip, x) * x + col(c_out, x) * net(col(c_in, x) * x, c_noise, labels)


def heun(D, x, t_cur, t_next, labels=None):
    """EDM Alg. 1 l. 4–8 for one step t_cur → t_next (floats); Euler only when t_next = 0 (l. 6)."""
    d_cur = (x - D(x, torch.full((x.shape[0],), t_cur, dtype=x.dtype), labels)) / t_cur
    x_next = x + (t_next - t_cur) * d_cur
    if t_next == 0:
        return x_next
    d_prime = (x_next - D(x_next, torch.full((x.shape[0],), t_next, dtype=x.dtype), labels)) / t_next
    return x + (t_next - t_cur) * (d_cur + d_prime) / 2


def heun_rows(D, x, t_cur, t_next):
    """`heun` with per-example times [B] (t_next > 0): EDM Alg. 1 l. 4–8, row by row."""
    return torch.cat([heun(D, x[i:i + 1], float(t_cur[i]), float(t_next[i])) for i in range(x.shape[0])])


def cm_scalings(t, eps=SIGMA_MIN, sd=SIGMA_DATA):
    """CM App. C: c_skip(t) = σ_d²/((t − ε)² + σ_d²), c_out(t) = σ_d (t − ε)/sqrt(σ_d² + t²)."""
    t = torch.as_tensor(t, dtype=f64)
    return sd**2 / ((t - eps) ** 2 + sd**2), sd * (t - eps) / torch.sqrt(sd**2 + t**2)


def cm_f(net, x, t, labels=None, eps=SIGMA_MIN, sd=SIGMA_DATA):
    """CM Sec. 3 / App. C: f(x, t) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t)) with EDM's c_in, c_noise."""
    t = torch.as_tensor(t, dtype=f64).expand(x.shape[0])
    c_skip, c_out = cm_scalings(t, eps, sd)
    _, _, c_in, c_noise = edm_c(t, sd)
    return col(c_skip, x) * x + col(c_out, x) * net(col(c_in, x) * x, c_noise, labels)


def ctm_g(net, x, t, s, labels=None, sd=SIGMA_DATA):
    """CTM's inner denoiser: g(x_t, t, s) = c_skip(t)·x_t + c_out(t)·NN(c_in(t)·x_t, c_noise(t), c_noise(s)), with
    EDM's Table 1 coefficients of t."""
    t = torch.as_tensor(t, dtype=f64).expand(x.shape[0])
    s = torch.as_tensor(s, dtype=f64).expand(x.shape[0])
    c_skip, c_out, c_in, c_noise = edm_c(t, sd)
    return col(c_skip, x) * x + col(c_out, x) * net(col(c_in, x) * x, c_noise, labels, noise_labels_s=torch.log(s) / 4)


def ctm_G(net, x, t, s, labels=None, sd=SIGMA_DATA):
    """CTM's jumper: G(x_t, t, s) = (s/t)·x_t + (1 − s/t)·g(x_t, t, s), g = c_skip(t)·x_t + c_out(t)·NN(c_in(t)·x_t,
    c_noise(t), c_noise(s)) with EDM's Table 1 coefficients of t."""
    t = torch.as_tensor(t, dtype=f64).expand(x.shape[0])
    s = torch.as_tensor(s, dtype=f64).expand(x.shape[0])
    return col(s / t, x) * x + col(1 - s / t, x) * ctm_g(net, x, t, s, labels, sd)


def ctm_draws(cfg, x, g):
    """The draws of the CTM loss in their documented order (algorithms/ctm.py, after the official code's default
    grid): k with P(k) ∝ k on {1..K_max}, n ~ U{0..N−1−k}, m ~ U{n+k..N−1}, then z [B, d]."""
    w = torch.arange(1, cfg.K_max + 1, dtype=f64)
    k = int(torch.multinomial(w / w.sum(), 1, generator=g)) + 1
    n = torch.randint(0, cfg.N - k, (x.shape[0],), generator=g)
    r = torch.rand(x.shape[0], dtype=f64, generator=g)
    m = n + k + (r * (cfg.N - n - k)).floor().long()
    return n, k, m, torch.randn(x.shape, dtype=f64, generator=g)


def ctm_soft_matching(cfg, net, net_ema, teacher, x, n, k, m, z):
    """Soft consistency matching written out: x_t = x + t z, x_u = Solver_φ(x_t, t → u) (k Heun steps), target
    G_θ⁻(G_sg(θ)(x_u, u, s), s, σ_min), estimate G_θ⁻(G_θ(x_t, t, s), s, σ_min), d = mean squared difference."""
    grid = torch.tensor(karras_grid(cfg.N, cfg.sigma_min, cfg.sigma_max, cfg.rho), dtype=f64)
    t, u, s = grid[n], grid[n + k], grid[m]
    x_t = x + t[:, None] * z
    x_u = x_t
    for j in range(k):
        x_u = heun_rows(teacher, x_u, grid[n + j], grid[n + j + 1])
    G = lambda net_, x_, t_, s_: ctm_G(net_, x_, t_, s_, sd=cfg.sigma_data)
    with torch.no_grad():
        x_target = G(net_ema, G(net, x_u, u, s), s, cfg.sigma_min)
    x_est = G(net_ema, G(net, x_t, t, s), s, cfg.sigma_min)
    return (x_est - x_target).square().mean(1)


def ddim(x_hat, x_t, sigma_t, sigma_s):
    """aDDIM paper Eq. 4 in the VE form x̂ + (σ_s/σ_t)(x_t − x̂)."""
    return x_hat + col(sigma_s / sigma_t, x_t) * (x_t - x_hat)


def inverse_ddim(x_s, x_t, sigma_t, sigma_s):
    """Eq. 5 in the VE form (x_s − r x_t)/(1 − r), r = σ_s/σ_t."""
    r = col(sigma_s / sigma_t, x_t)
    return (x_s - r * x_t) / (1 - r)


def addim(x_hat, x_t, sigma_t, sigma_s, x_var):
    """Eq. 14 in the VE form: x̂ + sqrt(σ_s² + (d/‖ε̂‖²)(1 − σ_s/σ_t)² x_var)·ε̂, ε̂ = (x_t − x̂)/σ_t."""
    d = x_t[0].numel()
    eps_hat = (x_t - x_hat) / col(sigma_t, x_t)
    n2 = eps_hat.flatten(1).square().sum(1)
    scale = torch.sqrt(sigma_s**2 + d / n2 * (1 - sigma_s / sigma_t) ** 2 * x_var)
    return x_hat + col(scale, x_t) * eps_hat


def vp_time_to_sigma(t, sigma_max=SIGMA_MAX):
    """The project's cosine schedule: σ(t) = tan(t·atan σ_max) (aDDIM App. A.1 with t rescaled)."""
    return torch.tan(torch.as_tensor(t, dtype=f64) * math.atan(sigma_max))


class Probe(torch.nn.Module):
    """A fixed smooth nonlinear 'network' F(x_in, c_noise, labels, noise_labels_s) in float64 that depends on every
    input, so that a wrong coefficient, a swapped σ or a dropped label changes its output. `calls` records what it
    was called with. `scale` is a trainable scalar multiplying the output (for gradient checks)."""

    def __init__(self, dim=2, seed=0, label_dim=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(dim, dim, dtype=f64, generator=g) / dim**0.5
        self.b, self.b_s = torch.randn(dim, dtype=f64, generator=g), torch.randn(dim, dtype=f64, generator=g)
        self.L = torch.randn(max(label_dim, 1), dim, dtype=f64, generator=g)
        self.scale = torch.nn.Parameter(torch.ones((), dtype=f64))
        self.calls = []

    def forward(self, x_in, c_noise, labels=None, noise_labels_s=None):
        self.calls.append((x_in.detach().clone(), c_noise.detach().clone(),
                           None if noise_labels_s is None else noise_labels_s.detach().clone()))
        h = x_in.to(f64) @ self.W + c_noise.to(f64)[:, None] * self.b
        if noise_labels_s is not None:
            h = h + noise_labels_s.to(f64)[:, None] ** 2 * self.b_s
        if labels is not None:
            h = h + labels.to(f64) @ self.L
        return (self.scale * torch.tanh(h) + 0.3 * x_in.to(f64)).to(x_in.dtype)
