"""Utility estimators: u[b, h, i] estimates the future attention mass of token i in KV head h.

  - observation window at prefill: the attention the last W prompt queries put on each token,
    summed over the query heads of the group. store.attend / sphkv::attend return it as
    `new_mass` for the chunk; pass it as rdr_update's `utility`.
  - decode accumulation: attend(..., accumulate=True) adds each step's mass on stored tokens
    to their stored utility (store.add_utility), so re-budgets see what decoding attended.
  - expected attention (optional): the softmax of the mean recent query against each key,
    for tokens no observed query has looked at yet; mixed in with `combine`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POOL_KERNEL = 7  # SnapKV's max-pooling of the observation scores: a needle's neighbours rank with it


def observation_window_utility(queries: torch.Tensor, keys: torch.Tensor, window: int,
                               scale: float | None = None) -> torch.Tensor:
    """Causal attention mass of the last `window` queries q [B, Hq, T, d] on keys [B, Hkv, T, d],
    summed over each KV head's query group: [B, Hkv, T]. Equal to attend()'s new_mass; for
    callers that hold dense q and k (the eval harness, tests)."""
    B, Hq, T, d = queries.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    scale = d ** -0.5 if scale is None else scale
    W = min(window, T)
    q = queries[:, :, T - W:].float().reshape(B, Hkv, G * W, d)
    logits = q @ keys.float().transpose(-1, -2) * scale
    qpos = (T - W + torch.arange(W, device=keys.device)).repeat(G)
    logits = logits.masked_fill(torch.arange(T, device=keys.device)[None, :] > qpos[:, None], float("-inf"))
    return torch.softmax(logits, -1).sum(2)


def expected_attention(query_mean: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax over tokens of the mean query of each query head [B, Hq, d] against keys
    [B, Hkv, T, d], summed over the group: [B, Hkv, T]."""
    B, Hq, d = query_mean.shape
    Hkv = keys.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = query_mean.float().reshape(B, Hkv, Hq // Hkv, d)
    return torch.softmax(q @ keys.float().transpose(-1, -2) * scale, -1).sum(2)


def combine(observed: torch.Tensor, expected: torch.Tensor | None = None, weight: float = 0.0,
            floor: float = 0.0) -> torch.Tensor:
    """observed + weight · expected + floor · mean(observed) per head (all [B, Hkv, T]).

    The floor is a prior for queries not yet seen: a token the observation window ignored
    still has some chance of being attended later, so its distortion is not free and it is
    not dropped as readily."""
    u = observed if expected is None or weight == 0.0 else observed + weight * expected
    if floor:
        u = u + floor * observed.mean(-1, keepdim=True)
    return u


def query_key_gain(queries: torch.Tensor, kv_heads: int, scale: float, window: int) -> torch.Tensor:
    """The key gain s²·E‖q‖²/d [B, Hkv] of the last `window` queries of q [B, Hq, T, d] (0: all),
    averaged over each KV head's query group: the logit variance a unit of key error causes
    (rdr.costs.distortion)."""
    B, Hq, T, d = queries.shape
    W = T if window <= 0 else min(window, T)
    power = (queries[:, :, T - W:].float() * scale).pow(2).sum(-1)
    return power.reshape(B, kv_heads, -1).mean(-1) / d


def pooled(scores: torch.Tensor, kernel: int = POOL_KERNEL) -> torch.Tensor:
    """Max-pool [B, H, T] along T (odd kernel, same length): a token the observation window
    attends lifts its neighbours, so a multi-token answer (a passkey's digits) is kept whole."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    B, H, T = scores.shape
    out = F.max_pool1d(scores.reshape(B * H, 1, T).float(), kernel, stride=1, padding=kernel // 2)
    return out.reshape(B, H, T).to(scores.dtype)
