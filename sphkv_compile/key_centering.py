"""Keys are stored centered: k - μ, with μ the mean key of each batch row and KV head over its
first prompt (the sink tokens left out). Every key of a row and head moves by the same μ, so
every logit of a query moves by the same q·μ, which softmax cannot see: attention is unchanged
for any μ. What changes is the codec's error. The radius is exact and the angles carry a
relative error, so a key's error scales with the norm it is coded at; real keys carry a large
common mean (SmolLM2: 0.58 of ‖k‖², where RoPE leaves the slow dimensions' mean in place), and
coding k - μ cuts the attention-output error to 0.63-0.73 of the plain codec's at 2-6 bits
(benchmarks/probe_key_centering.py, docs/CODEC.md).

μ is fixed by the first chunk a layer stores (the prefill) and never moves after, so that
every stored key shares one frame; a cache reset clears it, a beam reorder moves it with its
rows. Learned sink logits (gpt-oss) are one more logit on no key, which the shift would move
relative to the others: such layers keep μ = 0.
"""
from __future__ import annotations

import torch


def new_key_mean(batch: int, kv_heads: int, head_dim: int, device, dtype=torch.float32) -> torch.Tensor:
    """μ [B, Hkv, 1, d] in the keys' dtype, zero until a prefill sets it (zero: keys stored as
    they are). Rounding μ changes nothing (any μ leaves attention as it is), and in the keys'
    dtype centering is one subtraction, which an eager decode step pays once per layer."""
    return torch.zeros(batch, kv_heads, 1, head_dim, dtype=dtype, device=device)


def set_key_mean_(key_mean: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, sink: int) -> None:
    """μ from a first chunk key [B, Hkv, N, d]: the mean of each row's real tokens (valid [B, N],
    None: all) after its first `sink` ones, over keys that are finite (a NaN key poisons its own
    radius, not every key of the row). A row with no such token keeps μ = 0."""
    B, _, N, _ = key.shape
    real = torch.ones(B, N, dtype=torch.bool, device=key.device) if valid is None else valid.bool()
    rank = torch.cumsum(real.to(torch.int32), dim=1) - 1  # each real token's index among its row's
    use = (real & (rank >= sink))[:, None, :, None] & torch.isfinite(key).all(-1, keepdim=True)
    k = torch.where(use, key.float(), torch.zeros((), dtype=torch.float32, device=key.device))
    count = use.sum(2, keepdim=True)
    key_mean.copy_(k.sum(2, keepdim=True) / count.clamp(min=1))


def select_rows_(key_mean: torch.Tensor, rows: torch.Tensor) -> None:
    """Beam search: row i continues row rows[i], with that row's μ (in place: CUDA graphs hold
    the address)."""
    key_mean.copy_(key_mean.index_select(0, rows.to(key_mean.device)))


def select_rows_of(key_means: list[torch.Tensor], rows: torch.Tensor) -> None:
    """select_rows_ for many layers' μ at once (a beam reorder moves every layer's rows): μ
    alike (shape, dtype, device) are stacked, gathered once and copied back in one multi-tensor
    copy, where each layer took two small ops (on the H100 a beam step's reorder ran 60 of its
    126 ops here, session 39)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for mean in key_means:
        groups.setdefault((tuple(mean.shape), mean.dtype, mean.device), []).append(mean)
    for (_, _, device), group in groups.items():
        moved = torch.stack(group).index_select(1, rows.to(device=device, dtype=torch.int64))
        torch._foreach_copy_(group, list(moved.unbind(0)))


def centered(key: torch.Tensor, key_mean: torch.Tensor) -> torch.Tensor:
    """key - μ in the key's dtype."""
    if key.dtype == key_mean.dtype:
        return key - key_mean
    return (key.float() - key_mean.float()).to(key.dtype)


def center_chunk(key_mean: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
                 sink: int) -> torch.Tensor:
    """The backend's graph form: a chunk written at position 0 starts a sequence and sets μ
    from its keys; any other chunk keeps the μ its sequence started with. Returns key - μ.
    Tensor ops only (no host read), so Inductor fuses it with the chunk's layout ops."""
    fresh = torch.zeros_like(key_mean)
    set_key_mean_(fresh, key, valid, sink)
    starts = (positions[:1] == 0).any()  # (an empty chunk starts nothing)
    key_mean.copy_(torch.where(starts, fresh, key_mean))
    return centered(key, key_mean)
