"""What each RDR choice costs: bytes per token per KV head, and distortion per unit norm.

The choices are the tiers of the ladder (in ladder order) followed by `drop`. Bytes are the
record (its 32-bit words × 4) plus the per-token utility the store keeps as metadata; a
dropped token costs nothing. Distortion per unit norm (ε_K, ε_V) is measured once per
(tier, head_dim, seed) by encoding Gaussian vectors with the tier's own codecs, so it always
matches the codec actually in use (including the radius quantization and word padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..store import UTILITY_DTYPE
from ..tiers import TierSpec, record_words, tier_codecs

# A dropped token loses its whole contribution: as if reconstructed by nothing, error 1 per unit norm.
DROP_EPSILON = 1.0
_MEASURE_VECTORS = 2048
_MEASURE_SEED = 1234  # fixed, so the measured table is identical in every process


def metadata_bytes_per_token() -> int:
    return torch.empty((), dtype=UTILITY_DTYPE).element_size()


def tier_bytes(spec: TierSpec, head_dim: int, seed: int, kv_dtype: torch.dtype) -> int:
    """Resident bytes of one token of one KV head in this tier (record + per-token metadata)."""
    kw, vw = record_words(spec, head_dim, seed, kv_dtype)
    return 4 * (kw + vw) + metadata_bytes_per_token()


@lru_cache(maxsize=None)
def measured_epsilon(spec: TierSpec, head_dim: int, seed: int) -> tuple[float, float]:
    """(ε_K, ε_V): mean squared reconstruction error over mean squared norm, for this tier's
    key and value codecs, measured on fixed Gaussian vectors. (0, 0) for the exact tier."""
    if spec.exact:
        return 0.0, 0.0
    gen = torch.Generator().manual_seed(_MEASURE_SEED)
    x = torch.randn(_MEASURE_VECTORS, head_dim, generator=gen, dtype=torch.float64)
    eps = []
    for codec in tier_codecs(spec, head_dim, seed):
        err = (codec.decode(codec.encode(x), torch.float64) - x).pow(2).sum(-1).mean()
        eps.append(float(err / x.pow(2).sum(-1).mean()))
    return eps[0], eps[1]


@dataclass(frozen=True)
class ChoiceTable:
    """Per choice (tiers in ladder order, then drop): bytes and (ε_K, ε_V)."""

    names: tuple[str, ...]
    bytes: tuple[int, ...]
    eps_k: tuple[float, ...]
    eps_v: tuple[float, ...]
    exact_index: int

    @property
    def drop_index(self) -> int:
        return len(self.names) - 1

    @property
    def exact_bytes(self) -> int:
        return self.bytes[self.exact_index]


@lru_cache(maxsize=None)
def choice_table(specs: tuple[TierSpec, ...], head_dim: int, seed: int, kv_dtype: torch.dtype) -> ChoiceTable:
    exact = [i for i, s in enumerate(specs) if s.exact]
    if len(exact) != 1:
        raise ValueError(f"the tier ladder needs exactly one exact tier, got {[s.name for s in specs]}")
    eps = [measured_epsilon(s, head_dim, seed) for s in specs]
    return ChoiceTable(
        names=tuple(s.name for s in specs) + ("drop",),
        bytes=tuple(tier_bytes(s, head_dim, seed, kv_dtype) for s in specs) + (0,),
        eps_k=tuple(e[0] for e in eps) + (DROP_EPSILON,),
        eps_v=tuple(e[1] for e in eps) + (DROP_EPSILON,),
        exact_index=exact[0],
    )
