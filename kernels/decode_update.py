"""The uniform cache update of one decode step, on the device, with no host synchronisation.

placement.graduate (the reference) gathers the exact tier, re-encodes and rebuilds it on every
call: correct for any chunk, but some hundred small launches and several host reads per layer
and step, which made generate() host-bound (docs/PERFORMANCE.md). For the common case, one new
token per (batch row, KV head), the same result takes a few small launches and no host read:

1. the token at exact slot `sink` (the oldest one past the sinks, the one that graduates when
   the exact tier is full) is encoded into the target tier's records by the fused Triton
   encoder, which reads it in place from the exact tier's pool (encode.encode_exact_slot); with
   recent = 0 the new token itself is the one that graduates;
2. `place_kernel`, one program per (row, KV head): if the exact tier still has room the new
   token is appended to it; otherwise the graduating record is appended to the target tier and
   the exact tier's recent window moves down one slot (arrival order is kept, which RDR and the
   reference path rely on) to make room for the new token at its end. The new token's exact
   record is written from k and v themselves.

Two launches per layer and step. The update used to gather the graduating token, split it, build
the new token's record and zero a utility with torch ops, eight launches in all: with the
encoder's binary search (now a count, codes.search_thresholds) they took ~40 us of device time
per layer at Llama-3-8B B=8 (H200, session 30: benchmarks/profile_e2e_step.py).

Pages are taken from a tier's free stack with an atomic pop, so rows never wait on the host.
The kernel never writes outside a tier's pools: a row whose page table or pool is full is left
as it was (static caches are sized for max_cache_len, which generate() checks up front).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphkv_compile.store import TierState, encode_records as reference_encode_records
from sphkv_compile.tiers import TierSpec

from .encode import encode_exact_slot, encode_records
from .host_math import next_power_of_2
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
def _write_new_token(e_elems, slot, k_ptr, v_ptr, k_row, v_row, D: tl.constexpr, HALF_E: tl.constexpr,
                     HALF_PAD: tl.constexpr):
    """The new token's exact record at slot (in records) of the exact pool viewed as elements
    (k, v in the pool's dtype): its D key elements then D value elements, each half zero-padded
    to HALF_E."""
    j = tl.arange(0, HALF_PAD)
    kx = tl.load(k_ptr + k_row + j, mask=j < D, other=0.0)
    vx = tl.load(v_ptr + v_row + j, mask=j < D, other=0.0)
    base = slot * (2 * HALF_E)
    tl.store(e_elems + base + j, kx, mask=j < HALF_E)
    tl.store(e_elems + base + HALF_E + j, vx, mask=j < HALF_E)


@triton.jit
def place_kernel(e_pool, e_elems, e_util, e_pages, e_count, e_free, e_top,
                 c_pool, c_util, c_pages, c_count, c_free, c_top,
                 k_ptr, v_ptr, skb, skh, svb, svh, new_util, grad_rec, valid_ptr, H, e_max_pages, c_max_pages,
                 SINK: tl.constexpr, RECENT: tl.constexpr, E_PS: tl.constexpr, C_PS: tl.constexpr,
                 WE: tl.constexpr, WE_PAD: tl.constexpr, WC: tl.constexpr, WC_PAD: tl.constexpr,
                 WIN_PAD: tl.constexpr, HAS_VALID: tl.constexpr, HAS_UTIL: tl.constexpr, D: tl.constexpr,
                 HALF_E: tl.constexpr, HALF_PAD: tl.constexpr):
    """e_pool (int32 words) and e_elems (its element view) are the same exact pool; the new
    token's k, v row (b, h) starts at b·skb + h·skh (b·svb + h·svh); new_util [B·H] float32, or
    zero where not HAS_UTIL."""
    row = tl.program_id(0)
    if _row_takes_a_token(valid_ptr, row, H, HAS_VALID):
        ne = tl.load(e_count + row)
        we = tl.arange(0, WE_PAD)
        wc = tl.arange(0, WC_PAD)
        k_row = (row // H) * skb + (row % H) * skh
        v_row = (row // H) * svb + (row % H) * svh
        u_new = 0.0
        if HAS_UTIL:
            u_new = tl.load(new_util + row)
        if ne < SINK + RECENT:  # room in the exact tier: the new token joins it
            dst = _slot_base(e_pages, e_free, e_top, row, ne, e_max_pages, E_PS)
            if dst >= 0:
                _write_new_token(e_elems, dst, k_ptr, v_ptr, k_row, v_row, D, HALF_E, HALF_PAD)
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
                    _write_new_token(e_elems, last, k_ptr, v_ptr, k_row, v_row, D, HALF_E, HALF_PAD)
                    tl.store(e_util + last, u_new.to(e_util.dtype.element_ty))


def decode_update(states: list[TierState], specs: list[TierSpec], k: torch.Tensor, v: torch.Tensor,
                  valid: torch.Tensor | None, utility: torch.Tensor | None, *, seed: int, kv_dtype: torch.dtype,
                  sink: int, recent: int, target: int) -> None:
    """placement.graduate for a one-token chunk k, v [B, Hkv, 1, d] (valid [B, 1]), in place,
    with the Triton encoder (Unsupported where it refuses the codec: the caller falls back)."""
    B, H, N, d = k.shape
    if N != 1:
        raise Unsupported(f"the device-side update takes one token per step, got {N}")
    exact = next(i for i, s in enumerate(specs) if s.exact)
    if specs[target].exact:
        raise ValueError("the graduation target must be a compressed tier")
    se, sc = states[exact], states[target]
    window = sink + recent
    e_elems = se.pool.view(kv_dtype)
    half = e_elems.shape[-1] // 2
    if se.pool.shape[-1] != 2 * -(-d * kv_dtype.itemsize // 4):  # each half padded to whole words
        raise ValueError(f"exact records of {se.pool.shape[-1]} words for head dim {d} in {kv_dtype}")
    # cast on the host (a no-op for a cache in the model's dtype): Triton's interpreter truncates
    # float32 to bfloat16 where the GPU and the reference round to nearest even
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    if recent:  # the oldest token past the sinks, read where it lies
        grad_rec = encode_exact_slot(specs[target], se, sink, d, seed, kv_dtype)
    else:  # as the reference: the token is encoded from its exact (kv_dtype) values
        grad_rec = encode_records(specs[target], k, v, seed, kv_dtype)
    grad_rec = grad_rec.reshape(B * H, -1)
    wc = grad_rec.shape[-1]
    if wc != sc.pool.shape[-1]:
        raise ValueError(f"records of {wc} words for a pool of {sc.pool.shape[-1]}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    has_util = utility is not None
    util = utility.reshape(B * H).to(torch.float32).contiguous() if has_util else grad_rec
    has_valid = valid is not None
    valid_i8 = valid.reshape(B).to(torch.int8).contiguous() if has_valid else grad_rec
    we = se.pool.shape[-1]
    place_kernel[(B * H,)](
        se.pool, e_elems, se.utility, se.pages, se.count, se.free, se.free_top,
        sc.pool, sc.utility, sc.pages, sc.count, sc.free, sc.free_top,
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), util, grad_rec, valid_i8, H,
        se.pages.shape[-1], sc.pages.shape[-1],
        SINK=sink, RECENT=recent, E_PS=se.page_size, C_PS=sc.page_size, WE=we, WE_PAD=next_power_of_2(we),
        WC=wc, WC_PAD=next_power_of_2(wc), WIN_PAD=next_power_of_2(max(1, window)),
        HAS_VALID=has_valid, HAS_UTIL=has_util, D=d, HALF_E=half, HALF_PAD=next_power_of_2(half), num_warps=4)


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
        H, state.pages.shape[-1], PS=state.page_size, W=W, W_PAD=next_power_of_2(W), HAS_VALID=has_valid,
        num_warps=1)
