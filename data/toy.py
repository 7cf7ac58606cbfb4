"""Small 2D datasets whose denoiser, and therefore whose teacher ODE, is known exactly.

Every dataset here is a mixture of isotropic Gaussians with a shared standard deviation `std`, which covers the
three cases a distillation test needs:

    a Gaussian N(μ, std²I)         K = 1
    a mixture of Gaussians         K > 1, std > 0       (e.g. 8 modes on a ring)
    a finite point set             std = 0              (e.g. a spiral: x_0 is uniform over the points)

Under the VE process x_σ = x_0 + σ·z (EDM Eq. 1–2), component k of the noisy marginal is N(μ_k, (std² + σ²)I), so

    p(k | x_σ)      = softmax_k( ln w_k − ‖x_σ − μ_k‖² / (2(std² + σ²)) )
    E[x_0 | x_σ, k] = μ_k + std²/(std² + σ²)·(x_σ − μ_k)                        (Gaussian conditioning)
    D(x_σ; σ)       = Σ_k p(k | x_σ)·E[x_0 | x_σ, k]                              (the exact denoiser)

For std = 0 this is the softmax-weighted mean of the points. `ode` integrates the PF-ODE dx/dσ = (x − D)/σ with
that denoiser to float64 accuracy; it is the ground truth that every student is measured against.
"""
import math

import torch


class GaussianMixture:
    """Mixture of K isotropic Gaussians N(μ_k, std²I) with weights w_k; `classes[k]` is component k's label."""

    def __init__(self, name, means, std, weights=None, classes=None):
        self.name = name
        self.means = torch.as_tensor(means, dtype=torch.float64)        # [K, d]
        self.std = float(std)
        K = self.means.shape[0]
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        self.log_w = (w / w.sum()).log().to(torch.float64)               # [K]
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)  # [K]
        self.label_dim = 0 if classes is None else int(self.classes.max()) + 1
        self.dim = self.means.shape[1]

    def sample(self, n, generator=None, dtype=torch.float64):
        """n true samples and their one-hot labels (None for an unlabelled dataset)."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        x = self.means[k] + self.std * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        labels = None if self.classes is None else one_hot(self.classes[k], self.label_dim, dtype)
        return x.to(dtype), labels

    def denoiser(self, x, sigma, labels=None):
        """The exact E[x_0 | x_σ = x] (module docstring); x is [B, d], sigma is [B] or a float. Labels, if given,
        restrict the posterior to the components of that class. Computed in float64."""
        x64 = x.to(torch.float64)
        means, log_w = self.means.to(x.device), self.log_w.to(x.device)
        var = column(sigma, x64) ** 2 + self.std**2                           # [B, 1]: std² + σ²
        # −‖x − μ_k‖²/2 = x·μ_k − ‖μ_k‖²/2 − ‖x‖²/2, and the last term is the same for every k: it cancels in the
        # softmax. (This form is also what forward-mode AD, used by Analytic-Precond, can differentiate.)
        logits = log_w + (x64 @ means.T - 0.5 * means.square().sum(1)) / var  # [B, K]
        if labels is not None:
            if self.classes is None:
                raise ValueError(f"dataset {self.name!r} has no classes, but class labels were given")
            # −inf outside the label's class
            logits = logits + labels.to(torch.float64)[:, self.classes.to(x.device)].log()
        p = logits.softmax(dim=1)                                             # [B, K]: p(k | x_σ)
        shrink = self.std**2 / var                                            # [B, 1]: std²/(std² + σ²)
        # Σ_k p_k·(μ_k + shrink·(x − μ_k)) = (1 − shrink)·Σ_k p_k μ_k + shrink·x
        return ((1 - shrink) * (p @ means) + shrink * x64).to(x.dtype)

    def nearest_component(self, x):
        """The component each sample [B, d] most likely came from, argmax_k ln w_k − ‖x − μ_k‖²/(2std²) (for a point
        set, std = 0: the nearest point): the mode that `metrics.paired_gap` compares. Returns indices [B]."""
        d2 = torch.cdist(x.to(torch.float64), self.means.to(x.device)).square()      # [B, K]
        return (-d2 if self.std == 0 else self.log_w.to(x.device) - d2 / (2 * self.std**2)).argmax(1)

    def ode(self, x, t, s, labels=None, steps_per_unit=20):
        """The exact teacher: the PF-ODE solution at σ = s started from x at σ = t (see `ode_solve`)."""
        return ode_solve(self.denoiser, x, t, s, labels, steps_per_unit)


def column(v, x):
    """A float or a per-example [B] tensor as [B, 1, ..., 1] in x's dtype, against x of shape [B, ...]."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))


def one_hot(k, n, dtype=torch.float32):
    return torch.nn.functional.one_hot(k, n).to(dtype)


@torch.no_grad()
def ode_solve(D, x, t, s, labels=None, steps_per_unit=20):
    """Reference solution of dx/dσ = (x − D(x; σ))/σ (EDM Eq. 1) from σ = t to σ = s > 0, in float64.

    Written in λ = ln σ the ODE is dx/dλ = x − D(x; e^λ): smooth and of order one over the whole range, so
    classical RK4 with `steps_per_unit` steps per unit of λ (212 steps from 80 to 0.002 at the default) is
    accurate to far below 1e-4 (checked by `tests/test_toy.py`). t and s may be floats or per-example [B]."""
    x = x.to(torch.float64)
    lam_t, lam_s = column(t, x).log(), column(s, x).log()                 # [B, 1, ...]
    if bool((lam_s > lam_t).any()):
        raise ValueError("ode_solve integrates towards smaller noise: every s must be <= t")
    n = max(1, math.ceil(float((lam_t - lam_s).abs().max()) * steps_per_unit))
    h = (lam_s - lam_t) / n                                               # [B, 1], per-example step in λ
    f = lambda x_, lam: x_ - D(x_, lam.exp().flatten(), labels).to(torch.float64)  # dx/dλ
    lam = lam_t
    for _ in range(n):                                                    # classical RK4
        k1 = f(x, lam)
        k2 = f(x + h / 2 * k1, lam + h / 2)
        k3 = f(x + h / 2 * k2, lam + h / 2)
        k4 = f(x + h * k3, lam + h)
        x, lam = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
    return x


def ring8(radius=1.0, std=0.08):
    """8 Gaussian modes on a circle, one class per mode (a classic 2D benchmark)."""
    a = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return GaussianMixture("ring8", radius * torch.stack([a.cos(), a.sin()], 1), std, classes=range(8))


def two_modes(offset=1.0, std=0.15):
    """Two modes, as in the 1-, 2- and 4-step trajectory picture of Heek et al. (Fig. 1)."""
    return GaussianMixture("two_modes", [[-offset, 0.0], [offset, 0.0]], std, classes=[0, 1])


def spiral(n=400, turns=2.5, scale=1.2):
    """A finite set of n points on an Archimedean spiral: the exact denoiser is a softmax over the points."""
    u = torch.linspace(0.1, 1.0, n, dtype=torch.float64)
    a = 2 * math.pi * turns * u
    return GaussianMixture("spiral", scale * u[:, None] * torch.stack([a.cos(), a.sin()], 1), 0.0)


def checkerboard(n_side=20, cells=4, scale=1.5):
    """A finite point set: a grid of n_side² points kept on the black cells of a cells×cells board."""
    g = (torch.arange(n_side, dtype=torch.float64) + 0.5) / n_side * 2 - 1          # in (−1, 1)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    cell = ((xy + 1) / 2 * cells).floor().long()
    return GaussianMixture("checkerboard", scale * xy[(cell.sum(1) % 2) == 0], 0.0)


def gaussian(std=0.5, dim=2):
    """N(0, std²I): the denoiser is linear and the PF-ODE has the closed form x·sqrt((s² + std²)/(t² + std²))."""
    return GaussianMixture("gaussian", torch.zeros(1, dim), std)


DATASETS = {"ring8": ring8, "two_modes": two_modes, "spiral": spiral, "checkerboard": checkerboard,
            "gaussian": gaussian}
