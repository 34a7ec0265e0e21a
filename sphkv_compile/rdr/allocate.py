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

import math

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
    step = positive.min() if positive.numel() else torch.ones((), dtype=D.dtype, device=D.device)
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


# ---- per-choice capacities (fixed page pools per tier) -------------------------------------
# A tier's pool holds a fixed number of tokens (its capacity), chosen when the pools are
# allocated so that the capacities together fit the byte budget (rdr/capacity.py). The
# allocation must then also respect, per group, count[t] <= capacity[t]. When the
# unconstrained Lagrangian allocation already does, it is returned unchanged (optimal). Else
# the budget is implied by the capacities and the problem is a transportation problem (items
# to choices with count limits), solved exactly: dual prices per choice by coordinate ascent
# give a near-optimal start, then negative cycles of moves between choices are cancelled
# until none is left (the optimality condition of a min-cost flow).
# The prices are only a start (_repair and _cancel_negative_cycles make the result optimal): on a
# real SmolLM2 prefill instance tiled to 264,192 items, 24 rounds took 1.07 s and 4 took 0.30 s on
# the sandbox CPU, to the same optimum (benchmarks/results/sandbox_session9_price_rounds.log).
PRICE_ROUNDS = 4


def counts(choice: torch.Tensor, num_choices: int) -> torch.Tensor:
    """[G, M] -> [G, C] items per choice."""
    out = torch.zeros(choice.shape[0], num_choices, dtype=torch.int64, device=choice.device)
    return out.scatter_add_(1, choice, torch.ones_like(choice))


def within_capacity(choice: torch.Tensor, capacity: torch.Tensor) -> bool:
    return bool((counts(choice, capacity.shape[-1]) <= capacity).all())


def allocate_capped(D: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """allocate() with at most capacity[g, t] items of choice t in group g (inf: no limit).
    The capacities of the choices that cost bytes must fit the budget (so it is implied)."""
    D = D.to(torch.float64)
    # item counts are whole: a fractional capacity holds its floor (inf stays inf)
    capacity = torch.floor(capacity.to(torch.float64)).expand(D.shape[0], D.shape[-1])
    priced = cost.to(torch.float64) > 0
    implied = torch.where(priced, capacity * cost.to(torch.float64), torch.zeros_like(capacity)).sum(-1)
    if bool((implied > budget.to(torch.float64) + 1e-6).any()):
        raise ValueError("the capacities of the choices that cost bytes must fit within the budget "
                         f"(they hold {implied.tolist()} bytes, budget {budget.tolist()})")
    if D.shape[1] == 0:
        return torch.zeros(D.shape[0], 0, dtype=torch.int64, device=D.device)
    return torch.stack([_transport(D[g], capacity[g]) for g in range(D.shape[0])])


def _transport(D: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """argmin Σ D[i, c_i] subject to count(c == t) <= cap[t]; D [M, C] (+inf: not allowed)."""
    prices = _dual_prices(D, cap)
    choice = torch.argmin(D + prices, dim=-1)
    choice = _repair(D, cap, choice)
    return _cancel_negative_cycles(D, cap, choice)


def _dual_prices(D: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Coordinate ascent on the dual: the price of a limited choice is set so that exactly as
    many items as it can hold prefer it strictly (the (cap+1)-th largest preference margin)."""
    M, C = D.shape
    prices = torch.zeros(C, dtype=D.dtype, device=D.device)
    limited = [t for t in range(C) if bool(torch.isfinite(cap[t])) and cap[t] < M]
    column = torch.arange(C, device=D.device)
    for _ in range(PRICE_ROUNDS):
        before = prices.clone()
        for t in limited:
            others = torch.where(column == t, float("inf"), D + prices).min(-1).values
            margin = others - D[:, t]  # how much item i prefers t over its best alternative
            k = int(cap[t])
            if int((margin > 0).sum()) <= k:
                prices[t] = 0.0
            else:  # the (k+1)-th largest margin is the (M-k)-th smallest (O(M), where topk sorts k+1)
                kth = torch.kthvalue(margin, M - k).values
                prices[t] = kth if bool(torch.isfinite(kth)) else prices[t]
        if torch.equal(before, prices):
            break
    return torch.where(torch.isfinite(prices), prices, torch.zeros_like(prices))


def _repair(D: torch.Tensor, cap: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Move items out of over-full choices (ties at the dual prices) to choices with room, least
    loss first, in whole-tensor rounds: each item of an over-full choice bids for its cheapest
    destination with room; bids are granted in increasing loss while the destination has room
    and moves are still needed. A round that leaves bids ungranted has filled a destination, so
    there are at most C rounds per over-full choice. The result is feasible, not yet optimal:
    _cancel_negative_cycles finishes the job."""
    C = D.shape[-1]
    choice = choice.clone()
    column = torch.arange(C, device=D.device)
    for t in range(C):
        n = torch.bincount(choice, minlength=C).to(D.dtype)
        if not float(n[t]) > float(cap[t]):
            continue
        need = math.ceil(float(n[t] - cap[t]))
        items = torch.nonzero(choice == t).flatten()
        loss = D[items] - D[items, t:t + 1]  # what moving an item of t to each other choice costs
        left = (cap - n).clamp(min=0)
        left[t] = 0
        while need > 0 and items.numel():
            best, dest = torch.where(left[None, :] > 0, loss, float("inf")).min(-1)
            order = torch.sort(best, stable=True).indices  # ties: item order
            dest_sorted = dest[order]
            rank = torch.cumsum(dest_sorted[:, None] == column, 0).gather(1, dest_sorted[:, None])[:, 0]
            granted = torch.isfinite(best[order]) & (rank <= left[dest_sorted])
            granted &= torch.cumsum(granted, 0) <= need
            if not bool(granted.any()):
                break
            moved = order[granted]
            choice[items[moved]] = dest[moved]
            left -= torch.bincount(dest[moved], minlength=C).to(left.dtype)
            need -= int(granted.sum())
            keep = torch.ones(items.numel(), dtype=torch.bool, device=D.device)
            keep[moved] = False
            items, loss = items[keep], loss[keep]
        if need > 0:
            n = torch.bincount(choice, minlength=C)
            raise BudgetInfeasibleError(
                f"choice {t} must hold {int(n[t])} items (they allow nothing else) but its capacity is "
                f"{int(cap[t])}: protected (exact) tokens alone exceed the exact tier's pool")
    return choice


def _cancel_negative_cycles(D: torch.Tensor, cap: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Improve a feasible assignment until no cycle of single-item moves between choices (through
    a spare slot when a choice has room) lowers Σ D: then it is optimal. A cycle found is applied
    again with each edge's next-best item while that still lowers Σ D (one Bellman-Ford per
    cycle, not per item moved)."""
    M, C = D.shape
    choice = choice.clone()
    scale = float(torch.where(torch.isfinite(D), D.abs(), torch.zeros_like(D)).max()) if M else 0.0
    tol = 1e-12 * (scale + 1e-300)
    for _ in range(4 * M * C + 16):
        here = D.gather(1, choice[:, None])[:, 0]
        delta = D - here[:, None]  # cost of moving item i to choice b
        best = torch.full((C, C), float("inf"), dtype=D.dtype, device=D.device)
        best.scatter_reduce_(0, choice[:, None].expand(M, C), delta, reduce="amin")
        n = torch.bincount(choice, minlength=C).to(D.dtype)
        cycle = _negative_cycle(best, n < cap, n > 0, tol)
        if not cycle:
            return choice
        movers = [_movers_in_order(choice, delta, a, b) for a, b in cycle]  # picked before any move
        repeats = min(len(items) for items, _ in movers)
        for gainer in {b for _, b in cycle} - {a for a, _ in cycle}:  # through the spare slot: one more per repeat
            if math.isfinite(float(cap[gainer])):
                repeats = min(repeats, math.ceil(float(cap[gainer] - n[gainer])))
        gains = torch.stack([d[:repeats] for _, d in movers]).sum(0)
        repeats = max(1, int((gains < -tol).sum()))  # gains rise with the repeat: a prefix is negative
        for (items, _), (_, b) in zip(movers, cycle):  # each source appears once: distinct items
            choice[items[:repeats]] = b
    raise RuntimeError("capacity allocation did not converge (please report)")


def _movers_in_order(choice: torch.Tensor, delta: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The items of choice a, cheapest move to b first (ties: item order), and their costs."""
    items = torch.nonzero(choice == a).flatten()
    costs, order = torch.sort(delta[items, b], stable=True)
    return items[order], costs


def _negative_cycle(weight: torch.Tensor, has_room: torch.Tensor, nonempty: torch.Tensor, tol: float):
    """Bellman-Ford on the choices plus a spare-slot node S (b -> S if b has room, S -> a if a has
    items, both free). Returns the cycle's item moves [(a, b), ...] or None."""
    C = weight.shape[0]
    w = weight.tolist()
    S = C
    edges = [(a, b, w[a][b]) for a in range(C) for b in range(C) if a != b and w[a][b] != float("inf")]
    edges += [(b, S, 0.0) for b in range(C) if bool(has_room[b])]
    edges += [(S, a, 0.0) for a in range(C) if bool(nonempty[a])]
    dist, pred = [0.0] * (C + 1), [-1] * (C + 1)
    last = -1
    for _ in range(C + 1):
        last = -1
        for a, b, x in edges:
            if dist[a] + x < dist[b] - tol:
                dist[b], pred[b], last = dist[a] + x, a, b
        if last < 0:
            return None
    node = last
    for _ in range(C + 1):  # step back into the cycle
        node = pred[node]
    cycle, cur = [], node
    while True:
        prev = pred[cur]
        cycle.append((prev, cur))
        cur = prev
        if cur == node:
            break
    return [(a, b) for a, b in reversed(cycle) if a != S and b != S]
