"""Tier records back to K and V (float32, un-rotated) on the device: RDR's re-budget demotes
tokens between compressed tiers by decoding and re-encoding them, and in torch that decode is
~100 small ops per codec per call, each a kernel launch on a GPU. Here it is one launch of the
generated one-token-per-thread decoders (decode_codegen.py) plus one matmul per rotation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sphkv_compile.radius import LOG2_MIN
from sphkv_compile.tiers import TierSpec, tier_codecs

from .decode_codegen import decoder
from .host_math import cdiv
from .layout import DEVICE_TABLES, ScalarTables, Unsupported, rotation_matrices, tier_info

WARPS = 4


@triton.jit
def decode_records_kernel(rec_ptr, k_ptr, v_ptr, ktab_ptr, vtab_ptr, n,
                          WT: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, DECODE_K: tl.constexpr,
                          DECODE_K2: tl.constexpr, DECODE_V: tl.constexpr, DECODE_V2: tl.constexpr,
                          STEP: tl.constexpr, LOG2_MIN: tl.constexpr):
    """records [n, WT] int32 -> k, v [n, D] float32 in the codecs' rotated domain, each in two
    halves of D (the root's subtrees): a whole token's D floats in one thread spilled ~4.7 KB
    at D=128 in the sm_90 compile."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tok < n
    base = tok.to(tl.int64) * WT
    H: tl.constexpr = D // 2
    rows = tok.to(tl.int64)[:, None] * D + tl.arange(0, H)[None, :]
    k, radius = DECODE_K(rec_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)  # unit-radius halves
    tl.store(k_ptr + rows, k * radius[:, None], mask=valid[:, None])
    k = DECODE_K2(rec_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
    tl.store(k_ptr + H + rows, k * radius[:, None], mask=valid[:, None])
    v, radius = DECODE_V(rec_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
    tl.store(v_ptr + rows, v * radius[:, None], mask=valid[:, None])
    v = DECODE_V2(rec_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
    tl.store(v_ptr + H + rows, v * radius[:, None], mask=valid[:, None])


def decode_records(spec: TierSpec, records: torch.Tensor, head_dim: int, seed: int,
                   kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """records [..., W] of a compressed tier -> (k, v) float32 [..., head_dim], un-rotated, as
    rdr.convert.decode_kv(rotated=False). Raises layout.Unsupported where the kernels do not
    handle the codec (and for the exact tier, which needs no decoding)."""
    if spec.exact:
        raise Unsupported("the exact tier stores K and V as they are")
    info = tier_info(spec, head_dim, seed, kv_dtype)
    W = records.shape[-1]
    flat = records.reshape(-1, W).contiguous()
    n, device = flat.shape[0], flat.device
    k = torch.empty(n, head_dim, dtype=torch.float32, device=device)
    v = torch.empty_like(k)
    if n:
        scalar = isinstance(info.value, ScalarTables)
        block_t = 32 * WARPS  # one token per thread
        decode_records_kernel[(cdiv(n, block_t),)](
            flat, k, v, DEVICE_TABLES.get(info.key.trig_pairs, device),
            DEVICE_TABLES.get(info.value.unit_centroids if scalar else info.value.trig_pairs, device), n,
            WT=W, D=head_dim, BLOCK_T=block_t, DECODE_K=decoder(info.key, 0, W, None, 0),
            DECODE_K2=decoder(info.key, 0, W, None, 1), DECODE_V=decoder(info.value, info.key_words, W, None, 0),
            DECODE_V2=decoder(info.value, info.key_words, W, None, 1), STEP=info.key.radius_step,
            LOG2_MIN=LOG2_MIN, num_warps=WARPS)
    kc, vc = tier_codecs(spec, head_dim, seed)
    k = k @ DEVICE_TABLES.get(rotation_matrices(kc.hadamard)[1], device)
    v = v @ DEVICE_TABLES.get(rotation_matrices(vc.hadamard)[1], device)
    lead = records.shape[:-1]
    return k.reshape(*lead, head_dim), v.reshape(*lead, head_dim)
