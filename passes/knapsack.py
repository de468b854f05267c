"""Exact per-layer choice under a budget: a multiple-choice knapsack solved by dynamic
programming over a discretized budget (HAWQ-V3 poses the same problem as an integer program).

Each group (a layer, or layers whose costs depend on each other, e.g. a pruned conv and the
conv that reads its channels) picks exactly one option; an option has a cost to minimise
(latency, energy, bytes) and a weight that must stay within the budget (the predicted
accuracy drop). Weights are rounded *up* to budget/bins units, so every answer meets the
true budget; for weights that are multiples of the unit the answer is the exact optimum.
Plain numpy, no solver dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KnapsackTable", "pareto_mask", "solve_knapsack"]


@dataclass
class KnapsackTable:
    """The DP over every budget at once: ``best[b]`` is the least total cost with total weight
    ≤ b units; :meth:`pick` backtracks the options for any b."""

    unit: float  # budget per unit
    best: np.ndarray  # [bins + 1] least cost within b units (inf: infeasible)
    choice: list[np.ndarray]  # per group, [bins + 1] option taken at that group for budget b
    used: list[np.ndarray]  # per group, [bins + 1] units the remaining budget had before the group

    def pick(self, budget: float) -> list[int] | None:
        """The option of each group for a weight budget (None when nothing fits)."""
        b = min(len(self.best) - 1, int(math.floor(budget / self.unit + 1e-9))) if self.unit > 0 else len(self.best) - 1
        if b < 0 or not np.isfinite(self.best[b]):
            return None
        picks = []
        for group in range(len(self.choice) - 1, -1, -1):
            option = int(self.choice[group][b])
            picks.append(option)
            b = int(self.used[group][b])
        return picks[::-1]


def solve_knapsack(costs: list[np.ndarray], weights: list[np.ndarray], budget: float,
                   bins: int = 2000) -> KnapsackTable:
    """min Σ costs[g][i_g] s.t. Σ weights[g][i_g] ≤ budget, one option i_g per group.

    Negative weights count as 0 (an option that helps accuracy is not credited against others).
    """
    if len(costs) != len(weights) or not costs:
        raise ValueError(f"need one cost and one weight array per group, got {len(costs)} and {len(weights)}")
    unit = budget / bins if budget > 0 else 0.0
    best = np.full(bins + 1, np.inf)
    best[:] = 0.0  # no group yet: cost 0 at any budget
    choices, used = [], []
    for g, (cost, weight) in enumerate(zip(costs, weights)):
        cost = np.asarray(cost, dtype=np.float64)
        weight = np.maximum(np.asarray(weight, dtype=np.float64), 0.0)
        if cost.shape != weight.shape or cost.ndim != 1 or cost.size == 0:
            raise ValueError(f"group {g}: costs {cost.shape} and weights {weight.shape} must be equal, non-empty 1-D")
        if unit > 0:
            units = np.ceil(weight / unit - 1e-9).astype(np.int64)
        else:
            units = np.where(weight > 0, bins + 1, 0)
        new = np.full(bins + 1, np.inf)
        pick = np.zeros(bins + 1, dtype=np.int32)
        prev = np.zeros(bins + 1, dtype=np.int32)
        budgets = np.arange(bins + 1)
        for i in np.argsort(cost, kind="stable"):
            u = int(units[i])
            if u > bins or not np.isfinite(cost[i]):
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[u:] = best[: bins + 1 - u] + cost[i]
            better = candidate < new
            new[better], pick[better], prev[better] = candidate[better], i, (budgets - u)[better]
        best = new
        choices.append(pick)
        used.append(prev)
    return KnapsackTable(unit=unit if unit > 0 else 1.0, best=best, choice=choices, used=used)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Which rows of ``points`` ([n, k], every column minimised) no other row dominates."""
    points = np.asarray(points, dtype=np.float64)
    keep = np.ones(len(points), dtype=bool)
    for i, p in enumerate(points):
        dominated = np.all(points <= p, axis=1) & np.any(points < p, axis=1)
        keep[i] = not dominated.any()
    return keep
