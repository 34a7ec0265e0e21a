"""Page compaction for retention: keep a subset of a tier's tokens, densely and in order.

compact(state, keep) leaves the tier holding exactly the tokens where keep [B, H, Nmax]
(slot order, as gather_tokens returns them) is True, in their old order, with their
utility. Each row reuses the prefix of its own page list; the pages it no longer needs go
back on the free stack. The records move in place: one program per row walks its slots in
order, and a kept token only ever moves to a slot at or before its own, so a tile's loads
(fenced by a barrier) always precede any store that could overwrite them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphkv_compile.store import TierState

from .host_math import next_power_of_2

BLOCK_T = 64


@triton.jit
def compact_rows_kernel(pool_ptr, util_ptr, pages_ptr, count_ptr, keep_ptr, rank_ptr, max_pages, nmax,
                        W: tl.constexpr, WPAD: tl.constexpr, PS: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    count = tl.load(count_ptr + row)
    w = tl.arange(0, WPAD)
    for t0 in range(0, count, BLOCK_T):
        slot = t0 + tl.arange(0, BLOCK_T)
        inside = slot < count
        keep = inside & (tl.load(keep_ptr + row * nmax + slot, mask=inside, other=0) != 0)
        src_page = tl.load(pages_ptr + row * max_pages + slot // PS, mask=inside, other=0)
        src = src_page.to(tl.int64) * PS + slot % PS
        rec = tl.load(pool_ptr + src[:, None] * W + w[None, :], mask=keep[:, None] & (w < W)[None, :])
        util = tl.load(util_ptr + src, mask=keep)
        dst_slot = tl.load(rank_ptr + row * nmax + slot, mask=keep, other=0)
        dst_page = tl.load(pages_ptr + row * max_pages + dst_slot // PS, mask=keep, other=0)
        dst = dst_page.to(tl.int64) * PS + dst_slot % PS
        tl.debug_barrier()  # every load of this tile before any store
        tl.store(pool_ptr + dst[:, None] * W + w[None, :], rec, mask=keep[:, None] & (w < W)[None, :])
        tl.store(util_ptr + dst, util, mask=keep)
        tl.debug_barrier()  # this tile's stores before the next tile's loads


def compact(state: TierState, keep: torch.Tensor) -> None:
    """Keep the tokens where keep [B, H, Nmax] is True (Nmax >= the largest count)."""
    B, H = state.count.shape
    ps = state.page_size
    nmax = keep.shape[-1]
    if keep.shape[:2] != (B, H):
        raise ValueError(f"keep has shape {tuple(keep.shape)}, the tier holds [B={B}, H={H}, ...]")
    slots = torch.arange(nmax, device=keep.device)
    keep = keep.to(torch.bool) & (slots < state.count[..., None])
    if nmax < (int(state.count.max()) if state.count.numel() else 0):
        raise ValueError(f"keep covers {nmax} slots but a row holds {int(state.count.max())} tokens")
    rank = (torch.cumsum(keep.to(torch.int32), -1) - 1).to(torch.int32)
    words = state.pool.shape[-1]
    if B * H and nmax:
        compact_rows_kernel[(B * H,)](state.pool, state.utility, state.pages, state.count,
                                      keep.to(torch.int8).contiguous(), rank.contiguous(), state.pages.shape[-1],
                                      nmax, W=words, WPAD=next_power_of_2(words), PS=ps, BLOCK_T=BLOCK_T)
    new_count = keep.sum(-1).to(torch.int32)
    old_pages = (state.count.to(torch.int64) + ps - 1) // ps
    new_pages = (new_count.to(torch.int64) + ps - 1) // ps
    idx = torch.arange(state.pages.shape[-1], device=keep.device)
    freed = (idx >= new_pages[..., None]) & (idx < old_pages[..., None])
    released = state.pages[freed]
    top = int(state.free_top[0])
    state.free[top:top + released.numel()] = released.flip(0)
    state.free_top.fill_(top + released.numel())
    state.pages.masked_fill_(freed, -1)
    state.count.copy_(new_count)
