"""Properties of the Lagrangian allocation (sphkv_compile.rdr.allocate)."""
import itertools
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sphkv_compile.rdr.allocate import (BudgetInfeasibleError, allocate, allocate_capped, choose, counts, spent,
                                        total_distortion)


def random_instance(seed: int, groups: int, items: int, protected_frac: float = 0.2):
    """Distortions shaped like RDR's: u·ε(t)·norm², decreasing with bytes, drop most costly;
    some items may only be exact (protected)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.tensor([0.0, 0.001, 0.03, 0.25, 1.0], dtype=torch.float64)
    cost = torch.tensor([258.0, 98.0, 58.0, 34.0, 0.0], dtype=torch.float64)
    u = torch.rand(groups, items, generator=gen, dtype=torch.float64) ** 3
    norm2 = 1 + 20 * torch.rand(groups, items, generator=gen, dtype=torch.float64)
    D = u[..., None] * norm2[..., None] * eps
    prot = torch.rand(groups, items, generator=gen) < protected_frac
    D[prot] = torch.tensor([0.0] + [float("inf")] * 4, dtype=torch.float64)
    return D, cost


def brute_force_min(D: torch.Tensor, cost: torch.Tensor, budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(range(D.shape[-1]), repeat=D.shape[0]):
        c = torch.tensor(combo)
        if float(cost[c].sum()) <= budget:
            best = min(best, float(D[torch.arange(D.shape[0]), c].sum()))
    return best


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 3), items=st.integers(1, 300),
       fraction=st.floats(0.0, 1.2))
def test_budget_never_exceeded(seed, groups, items, fraction):
    D, cost = random_instance(seed, groups, items)
    floor = torch.where(torch.isfinite(D), cost.expand_as(D), torch.full_like(D, float("inf"))).min(-1).values.sum(-1)
    full = cost[0] * items
    budget = floor + fraction * (full - floor)
    choice = allocate(D, cost, budget)
    assert (spent(choice, cost) <= budget + 1e-9).all()
    assert torch.isfinite(total_distortion(D, choice)).all(), "an item took a choice it is not allowed"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), items=st.integers(1, 5), log_lambda=st.floats(-8, 0))
def test_equals_brute_force_at_lagrangian_budgets(seed, items, log_lambda):
    """Everett: the allocation argmin D + λ·bytes is optimal for the bytes it spends. Asking for
    exactly that budget must give the brute-force optimum (over all C^M assignments)."""
    D, cost = random_instance(seed, 1, items)
    lam = torch.tensor([10.0 ** log_lambda], dtype=torch.float64)
    budget = spent(choose(D, cost, lam), cost)
    got = float(total_distortion(D, allocate(D, cost, budget))[0])
    best = brute_force_min(D[0], cost, float(budget[0]))
    assert got == pytest.approx(best, rel=1e-9, abs=1e-15)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), items=st.integers(1, 5), fraction=st.floats(0.0, 1.0))
def test_never_better_than_brute_force_and_feasible(seed, items, fraction):
    """At any budget the result is feasible, hence no better than the true optimum, and it is
    at least as good as every Lagrangian point that fits."""
    D, cost = random_instance(seed, 1, items, protected_frac=0.0)
    budget = torch.tensor([fraction * float(cost[0]) * items], dtype=torch.float64)
    choice = allocate(D, cost, budget)
    got = float(total_distortion(D, choice)[0])
    assert float(spent(choice, cost)[0]) <= float(budget[0])
    assert got >= brute_force_min(D[0], cost, float(budget[0])) - 1e-12
    for log_lam in torch.linspace(-8, 2, 41):
        point = choose(D, cost, torch.tensor([10.0 ** float(log_lam)], dtype=torch.float64))
        if float(spent(point, cost)[0]) <= float(budget[0]):
            assert got <= float(total_distortion(D, point)[0]) + 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), items=st.integers(1, 200))
def test_deterministic(seed, items):
    D, cost = random_instance(seed, 2, items)
    budget = torch.full((2,), float(cost[1]) * items * 0.7, dtype=torch.float64)
    D2, _ = random_instance(seed, 2, items)
    try:
        a = allocate(D, cost, budget)
    except BudgetInfeasibleError as err:  # infeasible: the same refusal again
        with pytest.raises(BudgetInfeasibleError, match=re.escape(str(err))):
            allocate(D2, cost, budget)
        return
    assert torch.equal(a, allocate(D2, cost, budget))


def test_infeasible_budget_names_the_cause():
    D = torch.tensor([[[0.0, float("inf")], [0.0, float("inf")]]], dtype=torch.float64)
    with pytest.raises(BudgetInfeasibleError, match="protected"):
        allocate(D, torch.tensor([10.0, 0.0]), torch.tensor([15.0]))


# ---- capacities per choice (fixed page pools per tier) --------------------------------------
def brute_force_capped(D: torch.Tensor, cap: torch.Tensor) -> float:
    best = float("inf")
    for combo in itertools.product(range(D.shape[-1]), repeat=D.shape[0]):
        c = torch.tensor(combo)
        if (torch.bincount(c, minlength=D.shape[-1]).to(cap) <= cap).all():
            best = min(best, float(D[torch.arange(D.shape[0]), c].sum()))
    return best


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), items=st.integers(1, 5), caps=st.lists(st.integers(0, 5), min_size=4, max_size=4),
       fraction=st.sampled_from([0.0, 0.5]))
def test_capped_allocation_equals_brute_force(seed, items, caps, fraction):
    """With capacities that fit the budget, allocate_capped is the exact optimum over all C^M
    assignments within them (a transportation problem), or refuses when the protected items
    cannot fit. A fractional capacity holds its floor (counts are whole)."""
    D, cost = random_instance(seed, 1, items, protected_frac=0.2)
    cap = torch.tensor([[*(c + fraction for c in caps), float("inf")]], dtype=torch.float64)
    budget = (cap[:, :4] * cost[:4]).sum(-1)
    best = brute_force_capped(D[0], cap[0])
    if best == float("inf"):
        with pytest.raises(BudgetInfeasibleError):
            allocate_capped(D, cost, budget, cap)
        return
    choice = allocate_capped(D, cost, budget, cap)
    assert (counts(choice, 5) <= cap).all() and (spent(choice, cost) <= budget).all()
    assert float(total_distortion(D, choice)[0]) == pytest.approx(best, rel=1e-9, abs=1e-15)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 2), items=st.integers(1, 400))
def test_capped_allocation_respects_capacities_and_is_deterministic(seed, groups, items):
    D, cost = random_instance(seed, groups, items, protected_frac=0.05)
    gen = torch.Generator().manual_seed(seed)
    cap = torch.cat((torch.full((groups, 1), float(items)),
                     torch.randint(0, items + 1, (groups, 3), generator=gen).to(torch.float64),
                     torch.full((groups, 1), float("inf"))), 1).to(torch.float64)
    budget = (cap[:, :4] * cost[:4]).sum(-1)
    a = allocate_capped(D, cost, budget, cap)
    assert (counts(a, 5) <= cap).all() and torch.isfinite(total_distortion(D, a)).all()
    assert torch.equal(a, allocate_capped(*random_instance(seed, groups, items, protected_frac=0.05), budget, cap))


def test_capacities_must_fit_the_budget():
    D, cost = random_instance(0, 1, 3)
    with pytest.raises(ValueError, match="fit within the budget"):
        allocate_capped(D, cost, torch.tensor([10.0]), torch.tensor([[3.0, 3.0, 3.0, 3.0, float("inf")]]))
