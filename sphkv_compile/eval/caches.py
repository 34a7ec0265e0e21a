"""Per-layer caches the continuation attends through: a dense (possibly evicted or
dequantized) K/V, or the spherical paged store."""
from __future__ import annotations

import torch

from ..key_centering import centered
from ..store import LayerStore


def causal_chunk_attention(q, k_old, v_old, k_new, v_new, scale):
    """q [1, Hq, Tq, d] over stored k_old/v_old [1, Hkv, n, d] (all visible) and the chunk
    k_new/v_new [1, Hkv, Tq, d] (causal). GQA: query head h reads KV head h // G."""
    B, Hq, Tq, d = q.shape
    Hkv = k_new.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * Tq, d)
    lg_old = qg @ k_old.transpose(-1, -2) * scale
    lg_new = qg @ k_new.transpose(-1, -2) * scale
    pos = torch.arange(Tq).repeat(G)
    lg_new = lg_new.masked_fill(torch.arange(Tq)[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(torch.cat((lg_old, lg_new), -1), -1)
    n = k_old.shape[2]
    out = p[..., :n] @ v_old + p[..., n:] @ v_new
    return out.reshape(B, Hq, Tq, d)


class DenseCache:
    """Kept tokens as float K/V [1, Hkv, n, d] (eviction baselines; KIVI stores dequantized)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def attend(self, q, k, v, scale):
        return causal_chunk_attention(q, self.keys, self.values, k, v, scale)


class StoreCache:
    """The compressed paged store: logits read from the codes (store.attend). With key_mean
    the store holds keys centered on it (key_centering.py, as the product stores them), so the
    chunk's keys are centered the same way before they meet the stored ones."""

    def __init__(self, store: LayerStore, key_mean: torch.Tensor | None = None):
        self.store, self.key_mean = store, key_mean

    def attend(self, q, k, v, scale):
        if self.key_mean is not None:
            k = centered(k, self.key_mean)
        out, _ = self.store.attend(q, k, v, scale=scale)
        return out
