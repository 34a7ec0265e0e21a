"""Moving a token's record from one tier to another (demotion re-encodes; no promotion)."""
from __future__ import annotations

import torch

from ..store import device_decoder, device_encoder, encode_records, split_exact
from ..tiers import TierSpec, tier_codecs


def decode_kv(spec: TierSpec, records: torch.Tensor, head_dim: int, seed: int, kv_dtype: torch.dtype,
              rotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """records [..., W] -> (k, v) float32; in the codecs' rotated domain if `rotated` (compressed
    tiers only; the rotation is orthonormal, so norms are the same either way)."""
    if spec.exact:
        k, v = split_exact(records, head_dim, kv_dtype)
        return k.float(), v.float()
    kc, vc = tier_codecs(spec, head_dim, seed)
    k = kc.decode_rotated(records[..., :kc.words])
    v = vc.decode_rotated(records[..., kc.words:])
    if not rotated:
        k, v = kc.hadamard.inverse(k), vc.hadamard.inverse(v)
    return k, v


def decode_values(spec: TierSpec, records: torch.Tensor, head_dim: int, seed: int,
                  kv_dtype: torch.dtype) -> torch.Tensor:
    """The values of records [..., W] as float32, rotated like decode_kv(rotated=True); the keys
    are not decoded."""
    if spec.exact:
        return split_exact(records, head_dim, kv_dtype)[1].float()
    kc, vc = tier_codecs(spec, head_dim, seed)
    return vc.decode_rotated(records[..., kc.words:])


def norms2(spec: TierSpec, records: torch.Tensor, head_dim: int, seed: int,
           kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖k‖², ‖v‖²) float32 [...] of records [..., W] as decode_kv would decode them, without
    decoding polar records (their norm is the stored radius)."""
    if spec.exact:
        k, v = split_exact(records, head_dim, kv_dtype)
        return k.float().pow(2).sum(-1), v.float().pow(2).sum(-1)
    kc, vc = tier_codecs(spec, head_dim, seed)
    return kc.norm2(records[..., :kc.words]), vc.norm2(records[..., kc.words:])


def convert_records(src: TierSpec, dst: TierSpec, records: torch.Tensor, head_dim: int, seed: int,
                    kv_dtype: torch.dtype) -> torch.Tensor:
    if src == dst:
        return records
    if dst.exact:
        raise ValueError(f"cannot promote tokens from tier {src.name!r} to the exact tier: their exact values are gone")
    encode = device_encoder(records.device)  # the Triton encoder on CUDA: one launch, not ~250 small ops
    if src.exact:
        k, v = split_exact(records, head_dim, kv_dtype)
        return encode(dst, k, v, seed, kv_dtype)
    if encode is not encode_records:
        # a device encoder rotates its input itself: give it the decoded vectors un-rotated, in
        # the cache's dtype like every other token it encodes (its rounding is far below a code step)
        decode = device_decoder(records.device) or (lambda *a: decode_kv(*a, rotated=False))
        k, v = decode(src, records, head_dim, seed, kv_dtype)
        return encode(dst, k.to(kv_dtype), v.to(kv_dtype), seed, kv_dtype)
    # every compressed tier shares the seed, hence the rotation: re-encode in the rotated domain
    k, v = decode_kv(src, records, head_dim, seed, kv_dtype, rotated=True)
    kc, vc = tier_codecs(dst, head_dim, seed)
    return torch.cat((kc.encode_rotated(k), vc.encode_rotated(v)), -1)
