"""The multiple-choice knapsack behind the co-design search: the exact optimum on random
instances (checked by brute force), every budget from one table, and the Pareto filter."""

import itertools

import numpy as np
import pytest

from lastbit.passes.knapsack import pareto_mask, solve_knapsack


def _brute_force(costs, weights, budget):
    best, best_pick = np.inf, None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        w = sum(weights[g][i] for g, i in enumerate(pick))
        c = sum(costs[g][i] for g, i in enumerate(pick))
        if w <= budget + 1e-9 and c < best:
            best, best_pick = c, pick
    return best, best_pick


@pytest.mark.parametrize("seed", range(6))
def test_the_dp_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(2, 5)
    costs = [rng.uniform(1, 10, rng.integers(2, 6)) for _ in range(groups)]
    weights = [rng.integers(0, 8, len(c)) * 0.25 for c in costs]  # multiples of the unit: exact
    budget = 2.0
    table = solve_knapsack(costs, weights, budget, bins=8)
    for b in (0.0, 0.5, 1.25, 2.0):
        expected, _ = _brute_force(costs, weights, b)
        pick = table.pick(b)
        if not np.isfinite(expected):
            assert pick is None
            continue
        assert sum(weights[g][i] for g, i in enumerate(pick)) <= b + 1e-9
        assert sum(costs[g][i] for g, i in enumerate(pick)) == pytest.approx(expected)


def test_rounding_up_never_breaks_the_budget():
    costs = [np.array([1.0, 5.0]), np.array([1.0, 5.0])]
    weights = [np.array([0.6, 0.0]), np.array([0.6, 0.0])]  # both cheap options together weigh 1.2 > 1
    pick = solve_knapsack(costs, weights, 1.0, bins=7).pick(1.0)
    assert sum(weights[g][i] for g, i in enumerate(pick)) <= 1.0 and sorted(pick) == [0, 1]


def test_pareto_mask_keeps_only_non_dominated_points():
    pts = np.array([[0, 5, 1], [1, 4, 1], [1, 5, 1], [2, 1, 9], [0, 5, 1]])
    assert pareto_mask(pts).tolist() == [True, True, False, True, True]
