"""Host side of the fused encoder: K/V chunks -> tier records (the page write is store.append_records)."""
from __future__ import annotations

import torch
import triton

from sphkv_compile.store import encode_records as reference_encode_records
from sphkv_compile.tiers import TierSpec, tier_codecs

from .encode_kernels import encode_kv_kernel
from .layout import DEVICE_TABLES, ScalarTables, Unsupported, radius_round_offset, rotation_matrices, tier_info

def _launch_shape(head_dim: int) -> tuple[int, int]:
    """(tokens per program, warps): small tiles keep the polar transform's intermediates in
    registers (sm_90 compile: 32 tokens x d=128 spilled ~2 KB a thread; 16 x 8 warps ~80 B)."""
    return (16, 8) if head_dim >= 128 else (32, 4)


def encode_records(spec: TierSpec, k: torch.Tensor, v: torch.Tensor, seed: int, kv_dtype: torch.dtype) -> torch.Tensor:
    """k, v [B, Hkv, N, d] -> int32 records [B, Hkv, N, key words + value words]."""
    if spec.exact:
        return reference_encode_records(spec, k, v, seed, kv_dtype)  # a cast and a copy
    B, H, N, d = k.shape
    info = tier_info(spec, d, seed, kv_dtype)
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"encode of {k.dtype} keys")
    kc, vc = tier_codecs(spec, d, seed)
    dev = k.device
    tab = lambda t: DEVICE_TABLES.get(t, dev)
    out = torch.empty(B, H, N, info.key_words + info.value_words, dtype=torch.int32, device=dev)
    if out.numel() == 0:
        return out
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    key, val = info.key, info.value
    scalar = isinstance(val, ScalarTables)
    vthr = tab(val.thresholds)
    block_t, warps = _launch_shape(d)
    encode_kv_kernel[(B * H, triton.cdiv(N, block_t))](
        k, v, out, tab(rotation_matrices(kc.hadamard)[0]), tab(rotation_matrices(vc.hadamard)[0]),
        tab(key.fields.comps), tab(key.thresholds), tab(val.fields.comps), vthr,
        N, H, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=d, BLOCK_T=block_t, KW=info.key_words, VW=info.value_words,
        KWPAD=triton.next_power_of_2(info.key_words), VWPAD=triton.next_power_of_2(info.value_words),
        VALUE_SCALAR=scalar, K_LEVELS=key.levels, K_BITS=key.bits, K_COUNTS=key.fields.counts,
        K_MAXC=key.fields.max_comps, K_WIDTHS=key.fields.widths, K_TSIZE=key.table_size,
        V_LEVELS=0 if scalar else val.levels, V_BITS=val.bits, V_COUNTS=val.fields.counts,
        V_MAXC=val.fields.max_comps, V_WIDTHS=val.fields.widths, V_TSIZE=1 if scalar else val.table_size,
        STEP=key.radius_step, ROUND_OFFSET=radius_round_offset(16), num_warps=warps, num_stages=1)
    return out
