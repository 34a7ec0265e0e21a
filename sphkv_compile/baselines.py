"""KIVI-style asymmetric quantization (arXiv 2402.02750), a baseline for measurement only.

KIVI quantizes keys per channel (statistics over a group of G consecutive tokens, because
key outliers live in fixed channels) and values per token (statistics over a group of
channels of one token). Each group stores an fp16 scale and an fp16 zero point (its
minimum); an element is stored as round((x - zero) / scale) in b bits, decoded as
code * scale + zero.

Differences from the paper, all stated so the comparison stays honest:
  - every token is quantized, including the last partial key group (KIVI keeps up to
    G + R recent tokens in full precision; that is a retention choice, measured elsewhere);
  - bits_per_element counts the codes and every fp16 scale and zero actually stored, so a
    partial group costs as much metadata as a full one.
This is not a storage tier of the compressed store, just quantize + dequantize.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KIVI_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_FP16_MAX = torch.finfo(torch.float16).max
_METADATA_BITS = 16 + 16  # fp16 scale + fp16 zero point per group


@dataclass
class KiviCodes:
    """Quantized tensor. codes: int64 [..., T, d] in [0, 2^bits); scale/zero: fp16, one
    per group, laid out as [..., groups, d] (per-channel) or [..., T, groups] (per-token)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: str  # "channel" (keys) or "token" (values)
    group_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def stored_bits(self) -> int:
        """Bits of everything stored: codes plus fp16 scale and zero of every group."""
        return self.codes.numel() * self.bits + self.scale.numel() * _METADATA_BITS

    @property
    def bits_per_element(self) -> float:
        return self.stored_bits / max(1, self.codes.numel())


def kivi_bits_per_element(bits: int, group_size: int, axis: str, n_tokens: int, head_dim: int) -> float:
    """Stored bits per element of a [n_tokens, head_dim] tensor, without quantizing it."""
    _check_args(bits, group_size, axis)
    if axis == "channel":
        groups = -(-n_tokens // group_size) * head_dim
    else:
        groups = n_tokens * -(-head_dim // min(group_size, head_dim))
    return bits + groups * _METADATA_BITS / (n_tokens * head_dim)


def _check_args(bits: int, group_size: int, axis: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in KIVI_BITS:
        raise ValueError(f"KIVI bits must be an int in {KIVI_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if axis not in ("channel", "token"):
        raise ValueError(f"axis must be 'channel' (keys) or 'token' (values), got {axis!r}")


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """[..., n, m] -> [..., groups, group_size, m], zero-padded along n; returns the pad."""
    n = x.shape[-2]
    groups = -(-n // group_size)
    pad = groups * group_size - n
    if pad:
        # Pad with copies of the group's first row so the pad never moves min or max.
        first = x[..., (groups - 1) * group_size: (groups - 1) * group_size + 1, :]
        x = torch.cat([x, first.expand(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
    return x.reshape(*x.shape[:-2], groups, group_size, x.shape[-1]), pad


def kivi_quantize(x: torch.Tensor, bits: int, group_size: int = 32, axis: str = "channel") -> KiviCodes:
    """Asymmetric b-bit quantization of x [..., T, d].

    axis="channel": per channel over groups of group_size tokens (KIVI keys);
    axis="token":   per token over groups of group_size channels (KIVI values; a
                    group_size >= d gives one scale and zero per token)."""
    _check_args(bits, group_size, axis)
    if not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"KIVI quantizes a floating tensor [..., T, d], got {x.dtype} of shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("KIVI baseline: the input holds NaN or Inf; the fp16 scale and zero point "
                         "cannot represent it (the spherical codec's NaN behaviour is in docs/CODEC.md)")
    peak = x.detach().abs().max() if x.numel() else x.new_zeros(())
    if peak > _FP16_MAX:
        raise ValueError(f"KIVI stores fp16 scales and zero points; |x| reaches {peak.item():.3g} > {_FP16_MAX:.0f}. "
                         "Scale the input into fp16 range first.")
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    rows = work if axis == "channel" else work.transpose(-1, -2)
    grouped, pad = _grouped(rows, min(group_size, rows.shape[-2]))
    lo = grouped.amin(dim=-2)
    hi = grouped.amax(dim=-2)
    levels = (1 << bits) - 1
    # The stored fp16 scale and zero are what decoding sees, so quantize against them.
    zero = lo.to(torch.float16)
    scale = ((hi - zero.to(work.dtype)) / levels).to(torch.float16)
    z, s = zero.to(work.dtype).unsqueeze(-2), scale.to(work.dtype).unsqueeze(-2)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((grouped - z) / safe_s).clamp(0, levels)
    codes = torch.where(s > 0, codes, torch.zeros_like(codes)).to(torch.int64)
    codes = codes.reshape(*codes.shape[:-3], -1, codes.shape[-1])
    if pad:
        codes = codes[..., : codes.shape[-2] - pad, :]
    if axis == "token":
        codes = codes.transpose(-1, -2)
        scale, zero = scale.transpose(-1, -2), zero.transpose(-1, -2)
    return KiviCodes(codes.contiguous(), scale.contiguous(), zero.contiguous(), bits, axis,
                     min(group_size, rows.shape[-2]), x.dtype)


def kivi_dequantize(q: KiviCodes, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct [..., T, d] as code * scale + zero (computed in float32/float64)."""
    dtype = dtype or q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    codes = q.codes if q.axis == "channel" else q.codes.transpose(-1, -2)
    scale = q.scale if q.axis == "channel" else q.scale.transpose(-1, -2)
    zero = q.zero if q.axis == "channel" else q.zero.transpose(-1, -2)
    n = codes.shape[-2]
    # Group index of every row: row t belongs to group t // group_size.
    group_of_row = torch.arange(n, device=codes.device) // q.group_size
    s = scale.to(work)[..., group_of_row, :]
    z = zero.to(work)[..., group_of_row, :]
    out = codes.to(work) * s + z
    if q.axis == "token":
        out = out.transpose(-1, -2)
    return out.to(dtype).contiguous()


def kivi_keys(k: torch.Tensor, bits: int, group_size: int = 32) -> KiviCodes:
    """KIVI key quantization: per channel over groups of group_size tokens."""
    return kivi_quantize(k, bits, group_size, axis="channel")


def kivi_values(v: torch.Tensor, bits: int, group_size: int | None = None) -> KiviCodes:
    """KIVI value quantization: per token, over groups of group_size channels (default:
    the whole head dim, one scale and zero per token)."""
    return kivi_quantize(v, bits, group_size or v.shape[-1], axis="token")
