"""Fixed per-tier pool capacities, so that the memory held is the budget (docs/FORMAT.md).

Each tier's pool is a fixed tensor (a graph input: its shape cannot follow the allocation
step by step). The pools are therefore sized once, from the budget, so that their records
together hold at most the budget; the allocation then respects each tier's capacity
(allocate_capped). Capacities are tokens per batch row (all KV heads of the row together):

- exact: the protected tokens (sinks, recent window and the re-budget headroom of every KV
  head) plus the exact tier's share of the rest;
- every tier's share of the rest of the budget comes from running the allocator once on a
  prior: log-normal utility·norm² (PRIOR_SIGMA), the ladder's measured ε, at the budget's
  bytes per unprotected token. On SmolLM2's real prefill utilities this prior reproduces the
  unconstrained allocation's byte shares per tier at budgets 1/4, 1/8 and 1/16.

A row of H heads whose tier holds n_h tokens per head uses Σ_h ceil(n_h / ps) pages, at most
(Σ n_h + H·(ps-1)) / ps. So a pool of P pages per row guarantees P·ps - H·(ps-1) tokens per
row however they spread over heads; capacities are chosen in those steps, and the pages held
are capacity + H·(ps-1) tokens per tier: the budget plus the documented page slack.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .. import packed_state
from .allocate import allocate
from . import meter as M
from .costs import choice_table, softmax_error_gain

PRIOR_SIGMA = 2.0  # log-normal spread of utility·norm²; fitted to SmolLM2 (docs/FORMAT.md)
# distortion='logit': key gain × r² (a token's logit variance per unit of relative key error),
# log-normal; median and spread measured on SmolLM2's prefill (docs/QUALITY.md)
PRIOR_LOGIT_MEDIAN = 15.0
PRIOR_LOGIT_SIGMA = 0.62
PRIOR_ITEMS = 2048
DEFAULT_FRACTION = 1 / 8  # the prior's bytes per token when the caller cannot say (dense·fraction)


@lru_cache(maxsize=256)
def prior_shares(specs: tuple, head_dim: int, seed: int, kv_dtype: torch.dtype,
                 bytes_per_token: float, distortion: str = "unit") -> tuple[float, ...]:
    """Per tier (ladder order): the share of the unprotected budget the allocator gives it
    on the prior, at `bytes_per_token` bytes per unprotected token and KV head, pricing errors
    as the option `distortion` does (costs.distortion, with unit norms and value deviations)."""
    table = choice_table(specs, head_dim, seed, kv_dtype)
    normal = torch.distributions.Normal(0.0, 1.0)
    q = (torch.arange(PRIOR_ITEMS, dtype=torch.float64) + 0.5) / PRIOR_ITEMS
    weight = torch.exp(PRIOR_SIGMA * normal.icdf(q))
    eps_k = torch.tensor(table.eps_k, dtype=torch.float64)
    eps_v = torch.tensor(table.eps_v, dtype=torch.float64)
    if distortion == "logit":
        # an independent log-normal logit scale per item (a fixed permutation decorrelates it)
        perm = torch.randperm(PRIOR_ITEMS, generator=torch.Generator().manual_seed(0))
        scale = PRIOR_LOGIT_MEDIAN * torch.exp(PRIOR_LOGIT_SIGMA * normal.icdf(q[perm]))
        per_unit = softmax_error_gain(eps_k * scale[:, None]) + eps_v
        per_unit[:, table.drop_index] = 1.0
    else:
        per_unit = ((eps_k + eps_v) / 2).expand(PRIOR_ITEMS, -1)
    cost = torch.tensor(table.bytes, dtype=torch.float64)
    budget = min(bytes_per_token, float(cost.max())) * PRIOR_ITEMS
    choice = allocate((weight[:, None] * per_unit)[None], cost, torch.tensor([budget]))[0]
    held = torch.bincount(choice, minlength=len(cost)).to(torch.float64) * cost
    return tuple(float(x) for x in (held / budget)[:-1])  # the last choice is drop


def guaranteed_tokens(pages_per_row: int, kv_heads: int, page_size: int) -> int:
    """Tokens per row a tier of pages_per_row pages holds however they spread over heads."""
    return max(0, pages_per_row * page_size - kv_heads * (page_size - 1))


def pages_for(tokens: int, kv_heads: int, page_size: int, round_up: bool) -> int:
    """Pages per row whose guaranteed tokens are the closest to `tokens` (>= if round_up)."""
    if tokens <= 0:
        return 0
    exact = (tokens + kv_heads * (page_size - 1)) / page_size
    return int(-(-exact // 1)) if round_up else int(exact)


def tier_pages(specs, budget_bytes: int, kv_heads: int, head_dim: int, page_size: int, *, seed: int,
               kv_dtype: torch.dtype, protected: int | None, tokens: int | None,
               at_least: list[int] | None = None, distortion: str = "unit") -> list[int]:
    """Pages per batch row of each tier's pool (module docstring). protected: exact tokens per
    KV head the policy needs (sink + recent + rebudget_every; None: unknown, then the exact
    tier may hold the whole budget). tokens: per KV head, those the budget is a fraction of
    (None: the prior takes DEFAULT_FRACTION of dense). at_least: pages per row already held
    (a growing pool never shrinks; the other tiers make room)."""
    specs = tuple(specs)
    table = choice_table(specs, head_dim, seed, kv_dtype)
    e, H = table.exact_index, kv_heads
    dense_token = 2 * head_dim * 2
    if protected is None:
        exact_tokens = budget_bytes // table.exact_bytes
        rest = budget_bytes
    else:
        exact_tokens = H * protected
        rest = budget_bytes - exact_tokens * table.exact_bytes
    # per token seen, not per unprotected one: then a budget that grows with the tokens (dynamic
    # caches) keeps the same prior shares, and every tier's capacity only grows
    unprotected = None if tokens is None or protected is None else H * max(1, tokens)
    per_token = rest / unprotected if unprotected else DEFAULT_FRACTION * dense_token
    shares = prior_shares(specs, head_dim, seed, kv_dtype, float(max(per_token, 0.0)), distortion)
    wanted = [max(0, int(rest * s // table.bytes[t])) for t, s in enumerate(shares)]
    pages = [pages_for(w, H, page_size, False) for w in wanted]
    pages[e] = pages_for(exact_tokens + (0 if protected is None else wanted[e]), H, page_size, True)
    if protected is None:  # the exact tier alone may take the budget: not bounded by it (docs)
        return pages
    floor = at_least or [0] * len(pages)
    pages = [max(p, f) for p, f in zip(pages, floor)]
    return _spend_rounding(pages, budget_bytes, table.bytes, [rest * x for x in shares], e, H, page_size, floor)


def _spend_rounding(pages, budget_bytes, nbytes, wanted_bytes, exact, kv_heads, page_size, floor) -> list[int]:
    """Capacities in whole pages (rounded down first): trim compressed tiers if the exact tier's
    rounding up overspent, then give the rest of the budget a page at a time to the tier
    furthest below the bytes the prior wants, while a page still fits."""
    held = lambda p: sum(guaranteed_tokens(n, kv_heads, page_size) * b for n, b in zip(p, nbytes))
    tier_held = lambda p, t: guaranteed_tokens(p[t], kv_heads, page_size) * nbytes[t]
    compressed = [t for t in range(len(pages)) if t != exact]
    for t in sorted(compressed, key=lambda t: wanted_bytes[t]):
        while held(pages) > budget_bytes and pages[t] > floor[t]:
            pages[t] -= 1
    while True:
        open_tiers = [t for t in compressed if held(pages[:t] + [pages[t] + 1] + pages[t + 1:]) <= budget_bytes]
        if not open_tiers:
            return pages
        pages[max(open_tiers, key=lambda t: (wanted_bytes[t] - tier_held(pages, t), -t))] += 1


def row_capacities(states) -> torch.Tensor:
    """[C] tokens per batch row each tier's pool guarantees (from its shape), drop unlimited."""
    B, H = states[0].count.shape
    caps = [guaranteed_tokens(s.pool.shape[0] // max(B, 1), H, s.page_size) for s in states]
    return torch.tensor(caps + [float("inf")], dtype=torch.float64)


def table_metadata_bytes(states) -> int:
    """The fixed metadata of the pools: page tables, counts, free stacks (no records, no utility)."""
    return sum(t.numel() * t.element_size() for s in states for t in (s.pages, s.count, s.free, s.free_top))


def metadata_allowance_bytes(specs, batch: int, kv_heads: int, head_dim: int, page_size: int, budget_bytes: int, *,
                             seed: int, kv_dtype: torch.dtype) -> int:
    """What a layer may hold beyond `batch` budgets (docs/FORMAT.md, bounded memory): the page
    slack (one partly filled page per row, head and tier) and, bounded from the budget, the
    free stacks (4 bytes per page), page tables (4 bytes per page and head), counts, stack
    tops, the budget meter (counts and key gains) and the cursor, a packed store's alignment
    between its views (packed_state.py), and the key mean (key_centering.py: one vector per
    row and KV head, at most float32)."""
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    slack = batch * kv_heads * (page_size - 1) * sum(table.bytes[:-1])
    tables = 0
    for nbytes in table.bytes[:-1]:
        per_head_pages = budget_bytes // (nbytes * page_size) + 1
        row_pages = (budget_bytes // nbytes + kv_heads * (page_size - 1)) // page_size + 1
        tables += 4 * (batch * row_pages + batch * kv_heads * per_head_pages + batch * kv_heads + 1)
    meter_and_cursor = 8 * (M.SIZE + batch + batch * kv_heads) + 8
    key_mean = 4 * batch * kv_heads * head_dim
    return slack + tables + meter_and_cursor + key_mean + packed_state.alignment_bytes(len(specs))
