"""The parameter averages: EDM's evaluation EMA with its half-life, and the consistency models' target network
θ⁻ ← stopgrad(μ·θ⁻ + (1 − μ)·θ) (Song et al., arXiv:2303.01469v2, Alg. 2; Kim et al., arXiv:2310.02279v3)."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from algorithms import edm
from networks.mlp import MLP

f64 = torch.float64


def mlp(seed):
    torch.manual_seed(seed)
    return MLP(hidden=8, num_blocks=1, emb=8).to(f64)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 100))
def test_ema_update_is_rate_times_average_plus_one_minus_rate_times_network(rate, seed):
    avg, net = mlp(seed), mlp(seed + 1)
    before = [p.detach().clone() for p in avg.parameters()]
    edm.ema_update_(avg, net, rate)
    for a0, a, p in zip(before, avg.parameters(), net.parameters()):
        torch.testing.assert_close(a, rate * a0 + (1 - rate) * p, rtol=1e-12, atol=1e-15)


def test_ema_update_with_rate_zero_copies_and_with_rate_one_keeps_exactly():
    """μ = 0 is CD's CIFAR-10 setting θ⁻ = sg(θ) (CM's code): the target must be the online weights bit for bit."""
    avg, net = mlp(0), mlp(1)
    keep = copy.deepcopy(avg)
    edm.ema_update_(avg, net, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(avg.parameters(), keep.parameters()))
    edm.ema_update_(avg, net, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(avg.parameters(), net.parameters()))


def test_ema_update_leaves_the_network_alone_and_records_no_gradient():
    avg, net = mlp(0), mlp(1)
    ref = copy.deepcopy(net)
    edm.ema_update_(avg, net, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))
    assert all(p.grad_fn is None and p.grad is None for p in avg.parameters())


def test_ema_update_refuses_networks_of_different_shape():
    with pytest.raises(ValueError, match="EMA over"):
        edm.ema_update_(MLP(hidden=8, num_blocks=1, emb=8), MLP(hidden=8, num_blocks=2, emb=8), 0.5)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 512), st.floats(1.0, 1e6))
def test_ema_beta_has_the_half_life_in_training_samples(batch, halflife):
    """β = 0.5^(batch/H): after H/batch steps the start has weight 1/2, i.e. β^(H/batch) = 1/2."""
    beta = edm.ema_beta(batch, halflife)
    assert 0 < beta < 1 or (beta == 0 and batch / halflife > 1000)
    assert abs(beta ** (halflife / batch) - 0.5) < 1e-9


def test_ema_beta_ramp_up_shortens_the_half_life_to_rampup_times_samples_seen():
    H, r, B = 500_000, 0.05, 64
    assert edm.ema_beta(B, H, seen=0, rampup=r) == 0.0                         # the first step copies the network
    assert edm.ema_beta(B, H, seen=100_000, rampup=r) == pytest.approx(0.5 ** (B / 5_000), rel=1e-13)
    assert edm.ema_beta(B, H, seen=10**8, rampup=r) == pytest.approx(0.5 ** (B / H), rel=1e-13)   # min(H, r·seen)
    assert edm.ema_beta(B, H, seen=100_000) == edm.ema_beta(B, H) == pytest.approx(0.5 ** (B / H), rel=1e-13)


def test_repeated_updates_towards_a_fixed_network_leave_beta_to_the_n_of_the_start():
    """n updates at rate β towards a fixed θ give β^n·a_0 + (1 − β^n)·θ (a geometric series); at n = H/batch the start
    keeps exactly half its weight."""
    avg, net, B, H = mlp(0), mlp(1), 50, 1000.0
    a0 = [p.detach().clone() for p in avg.parameters()]
    beta = edm.ema_beta(B, H)
    for _ in range(20):
        edm.ema_update_(avg, net, beta)
    for a, s, p in zip(avg.parameters(), a0, net.parameters()):
        torch.testing.assert_close(a, 0.5 * s + 0.5 * p, rtol=1e-10, atol=1e-13)
