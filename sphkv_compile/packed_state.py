"""One layer's store state packed into a single int32 tensor (the arena).

A compiled decode step takes every tensor the custom ops read as a graph input, and each input
costs host time on every call: dynamo guards it, dynamo's pre-graph code fetches it, AOT bumps
its version. A store of two tiers is twelve tensors (TierState.tensors() per tier); at 32 layers
that made sphkv's compiled call 1.0-1.9 ms slower per step than a dense static cache's
(benchmarks/e2e_host_split.py, session 31). Packed, a layer hands the ops one tensor: the arena,
with every tier's pool, utility, page table, count, free list and free-list top as views of it.

The ops find the views from the layout, which travels after the tier specs in the ops' `tiers`
string ("spec;spec@layout", tiers.tiers_arg). The layout names the batch, KV heads and page size,
then per tier its pages, record words and pages per KV head. Views are made once per arena and
layout and kept while the arena's store lives (a weak cache), so an eager op call pays a dict
lookup, not twelve view constructions.
"""
from __future__ import annotations

import math
import weakref

import torch

# every view starts on a 128-byte boundary: the kernels' vector loads and Triton's pointer
# alignment specialisation see the same alignment as a tensor of its own
ALIGN_WORDS = 32


class PackedStates(list):
    """The TierStates that view one arena (a list subclass, so the view cache can hold it weakly;
    the store that owns the arena holds it strongly)."""


_VIEWS: "weakref.WeakValueDictionary[tuple, PackedStates]" = weakref.WeakValueDictionary()


def layout_string(batch: int, kv_heads: int, page_size: int, tiers: list[tuple[int, int, int]]) -> str:
    """tiers: (pages, record words, pages per KV head) per tier."""
    return f"{batch},{kv_heads},{page_size}|" + "|".join(f"{p},{w},{m}" for p, w, m in tiers)


def parse_layout(layout: str) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    head, *tiers = layout.split("|")
    batch, kv_heads, page_size = (int(x) for x in head.split(","))
    return batch, kv_heads, page_size, [tuple(int(x) for x in t.split(",")) for t in tiers]


def alignment_bytes(tiers: int) -> int:
    """The most a packed store of this many tiers holds between its views (metadata, as the
    bounded-memory allowance counts it: rdr/capacity.py)."""
    return tiers * 6 * (ALIGN_WORDS - 1) * 4


def _words(numel: int, dtype: torch.dtype) -> int:
    return -(-numel * dtype.itemsize // 4)


def _aligned(words: int) -> int:
    return -(-words // ALIGN_WORDS) * ALIGN_WORDS


def _tier_parts(batch: int, kv_heads: int, page_size: int, pages: int, words: int, per_head: int,
                utility_dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The shapes and dtypes of one tier's tensors, in TierState.tensors() order."""
    return [((pages, page_size, words), torch.int32), ((pages, page_size), utility_dtype),
            ((batch, kv_heads, per_head), torch.int32), ((batch, kv_heads), torch.int32),
            ((pages,), torch.int32), ((1,), torch.int32)]


def arena_words(layout: str, utility_dtype: torch.dtype) -> int:
    batch, kv_heads, page_size, tiers = parse_layout(layout)
    total = 0
    for pages, words, per_head in tiers:
        for shape, dtype in _tier_parts(batch, kv_heads, page_size, pages, words, per_head, utility_dtype):
            total += _aligned(_words(math.prod(shape), dtype))
    return total


def make_views(arena: torch.Tensor, layout: str, utility_dtype: torch.dtype, tier_state) -> PackedStates:
    """The TierStates (built by tier_state(*tensors)) that view `arena` as `layout` says."""
    if arena.dtype != torch.int32 or arena.dim() != 1 or not arena.is_contiguous():
        raise ValueError(f"a packed store state is one contiguous 1-D int32 tensor, got {arena.dtype} "
                         f"{tuple(arena.shape)}")
    need = arena_words(layout, utility_dtype)
    if arena.numel() < need:
        raise ValueError(f"the packed store state holds {arena.numel()} words; its layout {layout!r} needs {need}")
    batch, kv_heads, page_size, tiers = parse_layout(layout)
    states, offset = PackedStates(), 0
    for pages, words, per_head in tiers:
        tensors = []
        for shape, dtype in _tier_parts(batch, kv_heads, page_size, pages, words, per_head, utility_dtype):
            n = _words(math.prod(shape), dtype)
            flat = arena[offset:offset + n]
            if dtype != torch.int32:
                flat = flat.view(dtype)[:math.prod(shape)]
            tensors.append(flat.view(shape))
            offset += _aligned(n)
        states.append(tier_state(*tensors))
    return states


def views_of(arena: torch.Tensor, layout: str, utility_dtype: torch.dtype, tier_state) -> list:
    """The arena's TierStates: cached while the store that packed it holds them (remember). The
    TierState objects are shared with that store, which never reassigns their fields."""
    key = (arena.device, arena.dtype, arena.data_ptr(), arena.numel(), layout)
    cached = _VIEWS.get(key)
    if cached is None:
        cached = make_views(arena, layout, utility_dtype, tier_state)
        _VIEWS[key] = cached
    return list(cached)


def remember(arena: torch.Tensor, layout: str, states: PackedStates) -> None:
    """Let the ops find these views of `arena` (the caller keeps `states` alive)."""
    _VIEWS[(arena.device, arena.dtype, arena.data_ptr(), arena.numel(), layout)] = states
