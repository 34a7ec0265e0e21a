"""When is a mask "causal over the cache plus padding"?

The rewritten attention sees every stored token plus the new chunk causally, minus padding.
A dense mask is equivalent when, for every real query row:
  - past columns (< p0, the chunk's first position) are the same for every query row and
    show exactly as many tokens as the store holds for that batch row;
  - chunk columns p0 .. p0+N-1 are causal (query i sees chunk tokens <= its own) and agree
    with one validity vector per batch row (padding);
  - columns after the chunk (unfilled slots of a static buffer) are hidden.
Additive masks must also hold only 0 and "-inf" (<= MASKED_AT) values; anything else is a
bias (ALiBi and the like), which changes the scores.

`check_visibility` is used twice: at compile time on the example inputs (to choose dense
with a reason) and at run time inside `sphkv_graph::chunk_validity` (so a mask that changes
later raises instead of being silently wrong).
"""
from __future__ import annotations

import torch

# Additive mask values at or below this are "masked": exp(-1e4) underflows to 0 in fp32
# and fp64 whatever the score, so the dense result does not depend on the exact value.
MASKED_AT = -1.0e4


class MaskNotEquivalent(RuntimeError):
    def __init__(self, message: str, bias: bool = False):
        super().__init__(message)
        self.bias = bias


def additive_ok(mask: torch.Tensor) -> torch.Tensor:
    return ((mask == 0) | (mask <= MASKED_AT)).all()


def to_batch_rows(vis: torch.Tensor, batch: int, q_heads: int, q_len: int, k_len: int) -> torch.Tensor:
    """Any broadcastable visibility [.., Tq, Tk] (or flattened [B*H, Tq, Tk]) -> [B, Tq, Tk];
    a mask that differs between heads is not equivalent."""
    v = vis
    if v.dim() == 3 and v.shape[0] == batch * q_heads and batch * q_heads > 1:
        v = v.reshape(batch, q_heads, *v.shape[1:])
    while v.dim() < 4:
        v = v.unsqueeze(0)
    v = v.expand(batch, v.shape[1], q_len, k_len)
    if v.shape[1] > 1 and not bool((v == v[:, :1]).all()):
        raise MaskNotEquivalent("the attention mask differs between heads")
    return v[:, 0]


def check_visibility(vis: torch.Tensor, positions: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
    """vis [B, Tq, Tk] bool; positions [N] of the chunk; stored [B] tokens in the store or None.
    Returns the chunk's validity [B, N]; raises MaskNotEquivalent."""
    B, Tq, Tk = vis.shape
    N = positions.numel()
    p0 = int(positions[0]) if N else 0
    if p0 + N > Tk:
        raise MaskNotEquivalent(f"the chunk at positions {p0}..{p0 + N - 1} lies outside the {Tk} mask columns")
    dev = vis.device
    chunk = vis[:, :, p0:p0 + N]
    valid = chunk[:, -1, :]
    qpos = N - Tq + torch.arange(Tq, device=dev)
    causal = torch.arange(N, device=dev)[None, :] <= qpos[:, None]
    real = valid[:, N - Tq:][..., None]  # [B, Tq, 1]: rows whose query is a real token
    if not bool(((chunk == (valid[:, None, :] & causal)) | ~real).all()):
        raise MaskNotEquivalent("chunk columns are not causal-with-padding (sliding window or custom mask?)")
    if not bool((~vis[:, :, p0 + N:] | ~real).all()):
        raise MaskNotEquivalent("columns after the chunk are visible (the mask lets queries see the future)")
    past = vis[:, :, :p0]
    if not bool(((past == past[:, -1:, :]) | ~real).all()):
        raise MaskNotEquivalent("past columns differ between query rows (sliding window?)")
    # the store's counts may live on the host while the mask is on the GPU
    if stored is not None and not bool((past[:, -1, :].sum(-1) == stored.to(dev, torch.int64)).all()):
        raise MaskNotEquivalent(f"the mask shows {past[:, -1, :].sum(-1).tolist()} past tokens but the store holds "
                                f"{stored.tolist()} (sliding window, or a cache written elsewhere?)")
    return valid
