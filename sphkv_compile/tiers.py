"""Precision tiers of the compressed KV store (SPEC §3).

A tier names how one token of one KV head is stored: `exact` keeps K and V in the KV dtype;
the others keep K as spherical codes and V in the chosen value codec. Every tier has a fixed
record size in 32-bit words, so a page of one tier is a plain [page_size, words] array.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .codec import SphericalCodec
from .radius import RADIUS_BITS
from .scalar_codec import RotatedScalarCodec

VALUE_CODECS = ("polar", "scalar")


@dataclass(frozen=True)
class TierSpec:
    name: str
    key_bits: float | None = None  # None: exact tier
    value_codec: str = "polar"
    value_bits: float | int | None = None
    radius_bits: int = 16

    @property
    def exact(self) -> bool:
        return self.key_bits is None

    def __post_init__(self):
        if self.exact:
            return
        if self.value_codec not in VALUE_CODECS:
            raise ValueError(f"tier {self.name!r}: value_codec must be one of {VALUE_CODECS}, got {self.value_codec!r}")
        if self.value_bits is None:
            raise ValueError(f"tier {self.name!r}: value_bits is required for a compressed tier")
        if self.radius_bits not in RADIUS_BITS:  # caught here, not at the first encode
            raise ValueError(f"tier {self.name!r}: radius_bits must be one of {RADIUS_BITS}, got {self.radius_bits!r}")

    def to_string(self) -> str:
        if self.exact:
            return f"{self.name}:exact"
        return f"{self.name}:k{self.key_bits}:{self.value_codec}{self.value_bits}:r{self.radius_bits}"

    @staticmethod
    def from_string(text: str) -> "TierSpec":
        try:
            parts = text.split(":")
            if parts[1] == "exact":
                return TierSpec(parts[0])
            name, kb, vc, rb = parts
            codec = next(c for c in VALUE_CODECS if vc.startswith(c))
            vbits = vc[len(codec):]
            fields = (name, float(kb[1:]), codec, float(vbits) if "." in vbits else int(vbits), int(rb[1:]))
        except (IndexError, ValueError, StopIteration) as err:
            raise ValueError(f"cannot parse tier spec {text!r}: expected 'name:exact' or "
                             f"'name:k<bits>:<polar|scalar><bits>:r<radius bits>'") from err
        return TierSpec(*fields)  # outside the try: a bad value's own message (e.g. radius_bits) stands


# The default ladder: drop is implicit (a token in no tier). Bits are per coordinate,
# everything stored counted; RDR may choose any of these per token and head.
DEFAULT_TIERS = (
    TierSpec("exact"),
    TierSpec("high", 6.0, "polar", 6.0),
    TierSpec("mid", 3.5, "polar", 3.5),
    TierSpec("low", 2.0, "polar", 2.0),
)


@lru_cache(maxsize=None)
def tier_codecs(spec: TierSpec, head_dim: int, seed: int):
    """(key codec, value codec) for a compressed tier; (None, None) for exact."""
    if spec.exact:
        return None, None
    key = SphericalCodec(head_dim, bits=float(spec.key_bits), seed=seed, radius_bits=spec.radius_bits)
    if spec.value_codec == "polar":
        value = SphericalCodec(head_dim, bits=float(spec.value_bits), seed=seed + 1, radius_bits=spec.radius_bits)
    else:
        value = RotatedScalarCodec(head_dim, bits=int(spec.value_bits), seed=seed + 1, radius_bits=spec.radius_bits)
    return key, value


def exact_words(head_dim: int, dtype: torch.dtype) -> int:
    """Words for one token's K (or V) kept raw in dtype."""
    nbytes = head_dim * torch.empty((), dtype=dtype).element_size()
    return -(-nbytes // 4)


def record_words(spec: TierSpec, head_dim: int, seed: int, kv_dtype: torch.dtype) -> tuple[int, int]:
    """(key words, value words) of one token of one KV head in this tier."""
    if spec.exact:
        w = exact_words(head_dim, kv_dtype)
        return w, w
    k, v = tier_codecs(spec, head_dim, seed)
    return k.words, v.words


def tiers_string(tiers) -> str:
    """A tier ladder as the custom ops take it: the specs' strings joined by ';'."""
    return ";".join(t.to_string() for t in tiers)


def tiers_arg(tiers, layout: str = "") -> str:
    """The ops' `tiers` argument: the specs, and a packed state's layout after '@'
    (packed_state.py)."""
    return tiers_string(tiers) + (f"@{layout}" if layout else "")
