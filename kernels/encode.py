"""Host side of the fused encoder: K/V chunks -> tier records (the page write is store.append_records)."""
from __future__ import annotations

import torch

from sphkv_compile.store import TierState, encode_records as reference_encode_records
from sphkv_compile.tiers import TierSpec, tier_codecs

from .encode_kernels import encode_kv_kernel
from .host_math import cdiv, next_power_of_2
from .layout import (DEVICE_TABLES, ScalarTables, Unsupported, radius_round_offset, rotation_matrices, rotation_signs,
                     tier_info, under_interpreter)

# Launch settings: (tokens per program, warps, register cap or 0) per head-dim class and
# rotation path (True: 16-bit sign matrix, False: float32 matrix as tf32x3).
# H200 sweep, session 6 (benchmarks/sweep_encode.py; results/h200_sweep_encode_session6.*), one
# Llama-3-8B layer's K and V at 32k tokens with the sign-matrix rotation: 16 x 4 warps
# 0.972 ms, 8 x 4 1.104, 32 x 8 1.250, 16 x 8 with 128 registers 1.392, 16 x 8 1.737 (the
# tf32x3 rotation at 16 x 8: 2.669; at 16 x 4 it spills 448 bytes a thread, sm_90 compile).
# SmolLM2's layer (d=64): 32 x 4 0.101 ms, 16 x 4 0.122. Head dim 256 (not timed): the sm_90
# compile spills least at 16 x 8 (208 bytes; 16 x 4 and 8 x 4 spill over 1 KB).
ENCODE_LAUNCH = {("small", True): (32, 4, 0), ("small", False): (32, 4, 0),
                 ("large", True): (16, 4, 0), ("large", False): (16, 8, 0),
                 ("xlarge", True): (16, 8, 0), ("xlarge", False): (16, 8, 0)}
# decode_step: launches of at most max_tiles_per_row tiles per (batch, KV head) row (a decode
# step encodes one token per row: decode_update.py) are latency-bound, one program's chain of
# instructions: they take tiles of block_t tokens in programs of `warps` warps (or ENCODE_LAUNCH's,
# where that is more: timed at d=64 and 128 with 16-bit K/V only), and encode keys and values in
# separate programs (split_kv) or one. H200, session 30 (probe_decode_encode.py), per call in a
# graph, one program for both: 15.3 us at Llama-3-8B B=8 at 4 warps, 17.1 at 8, 23 at 16; counting
# every threshold instead of the binary search (timed, then removed) 16.1, 15.4 at 8 warps: the
# chain is the tile's shared-memory layout changes and arithmetic, not the search's dependent
# loads. Split, 4 warps: Llama B=1 14.9 -> 7.5 us, B=8 15.3 -> 7.8, B=106 58.4 -> 37.3, SmolLM2
# B=8 11.0 -> 6.1; the records are bit-identical to one program's.
ENCODE_DECODE_STEP = {"max_tiles_per_row": 1, "block_t": 16, "warps": 4, "split_kv": True}


def head_dim_class(head_dim: int) -> str:
    return "small" if head_dim < 128 else "large" if head_dim < 256 else "xlarge"


def _launch_shape(head_dim: int, signs: bool = True) -> tuple[int, int, int]:
    return ENCODE_LAUNCH[(head_dim_class(head_dim), signs)]


def encode_records(spec: TierSpec, k: torch.Tensor, v: torch.Tensor, seed: int, kv_dtype: torch.dtype) -> torch.Tensor:
    """k, v [B, Hkv, N, d] -> int32 records [B, Hkv, N, key words + value words]."""
    if spec.exact:
        return reference_encode_records(spec, k, v, seed, kv_dtype)  # a cast and a copy
    B, H, N, d = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    return _launch(spec, k, v, (B, H, N, d), strides, seed, kv_dtype)


def encode_exact_slot(spec: TierSpec, exact: TierState, slot: int, head_dim: int, seed: int,
                      kv_dtype: torch.dtype) -> torch.Tensor:
    """The token at `slot` of every (batch row, KV head) of an exact tier, encoded into `spec`'s
    records [B, Hkv, 1, words], read in place from the tier's pool (placement.graduate gathers it
    and encodes the copy: the same codes). A row whose page table has no page there reads page 0,
    as the gather it replaces did; its record is then unused."""
    if spec.exact:
        raise ValueError("the graduation target must be a compressed tier")
    B, H, max_pages = exact.pages.shape
    if not exact.pages.is_contiguous():
        raise Unsupported("an exact tier's page table that is not contiguous")
    elems = exact.pool.view(kv_dtype)  # [pages, page_size, 2 * half]: key elements, then value elements
    gather = (exact.pages, min(slot // exact.page_size, max_pages - 1), slot % exact.page_size, max_pages,
              exact.page_size, elems.shape[-1] // 2)
    return _launch(spec, elems, elems, (B, H, 1, head_dim), (0,) * 6, seed, kv_dtype, gather)


def _launch(spec: TierSpec, k: torch.Tensor, v: torch.Tensor, shape: tuple, strides: tuple, seed: int,
            kv_dtype: torch.dtype, gather: tuple | None = None) -> torch.Tensor:
    """encode_kv_kernel over `shape` (B, Hkv, N, d) tokens at k, v with element strides
    (k's b, h, n, v's b, h, n), or, with gather (pages, page column, slot in page, max pages,
    page size, half-record elements), one token per row read from an exact tier's pool."""
    B, H, N, d = shape
    info = tier_info(spec, d, seed, kv_dtype)
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"encode of {k.dtype} keys")
    kc, vc = tier_codecs(spec, d, seed)
    dev = k.device
    tab = lambda t: DEVICE_TABLES.get(t, dev)
    out = torch.empty(B, H, N, info.key_words + info.value_words, dtype=torch.int32, device=dev)
    if out.numel() == 0:
        return out
    key, val = info.key, info.value
    scalar = isinstance(val, ScalarTables)
    vthr = tab(val.thresholds)
    signs, kfwd, vfwd, kscale, vscale = _rotations(kc, vc, k.dtype, v.dtype)
    block_t, warps, maxnreg = _launch_shape(d, signs)
    step = ENCODE_DECODE_STEP
    few_tiles = cdiv(N, block_t) <= step["max_tiles_per_row"]
    if few_tiles:  # never fewer warps than the head dim's class takes (d=256 and float32 spill at 4)
        block_t, warps = step["block_t"], max(step["warps"], warps)
    pages, page_col, slot_in_page, max_pages, page_size, half = gather or (out, 0, 0, 0, 1, 1)
    split_kv = few_tiles and step["split_kv"]
    encode_kv_kernel[(B * H, cdiv(N, block_t), 2 if split_kv else 1)](
        k, v, out, tab(kfwd), tab(vfwd), kscale, vscale,
        tab(key.fields.comps), tab(key.thresholds), tab(val.fields.comps), vthr,
        N, H, *strides, pages, page_col, slot_in_page, max_pages,
        D=d, BLOCK_T=block_t, KW=info.key_words, VW=info.value_words,
        KWPAD=next_power_of_2(info.key_words), VWPAD=next_power_of_2(info.value_words),
        VALUE_SCALAR=scalar, K_LEVELS=key.levels, K_BITS=key.bits, K_COUNTS=key.fields.counts,
        K_MAXC=key.fields.max_comps, K_WIDTHS=key.fields.widths, K_TSIZE=key.table_size,
        V_LEVELS=0 if scalar else val.levels, V_BITS=val.bits, V_COUNTS=val.fields.counts,
        V_MAXC=val.fields.max_comps, V_WIDTHS=val.fields.widths, V_TSIZE=1 if scalar else val.table_size,
        STEP=key.radius_step, ROUND_OFFSET=radius_round_offset(16), SIGNS=signs,
        EMULATE_BF16_DOT=signs and k.dtype == torch.bfloat16 and under_interpreter(),
        FROM_EXACT=gather is not None, E_PS=page_size, HALF_E=half, SPLIT_KV=split_kv, num_warps=warps, num_stages=1,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return out


def _rotations(kc, vc, k_dtype: torch.dtype, v_dtype: torch.dtype):
    """(sign path?, key matrix, value matrix, key scale, value scale) for the kernel's rotation:
    16-bit sign matrices and their scales when both inputs are 16-bit of one dtype and both
    transforms are scaled sign matrices (power-of-two head dims), else the float32 matrices."""
    if k_dtype == v_dtype and k_dtype in (torch.bfloat16, torch.float16):
        ks, vs = rotation_signs(kc.hadamard, k_dtype), rotation_signs(vc.hadamard, v_dtype)
        if ks and vs:
            return True, ks[0], vs[0], ks[1], vs[1]
    return False, rotation_matrices(kc.hadamard)[0], rotation_matrices(vc.hadamard)[0], 1.0, 1.0
