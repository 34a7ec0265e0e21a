"""Budgets in bytes, and the up-front check that a budget can hold the protected tokens.

The option `budget` is a fraction of the dense 16-bit K+V bytes. For a bounded generation it
is taken of the cache's maximum length (max_cache_len): that fixes the bytes once, so the
check below can run when the model is compiled, not when the context fills up.
"""
from __future__ import annotations

import torch

from ..tiers import TierSpec
from .costs import choice_table

DENSE_BYTES_PER_ELEMENT = 2  # the reference: a 16-bit K+V cache


class RdrBudgetError(ValueError):
    """The byte budget cannot hold the tokens RDR must keep exact."""


def dense_bytes(tokens: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of a dense 16-bit K+V cache of one layer and one batch row."""
    return 2 * tokens * kv_heads * head_dim * DENSE_BYTES_PER_ELEMENT


def layer_budget_bytes(fraction: float, max_tokens: int, kv_heads: int, head_dim: int) -> int:
    """The per-layer, per-row byte budget for a fraction of dense KV at max_tokens."""
    return int(fraction * dense_bytes(max_tokens, kv_heads, head_dim))


def protected_bytes(specs: tuple[TierSpec, ...], kv_heads: int, head_dim: int, *, seed: int, kv_dtype: torch.dtype,
                    sink: int, recent: int, rebudget_every: int) -> int:
    """Bytes RDR needs per layer and row whatever the utilities: sinks, the recent window and the
    re-budget headroom (rebudget_every new tokens), all exact, for every KV head."""
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    return kv_heads * (sink + recent + rebudget_every) * table.exact_bytes


def check_budget(budget_bytes: int, specs, kv_heads: int, head_dim: int, *, seed: int, kv_dtype: torch.dtype,
                 sink: int, recent: int, rebudget_every: int, what: str = "the layer budget") -> None:
    need = protected_bytes(tuple(specs), kv_heads, head_dim, seed=seed, kv_dtype=kv_dtype, sink=sink, recent=recent,
                           rebudget_every=rebudget_every)
    if budget_bytes < need:
        table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
        raise RdrBudgetError(
            f"{what} is {budget_bytes} bytes per batch row, but RDR keeps sink={sink} + recent={recent} + "
            f"rebudget_every={rebudget_every} tokens exact in each of {kv_heads} KV heads at {table.exact_bytes} "
            f"bytes each = {need} bytes. Fix: raise the budget (or max_cache_len it is a fraction of), or lower "
            f"sink, recent or rebudget_every.")


def check_options(options, max_tokens: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Validate an SphkvOptions with policy 'rdr' for a cache of max_tokens; returns the per-layer,
    per-row budget in bytes. Call it when compiling (the shapes are known then)."""
    if options.budget is None:
        raise RdrBudgetError("policy 'rdr' needs a budget: set options budget=<fraction of dense KV>, e.g. 0.125")
    budget = layer_budget_bytes(options.budget, max_tokens, kv_heads, head_dim)
    check_budget(budget, options.tier_ladder, kv_heads, head_dim, seed=options.seed, kv_dtype=kv_dtype,
                 sink=options.sink, recent=options.recent, rebudget_every=options.rebudget_every,
                 what=f"budget={options.budget} of a {max_tokens}-token dense cache")
    return budget


def pool_pages(specs, budget_bytes: int, batch: int, kv_heads: int, head_dim: int, page_size: int, *, seed: int,
               kv_dtype: torch.dtype) -> list[tuple[int, int]]:
    """(num_pages, max_pages per head) for each tier's fixed pool so that no allocation within
    the budget can run out of pages: a tier could hold the whole budget, plus one partial page
    per (row, head)."""
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    sizes = []
    for t in range(len(specs)):
        tokens = budget_bytes // table.bytes[t]
        per_head = -(-tokens // page_size)
        sizes.append((batch * (-(-tokens // page_size) + kv_heads), per_head))
    return sizes
