"""The uniform cache update of one decode step, on the device, with no host synchronisation.

placement.graduate (the reference) gathers the exact tier, re-encodes and rebuilds it on every
call: correct for any chunk, but some hundred small launches and several host reads per layer
and step, which made generate() host-bound (docs/PERFORMANCE.md). For the common case, one new
token per (batch row, KV head), the same result takes a few small launches and no host read:

1. the token at exact slot `sink` (the oldest one past the sinks, the one that graduates when
   the exact tier is full) is gathered and encoded into the target tier's records (the fused
   Triton encoder); with recent = 0 the new token itself is the one that graduates;
2. `place_kernel`, one program per (row, KV head): if the exact tier still has room the new
   token is appended to it; otherwise the graduating record is appended to the target tier and
   the exact tier's recent window moves down one slot (arrival order is kept, which RDR and the
   reference path rely on) to make room for the new token at its end.

Pages are taken from a tier's free stack with an atomic pop, so rows never wait on the host.
The kernel never writes outside a tier's pools: a row whose page table or pool is full is left
as it was (static caches are sized for max_cache_len, which generate() checks up front).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphkv_compile.store import TierState, encode_records as reference_encode_records, split_exact
from sphkv_compile.tiers import TierSpec

from .layout import Unsupported


@triton.jit
def _slot_base(pages_ptr, free_ptr, top_ptr, row, slot, max_pages, PS: tl.constexpr):
    """Word offset (in records) of `slot` of `row`, taking a page off the free stack when the
    slot opens a new one. Returns -1 when the page table or the pool is full."""
    j = slot // PS
    base = (slot * 0 - 1).to(tl.int64)
    if j < max_pages:
        page = tl.load(pages_ptr + row * max_pages + j)
        if page < 0:
            top = tl.atomic_add(top_ptr, -1)
            if top > 0:
                page = tl.load(free_ptr + top - 1)
                tl.store(pages_ptr + row * max_pages + j, page)
            else:
                tl.atomic_add(top_ptr, 1)  # give the count back: nothing was taken
        if page >= 0:
            base = page.to(tl.int64) * PS + slot % PS
    return base


@triton.jit
def _row_takes_a_token(valid_ptr, row, H, HAS_VALID: tl.constexpr):
    """Is program `row` (batch row · H + KV head) given a real token this step?"""
    ok = True
    if HAS_VALID:
        ok = tl.load(valid_ptr + row // H) != 0
    return ok


@triton.jit
def place_kernel(e_pool, e_util, e_pages, e_count, e_free, e_top,
                 c_pool, c_util, c_pages, c_count, c_free, c_top,
                 new_rec, new_util, grad_rec, valid_ptr, H, e_max_pages, c_max_pages,
                 SINK: tl.constexpr, RECENT: tl.constexpr, E_PS: tl.constexpr, C_PS: tl.constexpr,
                 WE: tl.constexpr, WE_PAD: tl.constexpr, WC: tl.constexpr, WC_PAD: tl.constexpr,
                 WIN_PAD: tl.constexpr, HAS_VALID: tl.constexpr):
    row = tl.program_id(0)
    if _row_takes_a_token(valid_ptr, row, H, HAS_VALID):
        ne = tl.load(e_count + row)
        we = tl.arange(0, WE_PAD)
        wc = tl.arange(0, WC_PAD)
        u_new = tl.load(new_util + row)
        if ne < SINK + RECENT:  # room in the exact tier: the new token joins it
            dst = _slot_base(e_pages, e_free, e_top, row, ne, e_max_pages, E_PS)
            if dst >= 0:
                tl.store(e_pool + dst * WE + we, tl.load(new_rec + row * WE + we, mask=we < WE), mask=we < WE)
                tl.store(e_util + dst, u_new.to(e_util.dtype.element_ty))
                tl.store(e_count + row, ne + 1)
        else:
            nc = tl.load(c_count + row)
            cdst = _slot_base(c_pages, c_free, c_top, row, nc, c_max_pages, C_PS)
            if cdst >= 0:
                if RECENT > 0:  # the token at slot SINK graduates; the window moves down one slot
                    g_page = tl.load(e_pages + row * e_max_pages + SINK // E_PS)
                    g_util = tl.load(e_util + g_page.to(tl.int64) * E_PS + SINK % E_PS)
                else:  # no recent window: the new token graduates at once
                    g_util = u_new.to(e_util.dtype.element_ty)
                tl.store(c_pool + cdst * WC + wc, tl.load(grad_rec + row * WC + wc, mask=wc < WC), mask=wc < WC)
                tl.store(c_util + cdst, g_util.to(c_util.dtype.element_ty))
                tl.store(c_count + row, nc + 1)
                if RECENT > 0:
                    slot = SINK + tl.arange(0, WIN_PAD)  # destination slots SINK .. ne-2
                    moving = slot < ne - 1
                    src_page = tl.load(e_pages + row * e_max_pages + (slot + 1) // E_PS, mask=moving, other=0)
                    dst_page = tl.load(e_pages + row * e_max_pages + slot // E_PS, mask=moving, other=0)
                    src = src_page.to(tl.int64) * E_PS + (slot + 1) % E_PS
                    dst = dst_page.to(tl.int64) * E_PS + slot % E_PS
                    m2 = moving[:, None] & (we < WE)[None, :]
                    recs = tl.load(e_pool + src[:, None] * WE + we[None, :], mask=m2)
                    utils = tl.load(e_util + src, mask=moving)
                    tl.debug_barrier()  # every slot read before any is overwritten
                    tl.store(e_pool + dst[:, None] * WE + we[None, :], recs, mask=m2)
                    tl.store(e_util + dst, utils, mask=moving)
                    last_page = tl.load(e_pages + row * e_max_pages + (ne - 1) // E_PS)
                    last = last_page.to(tl.int64) * E_PS + (ne - 1) % E_PS
                    tl.store(e_pool + last * WE + we, tl.load(new_rec + row * WE + we, mask=we < WE), mask=we < WE)
                    tl.store(e_util + last, u_new.to(e_util.dtype.element_ty))


def decode_update(states: list[TierState], specs: list[TierSpec], k: torch.Tensor, v: torch.Tensor,
                  valid: torch.Tensor | None, utility: torch.Tensor | None, *, seed: int, kv_dtype: torch.dtype,
                  sink: int, recent: int, target: int, encode=reference_encode_records) -> None:
    """placement.graduate for a one-token chunk k, v [B, Hkv, 1, d] (valid [B, 1]), in place.
    encode(spec, k, v, seed, kv_dtype) -> records: the Triton encoder on the GPU."""
    B, H, N, d = k.shape
    if N != 1:
        raise Unsupported(f"the device-side update takes one token per step, got {N}")
    exact = next(i for i, s in enumerate(specs) if s.exact)
    if specs[target].exact:
        raise ValueError("the graduation target must be a compressed tier")
    se, sc = states[exact], states[target]
    window = sink + recent
    new_rec = reference_encode_records(specs[exact], k, v, seed, kv_dtype).reshape(B * H, -1).contiguous()
    if recent:
        # (an exact tier smaller than the window never fills, and this gather is then unused)
        page = se.pages[:, :, min(sink // se.page_size, se.pages.shape[-1] - 1)].clamp(min=0).to(torch.int64)
        kg, vg = split_exact(se.pool[page, sink % se.page_size][:, :, None], d, kv_dtype)
    else:  # as the reference: the token is encoded from its exact (kv_dtype) values
        kg, vg = k.to(kv_dtype), v.to(kv_dtype)
    grad_rec = encode(specs[target], kg, vg, seed, kv_dtype).reshape(B * H, -1).contiguous()
    util = (torch.zeros(B * H, dtype=torch.float32, device=k.device) if utility is None
            else utility.reshape(B * H).to(torch.float32).contiguous())
    has_valid = valid is not None
    valid_i8 = valid.reshape(B).to(torch.int8).contiguous() if has_valid else util
    we, wc = new_rec.shape[-1], grad_rec.shape[-1]
    if we != se.pool.shape[-1] or wc != sc.pool.shape[-1]:
        raise ValueError(f"records of {we}/{wc} words for pools of {se.pool.shape[-1]}/{sc.pool.shape[-1]}")
    place_kernel[(B * H,)](
        se.pool, se.utility, se.pages, se.count, se.free, se.free_top,
        sc.pool, sc.utility, sc.pages, sc.count, sc.free, sc.free_top,
        new_rec, util, grad_rec, valid_i8, H, se.pages.shape[-1], sc.pages.shape[-1],
        SINK=sink, RECENT=recent, E_PS=se.page_size, C_PS=sc.page_size, WE=we, WE_PAD=triton.next_power_of_2(we),
        WC=wc, WC_PAD=triton.next_power_of_2(wc), WIN_PAD=triton.next_power_of_2(max(1, window)),
        HAS_VALID=has_valid, num_warps=4)


@triton.jit
def append_kernel(pool, util, pages, count, free, top, rec, new_util, valid_ptr, lost_ptr, H, max_pages,
                  PS: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr, HAS_VALID: tl.constexpr):
    """One token per (row, KV head) appended at the end of one tier; a row whose page table or
    pool is full keeps its tier as it was and adds one to *lost_ptr."""
    row = tl.program_id(0)
    if _row_takes_a_token(valid_ptr, row, H, HAS_VALID):
        n = tl.load(count + row)
        dst = _slot_base(pages, free, top, row, n, max_pages, PS)
        w = tl.arange(0, W_PAD)
        if dst >= 0:
            tl.store(pool + dst * W + w, tl.load(rec + row * W + w, mask=w < W), mask=w < W)
            tl.store(util + dst, tl.load(new_util + row).to(util.dtype.element_ty))
            tl.store(count + row, n + 1)
        else:
            tl.atomic_add(lost_ptr, 1)


def append_token(state: TierState, spec: TierSpec, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                 utility: torch.Tensor | None, lost: torch.Tensor, *, seed: int, kv_dtype: torch.dtype) -> None:
    """store.append_records for a one-token chunk k, v [B, Hkv, 1, d] (valid [B, 1]) on the
    device, with no host read: RDR's decode step between re-budgets. `lost` (an int64 tensor of
    one element) counts the tokens that found no room."""
    B, H, N, d = k.shape
    if N != 1:
        raise Unsupported(f"the device-side append takes one token per step, got {N}")
    rec = reference_encode_records(spec, k, v, seed, kv_dtype).reshape(B * H, -1).contiguous()
    if rec.shape[-1] != state.pool.shape[-1]:
        raise ValueError(f"records of {rec.shape[-1]} words for a pool of {state.pool.shape[-1]}")
    util = (torch.zeros(B * H, dtype=torch.float32, device=k.device) if utility is None
            else utility.reshape(B * H).to(torch.float32).contiguous())
    has_valid = valid is not None
    valid_i8 = valid.reshape(B).to(torch.int8).contiguous() if has_valid else util
    W = rec.shape[-1]
    append_kernel[(B * H,)](
        state.pool, state.utility, state.pages, state.count, state.free, state.free_top, rec, util, valid_i8, lost,
        H, state.pages.shape[-1], PS=state.page_size, W=W, W_PAD=triton.next_power_of_2(W), HAS_VALID=has_valid,
        num_warps=1)
