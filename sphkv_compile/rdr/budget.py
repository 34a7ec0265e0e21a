"""Byte budgets: what the option `budget` means in bytes, and the one up-front check.

The option `budget` is a fraction of the dense 16-bit K+V bytes of one layer and batch row.

- A cache with a maximum length (a static cache, a preallocated buffer) gets a fixed budget:
  the fraction of a dense cache at that length. So memory is bounded for the whole
  generation, and `check_budget` can refuse an infeasible budget when the cache is built,
  not when the context fills up.
- A cache without one (DynamicCache, a cat cache) has no length to take the fraction of. Its
  budget grows with the tokens seen: fraction × dense(tokens) plus the bytes of the tokens the
  policy keeps exact whatever the length (`protected_bytes`), so it is never infeasible.

Budgets count token bytes (records + per-token utility, costs.tier_bytes). Page tables,
counts, free lists and the unused tail of each (row, head, tier)'s last page are the
documented metadata outside the budget (docs/FORMAT.md).
"""
from __future__ import annotations

import warnings

import torch

from ..options import SphkvPerformanceWarning
from ..tiers import TierSpec
from .capacity import guaranteed_tokens, tier_pages
from .costs import choice_table

DENSE_BYTES_PER_ELEMENT = 2  # the reference: a 16-bit K+V cache


class SphkvBudgetError(ValueError):
    """The byte budget cannot hold the tokens the policy must keep (or was exceeded)."""


RdrBudgetError = SphkvBudgetError  # the name the RDR tests and callers used first


def dense_bytes(tokens: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of a dense 16-bit K+V cache of one layer and one batch row."""
    return 2 * tokens * kv_heads * head_dim * DENSE_BYTES_PER_ELEMENT


def layer_budget_bytes(fraction: float, max_tokens: int, kv_heads: int, head_dim: int) -> int:
    """The per-layer, per-row byte budget for a fraction of dense KV at max_tokens."""
    return int(fraction * dense_bytes(max_tokens, kv_heads, head_dim))


def uniform_target_tier(options) -> int:
    """The tier the uniform policy encodes into: the compressed tier at `bits`, else the first."""
    ladder = options.tier_ladder
    compressed = [i for i, t in enumerate(ladder) if not t.exact]
    at_bits = [i for i in compressed if ladder[i].key_bits == float(options.bits)]
    return (at_bits or compressed)[0]


def protected_count(policy: str, sink: int, recent: int, rebudget_every: int) -> int:
    """Tokens per KV head the policy keeps exact whatever the budget: sinks and the recent
    window, and under RDR the re-budget headroom (rebudget_every new tokens arrive exact)."""
    return sink + recent + (rebudget_every if policy == "rdr" else 0)


def protected_tokens(options) -> int:
    return protected_count(options.policy, options.sink, options.recent, options.rebudget_every)


def protected_bytes(specs: tuple[TierSpec, ...], kv_heads: int, head_dim: int, *, seed: int, kv_dtype: torch.dtype,
                    sink: int, recent: int, rebudget_every: int) -> int:
    """Bytes RDR needs per layer and row whatever the utilities: sinks, the recent window and the
    re-budget headroom (rebudget_every new tokens), all exact, for every KV head."""
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    return kv_heads * (sink + recent + rebudget_every) * table.exact_bytes


def floor_bytes(options, kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    table = choice_table(tuple(options.tier_ladder), head_dim, options.seed, kv_dtype)
    return kv_heads * protected_tokens(options) * table.exact_bytes


def budget_for(fraction: float | None, tokens: int, max_tokens: int, kv_heads: int, head_dim: int,
               floor: int) -> int:
    """The layer's token-byte budget per batch row now (module docstring); 0 when there is none.
    tokens: seen so far, this chunk included (used only without max_tokens); floor: the
    protected tokens' bytes (floor_bytes)."""
    if not fraction or fraction <= 0:
        return 0
    if max_tokens:
        return layer_budget_bytes(fraction, max_tokens, kv_heads, head_dim)
    return layer_budget_bytes(fraction, tokens, kv_heads, head_dim) + floor


def budget_bytes(options, tokens: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
                 max_tokens: int | None) -> int:
    """budget_for with an SphkvOptions."""
    return budget_for(options.budget, tokens, max_tokens or 0, kv_heads, head_dim,
                      floor_bytes(options, kv_heads, head_dim, kv_dtype))


def check_budget(options, kv_heads: int, head_dim: int, kv_dtype: torch.dtype, max_tokens: int | None) -> int:
    """Refuse, when the cache is built, a budget the policy cannot keep; returns the fixed
    per-layer, per-row budget in bytes (0: none, or it grows with the tokens seen)."""
    o = options
    if o.budget is None:
        if o.policy == "rdr":
            raise SphkvBudgetError("policy 'rdr' needs a byte budget to allocate against. Fix: pass budget=<fraction "
                                   "of dense 16-bit KV bytes>, e.g. budget=0.125, or use policy='uniform'.")
        return 0
    table = choice_table(tuple(o.tier_ladder), head_dim, o.seed, kv_dtype)
    dense_token = dense_bytes(1, 1, head_dim)
    if o.policy == "uniform":
        t = uniform_target_tier(o)
        name, per_token = o.tier_ladder[t].name, table.bytes[t]
        if per_token > o.budget * dense_token:
            raise SphkvBudgetError(
                f"budget={o.budget} of dense KV is {o.budget * dense_token:.0f} bytes per token and KV head, but the "
                f"uniform policy stores every token beyond the sinks and recent window in tier {name!r} at "
                f"{per_token} bytes (record + utility). Fix: raise the budget, lower bits, or use policy='rdr' "
                f"(which drops or demotes tokens to fit).")
    if not max_tokens:
        return 0
    budget = layer_budget_bytes(o.budget, max_tokens, kv_heads, head_dim)
    protected = min(max_tokens, protected_tokens(o))
    if o.policy == "uniform":
        need = kv_heads * (protected * table.exact_bytes + (max_tokens - protected) * per_token)
        what = (f"{protected} exact sink/recent tokens ({table.exact_bytes} bytes each) plus "
                f"{max_tokens - protected} tokens in tier {name!r} ({per_token} bytes each)")
        fix = "raise the budget or max_cache_len, lower bits, or lower sink/recent"
    else:
        need = kv_heads * protected * table.exact_bytes
        what = (f"sink={o.sink} + recent={o.recent} + rebudget_every={o.rebudget_every} tokens exact "
                f"({table.exact_bytes} bytes each)")
        fix = "raise the budget (or the max_cache_len it is a fraction of), or lower sink, recent or rebudget_every"
    if need > budget:
        raise SphkvBudgetError(
            f"budget={o.budget} of a {max_tokens}-token dense cache is {budget} bytes per layer and batch row, but "
            f"policy {o.policy!r} must hold {what} in each of {kv_heads} KV heads = {need} bytes. Fix: {fix}.")
    return budget


def check_options(options, max_tokens: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """check_budget for a cache of max_tokens (kept for callers of the first RDR API)."""
    return check_budget(options, kv_heads, head_dim, kv_dtype, max_tokens)


def pool_pages(specs, budget_bytes: int, batch: int, kv_heads: int, head_dim: int, page_size: int, *, seed: int,
               kv_dtype: torch.dtype, protected: int | None = None, tokens: int | None = None,
               at_least: list[int] | None = None, distortion: str = "unit") -> list[tuple[int, int]]:
    """(num_pages, max_pages per head) of each tier's fixed pool: capacities that together hold
    the budget (rdr/capacity.py), plus one partly filled page per (row, head). protected: exact
    tokens per KV head (sink + recent + rebudget_every); without it the exact tier may take the
    whole budget and the pools hold up to about twice it (docs/FORMAT.md). tokens: per KV head,
    those the budget is a fraction of (they set the prior's bytes per token). at_least: pages per
    batch row each pool already has (growing pools never shrink). distortion: the option; the
    prior's tier shares follow it."""
    pages = tier_pages(specs, budget_bytes, kv_heads, head_dim, page_size, seed=seed, kv_dtype=kv_dtype,
                       protected=protected, tokens=tokens, at_least=at_least, distortion=distortion)
    return [(batch * p, max(1, -(-guaranteed_tokens(p, kv_heads, page_size) // page_size))) for p in pages]


# Tokens x KV heads per layer and batch row above which policy 'rdr' warns about its allocation:
# session 9 on the H200 (benchmarks/results/h200_session9_rebudget.log) took 60 ms at 98,304 and
# 145 ms at 264,192 (94 and 234 ms on that machine's CPU), per layer and row, every
# rebudget_every tokens; at this threshold roughly 30 ms (between the 24,576 and 98,304 points).
RDR_ALLOCATION_WARN_ITEMS = 65_536


def warn_if_allocation_is_long(options, kv_heads: int, max_tokens: int | None) -> None:
    """Policy 'rdr' re-allocates every token of a layer at each re-budget; at long contexts that
    dominates decoding. Say so when the cache is built, with the fix."""
    if options.policy != "rdr" or not max_tokens or max_tokens * kv_heads <= RDR_ALLOCATION_WARN_ITEMS:
        return
    warnings.warn(
        f"sphkv: policy 'rdr' re-allocates every token of a layer at each re-budget; at "
        f"max_cache_len={max_tokens} x {kv_heads} KV heads = {max_tokens * kv_heads} tokens per layer and batch "
        f"row its allocation alone takes tens of milliseconds or more per layer and row (60 ms at 98,304 and "
        f"145 ms at 264,192 on an H200; docs/PERFORMANCE.md), every rebudget_every={options.rebudget_every} "
        f"tokens. Fix: policy='uniform' for long contexts, or a larger rebudget_every.",
        SphkvPerformanceWarning, stacklevel=4)
