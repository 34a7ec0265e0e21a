"""Lagrangian allocation of choices (tiers or drop) to items under a byte budget (SPEC §3).

Every item i takes argmin_t D[i, t] + λ·bytes[t]. For a fixed λ this is optimal for the
budget it happens to spend (Everett's theorem), so bisection on λ finds the largest
allocation that still fits. The items whose choice flips inside the final λ bracket are then
upgraded greedily, best distortion saved per byte first, while they fit: the budget is met
as exactly as the discrete choices allow, and never exceeded.

Shapes: D [G, M, C] (G independent budget groups, e.g. batch rows; M items; C choices; +inf
where a choice is not allowed), bytes [C], budget [G]. Items that are padding should allow
only a zero-byte choice with D = 0.
"""
from __future__ import annotations

import torch

BISECTION_STEPS = 64


class BudgetInfeasibleError(ValueError):
    """Even the cheapest allowed choice of every item exceeds the budget."""


def choose(D: torch.Tensor, cost: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """argmin_t D + λ·bytes per item; ties go to the lower choice index (deterministic)."""
    return torch.argmin(D + lam[:, None, None] * cost, dim=-1)


def spent(choice: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    return cost[choice].sum(-1)


def total_distortion(D: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    return torch.gather(D, -1, choice[..., None])[..., 0].sum(-1)


def allocate(D: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Choices [G, M] minimising Σ D subject to Σ bytes <= budget per group."""
    D = D.to(torch.float64)
    cost = cost.to(D)
    budget = budget.to(D)
    G, M, C = D.shape
    if M == 0:
        return torch.zeros(G, 0, dtype=torch.int64, device=D.device)
    allowed = torch.isfinite(D)
    if not bool(allowed.any(-1).all()):
        raise ValueError("an item has no allowed choice (every D is inf)")
    cheapest = torch.where(allowed, cost.expand_as(D), torch.full_like(D, float("inf"))).min(-1).values.sum(-1)
    if bool((cheapest > budget).any()):
        g = int(torch.nonzero(cheapest > budget)[0, 0])
        raise BudgetInfeasibleError(
            f"budget group {g}: the cheapest allowed choices need {int(cheapest[g])} bytes but the budget is "
            f"{int(budget[g])}; protected (exact) tokens alone exceed it: raise the budget or protect fewer tokens")
    lo = torch.zeros(G, dtype=D.dtype, device=D.device)
    first = choose(D, cost, lo)
    # λ large enough that every item takes its cheapest allowed choice
    finite_D = torch.where(allowed, D, torch.zeros_like(D))
    positive = cost[cost > 0]
    step = positive.min() if positive.numel() else torch.ones((), dtype=D.dtype)
    hi = torch.full((G,), float(finite_D.max() / step * 4 + 1), dtype=D.dtype, device=D.device)
    fits0 = spent(first, cost) <= budget
    hi = torch.where(fits0, lo, hi)  # groups that fit at λ = 0 are done
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        ok = spent(choose(D, cost, mid), cost) <= budget
        hi = torch.where(ok & ~fits0, mid, hi)
        lo = torch.where(ok | fits0, lo, mid)
    feasible = choose(D, cost, hi)
    richer = choose(D, cost, lo)
    return _fill(D, cost, budget, feasible, torch.where(fits0[:, None], feasible, richer))


def _fill(D, cost, budget, feasible, richer) -> torch.Tensor:
    """Upgrade items from `feasible` to `richer` (best saving per byte first) while they fit."""
    extra = cost[richer] - cost[feasible]
    gain = torch.gather(D, -1, feasible[..., None])[..., 0] - torch.gather(D, -1, richer[..., None])[..., 0]
    want = richer != feasible
    ratio = torch.where(want, gain / extra.clamp(min=1e-30), torch.full_like(gain, -float("inf")))
    order = torch.sort(ratio, dim=-1, descending=True, stable=True).indices
    extra_sorted = torch.gather(torch.where(want, extra, torch.zeros_like(extra)), -1, order)
    room = budget - spent(feasible, cost)
    take_sorted = torch.gather(want, -1, order) & (torch.cumsum(extra_sorted, -1) <= room[:, None])
    take = torch.zeros_like(want).scatter(-1, order, take_sorted)
    return torch.where(take, richer, feasible)
