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


SIGMA2_CAP = 20.0  # logit noise variance beyond which a tier is useless anyway; keeps exp() finite


def softmax_error_gain(sigma2: torch.Tensor) -> torch.Tensor:
    """E(e^δ - 1)² for δ ~ N(0, σ²): the mean square change of a token's softmax weight, per unit
    of weight, when its logit is off by δ."""
    sigma2 = sigma2.clamp(max=SIGMA2_CAP)
    return torch.expm1(2 * sigma2) - 2 * torch.expm1(sigma2 / 2)


def distortion(table: ChoiceTable, utility: torch.Tensor, key_norm2: torch.Tensor, values: torch.Tensor | None,
               valid: torch.Tensor, key_gain: torch.Tensor | None = None,
               value_norm2: torch.Tensor | None = None) -> torch.Tensor:
    """D [B, H, n, C]: the expected squared attention-output error of each choice for each token,
    weighted by its utility u (its expected attention).

    Without key_gain (the error per unit norm): D = u·(ε_K r² + ε_V ‖v‖²), drop ε = 1.

    With key_gain [B, H] = s²·E‖q‖²/d (s the softmax scale; from the queries seen), a key error
    of power ε_K r² moves the token's logit by δ ~ N(0, σ²), σ² = ε_K r²·key_gain, and its
    weight by e^δ: the output moves by a·(e^δ - 1)·(v - o), E(e^δ - 1)² = e^{2σ²} - 2e^{σ²/2} + 1.
    A value error adds a·δv. Dropping the token moves the output by a·(o - v). With o
    estimated as the utility-weighted mean value of the head:
        tier: u·(g(σ²)·‖v - o‖² + ε_V‖v‖²)      drop: u·‖v - o‖²
    The key error then costs what it does to the softmax, which grows exponentially with the
    logit scale, instead of its share of the key's norm."""
    eps_k = torch.tensor(table.eps_k, dtype=torch.float32, device=utility.device)
    eps_v = torch.tensor(table.eps_v, dtype=torch.float32, device=utility.device)
    # values [B, H, n, d] are needed only with key_gain; without it ‖v‖² (value_norm2) will do
    v2 = value_norm2 if value_norm2 is not None else values.pow(2).sum(-1)
    u = utility[..., None]
    if key_gain is None:
        return u * (eps_k * key_norm2[..., None] + eps_v * v2[..., None])
    weight = (utility * valid).clamp(min=0)
    total = weight.sum(-1, keepdim=True)
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    weight = torch.where(total > 0, weight / total.clamp(min=1e-30), valid / count)  # no utility yet: plain mean
    mean_value = (weight[..., None] * values).sum(2, keepdim=True)
    dev2 = (values - mean_value).pow(2).sum(-1)[..., None]
    g = softmax_error_gain(eps_k * key_norm2[..., None] * key_gain.float()[:, :, None, None])
    D = u * (g * dev2 + eps_v * v2[..., None])
    D[..., table.drop_index] = (u * dev2)[..., 0]
    return D
