"""The compared methods, each turning one layer's prefill capture into a cache that holds at
most `budget` bytes (per layer, batch row 1, all KV heads).

Byte accounting per token and KV head (head_dim d = 64):
  dense / StreamingLLM / SnapKV: 16-bit K and V, 4·d bytes, positions implicit;
  H2O: the same plus its fp16 accumulated score;
  KIVI-b: codes plus every fp16 scale and zero point (baselines.KiviCodes.stored_bits);
  spherical (uniform, RDR): record words × 4 plus the store's fp16 utility (rdr.costs).
Where a method cannot hold every token within the budget it evicts; how is stated per method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rdr
from ..key_centering import centered, new_key_mean, set_key_mean_
from ..baselines import kivi_bits_per_element, kivi_dequantize, kivi_keys, kivi_values
from ..rdr.costs import choice_table
from ..rdr.utility import POOL_KERNEL, combine, pooled, query_key_gain
from ..store import LayerStore
from ..tiers import DEFAULT_TIERS, TierSpec
from .caches import DenseCache, StoreCache
from .hook import LayerCapture

KV_DTYPE = torch.float16  # the exact tier and the 16-bit reference
DENSE_TOKEN_BYTES_PER_DIM = 4  # K + V, 2 bytes each
KIVI_GROUP = 32  # tokens per key group (KIVI's G)
# 8.0 .. 2.0: every whole-word size at d = 64 down to the ladder's lowest tier. Below 2 bits
# the codec's error wrecked quality (1-1.5 bits gave perplexity ~400 in a first run), so
# uniform evicts the oldest tokens instead of going coarser.
UNIFORM_BITS = tuple(b / 2 for b in range(16, 3, -1))
# A finer ladder for RDR: every word size from 2 to 6 bits per coordinate (keys and values).
FINE_TIERS = (TierSpec("exact"),) + tuple(TierSpec(f"b{b}", b, "polar", b) for b in (6.0, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0))


@dataclass(frozen=True)
class Settings:
    sink: int = 4
    recent: int = 16
    obs_window: int = 32
    pool_kernel: int = POOL_KERNEL  # SnapKV's pooling of the observation scores (also RDR's utility)
    seed: int = 0
    page_size: int = 16


def keep_indices(scores: torch.Tensor, n: int, always_last: int, always_first: int = 0) -> torch.Tensor:
    """Per KV head, the n kept positions (sorted): the first `always_first`, the last
    `always_last`, and the highest-scoring others."""
    T = scores.shape[-1]
    n = min(n, T)
    s = scores.clone()
    first = min(always_first, n)
    last = min(always_last, n - first)
    s[..., :first] = float("inf")
    if last:
        s[..., T - last:] = float("inf")
    idx = torch.topk(s, n, dim=-1, sorted=False).indices
    return torch.sort(idx, -1).values


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def dense_token_bytes(d: int) -> int:
    return DENSE_TOKEN_BYTES_PER_DIM * d


# ---- the methods ----------------------------------------------------------------------------
def dense(cap: LayerCapture, budget: int, cfg: Settings):
    H, T, d = cap.keys.shape[1:]
    return DenseCache(cap.keys, cap.values), H * T * dense_token_bytes(d)


def streaming_llm(cap, budget, cfg):
    """Sinks plus the most recent tokens that fit."""
    H, T, d = cap.keys.shape[1:]
    n = budget // (H * dense_token_bytes(d))
    idx = keep_indices(torch.zeros(1, H, T), n, always_last=n, always_first=cfg.sink)
    return DenseCache(gather(cap.keys, idx), gather(cap.values, idx)), H * idx.shape[-1] * dense_token_bytes(d)


def snapkv(cap, budget, cfg):
    """The observation window plus the top pooled observation scores, per KV head."""
    H, T, d = cap.keys.shape[1:]
    n = budget // (H * dense_token_bytes(d))
    idx = keep_indices(pooled(cap.observed, cfg.pool_kernel), n, always_last=cfg.obs_window)
    return DenseCache(gather(cap.keys, idx), gather(cap.values, idx)), H * idx.shape[-1] * dense_token_bytes(d)


def h2o(cap, budget, cfg):
    """Half recent window, half heavy hitters by attention accumulated over every prompt query."""
    H, T, d = cap.keys.shape[1:]
    per_token = dense_token_bytes(d) + 2  # + its fp16 accumulated score
    n = budget // (H * per_token)
    idx = keep_indices(cap.accumulated, n, always_last=n // 2)
    return DenseCache(gather(cap.keys, idx), gather(cap.values, idx)), H * idx.shape[-1] * per_token


def kivi(bits: int):
    def method(cap, budget, cfg):
        """KIVI-b over the kept tokens; when the quantized cache of all tokens exceeds the budget,
        the kept tokens are chosen like SnapKV (window + pooled observation scores)."""
        H, T, d = cap.keys.shape[1:]

        def nbytes(n):
            bits_k = kivi_bits_per_element(bits, KIVI_GROUP, "channel", n, d)
            bits_v = kivi_bits_per_element(bits, d, "token", n, d)
            return H * n * d * (bits_k + bits_v) / 8

        n = T
        while n > 0 and nbytes(n) > budget:
            n -= max(1, n // 64)
        idx = keep_indices(pooled(cap.observed, cfg.pool_kernel), n, always_last=cfg.obs_window)
        kq = kivi_keys(gather(cap.keys, idx), bits, KIVI_GROUP)
        vq = kivi_values(gather(cap.values, idx), bits)
        held = (kq.stored_bits + vq.stored_bits) // 8
        return DenseCache(kivi_dequantize(kq, torch.float32), kivi_dequantize(vq, torch.float32)), held
    return method


def _store(tiers, cap, cfg) -> LayerStore:
    return LayerStore(1, cap.keys.shape[1], cap.keys.shape[-1], tuple(tiers), kv_dtype=KV_DTYPE,
                      page_size=cfg.page_size, seed=cfg.seed)


def centered_keys(cap, cfg, center: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prefill keys as the product stores them: minus μ, the mean of each KV head's keys
    after the sinks (option center_keys, key_centering.py); as they are with center=False."""
    if not center:
        return cap.keys, None
    B, H, _, d = cap.keys.shape
    mean = new_key_mean(B, H, d, cap.keys.device, cap.keys.dtype)
    set_key_mean_(mean, cap.keys, None, cfg.sink)
    return centered(cap.keys, mean), mean


def uniform_spherical(cap, budget, cfg, center: bool = True):
    """ADA without RDR: sinks and recent window exact, every other token in one spherical tier,
    the finest of UNIFORM_BITS that fits; below the coarsest, the oldest non-sink tokens go."""
    H, T, d = cap.keys.shape[1:]
    for bits in UNIFORM_BITS:
        tiers = (TierSpec("exact"), TierSpec("uniform", bits, "polar", bits))
        table = choice_table(tiers, d, cfg.seed, KV_DTYPE)
        protected = min(T, cfg.sink + cfg.recent)
        n = protected + max(0, (budget // H - protected * table.bytes[0]) // table.bytes[1])
        if n >= T:
            break
    idx = keep_indices(torch.zeros(1, H, T), min(n, T), always_last=min(n, T), always_first=cfg.sink)
    keys, mean = centered_keys(cap, cfg, center)
    store = _store(tiers, cap, cfg)
    store.update(gather(keys, idx), gather(cap.values, idx), sink=cfg.sink, recent=cfg.recent, target="uniform")
    return StoreCache(store, mean), int(rdr.token_bytes(store.states, table)[0])


def uniform_uncentered(cap, budget, cfg):
    return uniform_spherical(cap, budget, cfg, center=False)


def rdr_method(tiers=DEFAULT_TIERS, floor: float = 0.0, recent: int | None = None, distortion: str = "unit",
               center: bool = True):
    def method(cap, budget, cfg):
        """RDR: each token and head gets a tier or drop by the Lagrangian allocation; the utility is
        the pooled observation-window attention (as update_cache_rdr pools it); distortion
        'logit' prices key errors by the key gain of the window's queries (option distortion)."""
        d = cap.keys.shape[-1]
        keys, mean = centered_keys(cap, cfg, center)
        store = _store(tiers, cap, cfg)
        utility = combine(pooled(cap.observed, cfg.pool_kernel), floor=floor)
        gain = query_key_gain(cap.window_queries, cap.keys.shape[1], 1.0, 0) if distortion == "logit" else None
        rdr.apply(store, keys, cap.values, None, utility, budget_bytes=budget, sink=cfg.sink,
                  recent=cfg.recent if recent is None else recent, rebudget_every=1, key_gain=gain)
        table = choice_table(tuple(tiers), d, cfg.seed, KV_DTYPE)
        return StoreCache(store, mean), int(rdr.token_bytes(store.states, table)[0])
    return method


METHODS = {
    "dense": dense,
    "streaming": streaming_llm,
    "snapkv": snapkv,
    "h2o": h2o,
    "kivi2": kivi(2),
    "kivi4": kivi(4),
    "uniform": uniform_spherical,  # keys centered, as the product stores them (center_keys)
    "uniform_uncentered": uniform_uncentered,
    "rdr": rdr_method(),
    "rdr_uncentered": rdr_method(center=False),
    "rdr_logit": rdr_method(distortion="logit"),
    "rdr_fine": rdr_method(FINE_TIERS),
}
