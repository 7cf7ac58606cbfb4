"""The metrics of a generator's record: the paired teacher gap, the energy distance and its permutation test, and
`report`, checked against closed forms and brute-force pairwise sums written out here."""
import json
import math

import pytest
import torch

from data import metrics, toy


def brute_energy(x, y):
    """Székely–Rizzo's energy distance as the unbiased U-statistic, from every pairwise distance:
    2·mean_{i,j}‖x_i − y_j‖ − mean_{i≠i'}‖x_i − x_i'‖ − mean_{j≠j'}‖y_j − y_j'‖."""
    n, m = len(x), len(y)
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).sum() / (n * (n - 1))
            - torch.cdist(y, y).sum() / (m * (m - 1))).item()


def test_paired_gap_of_a_constant_shift_is_its_squared_length_per_dimension():
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = metrics.paired_gap(x + torch.tensor([3.0, 4.0], dtype=torch.float64), x)
    assert math.isclose(r["gap_mean"], 12.5) and math.isclose(r["gap_median"], 12.5)   # (9 + 16)/2
    assert r["gap_se"] < 1e-12                                                         # every sample has the same gap
    assert r["mode_switch_fraction"] is None and r["gap_mean_same_mode"] is None


def test_paired_gap_counts_mode_switches_and_separates_their_gap():
    # 10 pairs: 7 end in the same mode with gap 0, 3 cross from −1 to +1 (gap (2² + 0)/2 = 2 each).
    x_ref = torch.tensor([[-1.0, 0.0]] * 10, dtype=torch.float64)
    x = x_ref.clone()
    x[:3, 0] = 1.0
    r = metrics.paired_gap(x, x_ref, assign=lambda z: (z[:, 0] > 0).long())
    assert math.isclose(r["mode_switch_fraction"], 0.3)
    assert math.isclose(r["mode_switch_se"], math.sqrt(0.3 * 0.7 / 10))                # binomial standard error
    assert math.isclose(r["gap_mean"], 0.6) and r["gap_median"] == 0
    assert r["gap_mean_same_mode"] == 0
    # the standard error of the mean: sample std of {2, 2, 2, 0 × 7} over √10
    assert math.isclose(r["gap_se"], math.sqrt((3 * 1.4**2 + 7 * 0.6**2) / 9) / math.sqrt(10))


def test_energy_distance_of_two_point_masses_is_twice_their_distance():
    x, y = torch.zeros(5, 1, dtype=torch.float64), torch.full((7, 1), 1.5, dtype=torch.float64)
    assert math.isclose(metrics.energy_test(x, y, 0)["energy"], 3.0)                  # 2·1.5 − 0 − 0


def test_energy_distance_in_one_dimension_equals_the_pairwise_sum():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 1, generator=g, dtype=torch.float64), torch.randn(200, 1, generator=g, dtype=torch.float64)
    assert math.isclose(metrics.energy_test(x, y + 0.3, 0)["energy"], brute_energy(x, y + 0.3), rel_tol=1e-9)


def test_energy_distance_in_two_dimensions_is_within_the_quadrature_bound_of_the_pairwise_sum():
    # ‖z‖ = (π/2)·E_θ|θᵀz| for θ uniform on the half circle; with K evenly spaced angles the mean of |cos(φ_k − α)|
    # is off from 2/π by a relative ε_K (its worst case over α, written out here), so the projected statistic, a
    # signed sum of distances, is within ε_K·(the same sum with every sign positive) of the pairwise one.
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(150, 2, generator=g, dtype=torch.float64), torch.randn(120, 2, generator=g, dtype=torch.float64)
    y = y * 0.7 + torch.tensor([0.5, -0.2], dtype=torch.float64)
    K, n, m = 16, 150, 120
    phi = (torch.arange(K, dtype=torch.float64) + 0.5) * math.pi / K
    alpha = torch.linspace(0, math.pi, 2001, dtype=torch.float64)[:, None]
    eps_K = ((phi - alpha).cos().abs().mean(1) / (2 / math.pi) - 1).abs().max().item()
    total = (2 * torch.cdist(x, y).mean() + torch.cdist(x, x).sum() / (n * (n - 1))
             + torch.cdist(y, y).sum() / (m * (m - 1))).item()
    assert abs(metrics.energy_test(x, y, 0, num_projections=K)["energy"] - brute_energy(x, y)) <= eps_K * total
    assert eps_K * total < 0.1 * brute_energy(x, y)                                   # the bound is tight enough


def test_energy_permutation_p_value_is_uniform_under_the_null_and_small_under_a_shift():
    g = torch.Generator().manual_seed(3)
    p_null, p_shift = [], []
    for rep in range(300):
        x = torch.randn(40, 2, generator=g, dtype=torch.float64)
        y = torch.randn(40, 2, generator=g, dtype=torch.float64)
        p_null.append(metrics.energy_test(x, y, 99, num_projections=4, seed=rep)["energy_p"])
        if rep < 50:
            p_shift.append(metrics.energy_test(x, y + 1.0, 99, num_projections=4, seed=rep)["energy_p"])
    p = torch.tensor(sorted(p_null), dtype=torch.float64)
    # P(p ≤ k/100) = k/100 exactly: Kolmogorov–Smirnov against U(0, 1), critical value 1.63/√300 at the 1 % level,
    # plus the 1/100 the discrete p-values can step over.
    ecdf_hi = torch.arange(1, 301, dtype=torch.float64) / 300
    ks = torch.maximum(ecdf_hi - p, p - (ecdf_hi - 1 / 300)).max().item()
    assert ks < 1.63 / math.sqrt(300) + 0.01
    assert sum(q <= 0.05 for q in p_shift) >= 45                                       # a unit shift at n = 40


def test_nearest_component_of_each_ring_mode_is_that_mode():
    ds = toy.ring8()
    assert torch.equal(ds.nearest_component(ds.means * 1.05), torch.arange(8))
    pts = toy.spiral(n=50)                                                              # a point set: nearest point
    assert torch.equal(pts.nearest_component(pts.means + 1e-4), torch.arange(50))


def test_report_is_json_safe_and_says_what_it_did_not_compute():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_ode = torch.randn(64, 2, generator=g, dtype=torch.float64)
    r = metrics.report(x, x_ode, assign=lambda z: (z[:, 0] > 0).long(), num_permutations=19)
    assert json.loads(json.dumps(r)) == r
    assert r["n"] == 64 and 0 < r["energy_to_ode_p"] <= 1 and r["energy_to_ode_null_sd"] > 0
    assert r["sw2_to_data"] is None and r["energy_data_floor"] is None
    # the energy test pairs x's first half with x_ode's second: a copy of x_ode is not judged by its own pairs
    assert metrics.report(x_ode, x_ode, num_permutations=0)["energy_to_ode"] == metrics.energy_test(
        x_ode[:32], x_ode[32:], 0)["energy"]


def test_report_refuses_distances_to_data_from_too_few_samples_or_without_a_floor():
    x = torch.zeros(100, 2)
    with pytest.raises(ValueError, match="16384"):
        metrics.report(x, x, x_data=torch.zeros(20000, 2), x_data_fresh=torch.zeros(100, 2))
    with pytest.raises(ValueError, match="both x_data and x_data_fresh"):
        metrics.report(x, x, x_data=torch.zeros(20000, 2))
    with pytest.raises(ValueError, match="one shape"):
        metrics.report(x, x[:50])
