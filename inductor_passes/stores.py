"""The compressed stores the backend owns, one per KV cache (keys and values together).

A store is bound to the tensors that stand for its cache outside the graph: the module's
buffers (static caches) or the placeholders a cat cache hands back. Those tensors are
swapped for zero-memory placeholders (a 1-element storage expanded to the cache's shape),
so the dense cache is never resident; the store's pages are. report() reads kv_bytes and
dense_kv_bytes from live stores.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sphkv_compile.report import register_kv_source
from sphkv_compile.ops import tiers_string
from sphkv_compile.store import TierState, gather_tokens, rebuild
from sphkv_compile.tiers import record_words

_STORE_OF = WeakIdKeyDictionary()  # cache tensor (buffer or placeholder) -> CompressedCache


def store_of(t) -> "CompressedCache | None":
    return _STORE_OF.get(t) if isinstance(t, torch.Tensor) else None


def bind(t: torch.Tensor, store: "CompressedCache") -> None:
    _STORE_OF[t] = store


def zero_memory_like(shape, dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def release_buffer(t: torch.Tensor) -> None:
    """Make a dense buffer hold no memory; it keeps its shape (the store holds the data)."""
    if t.untyped_storage().nbytes() > t.element_size():
        t.set_(torch.zeros(1, dtype=t.dtype, device=t.device).untyped_storage(), 0, t.shape, (0,) * t.dim())


def target_tier(options) -> int:
    ladder = options.tier_ladder
    compressed = [i for i, t in enumerate(ladder) if not t.exact]
    exact_bits = [i for i in compressed if ladder[i].key_bits == float(options.bits)]
    return (exact_bits or compressed)[0]


class CompressedCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, options, kv_dtype, device):
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.options, self.kv_dtype, self.device = options, kv_dtype, torch.device(device)
        self.specs = tuple(options.tier_ladder)
        self.tiers = tiers_string(self.specs)
        self.capacity = 0
        self.states = [self._allocate(spec, 0) for spec in self.specs]
        self.cursor = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.grow(capacity)
        ref = weakref.ref(self)
        register_kv_source(lambda: ref().kv_bytes() if ref() is not None else (0, 0), group="graph")

    def _pages_per_head(self, spec, capacity: int) -> int:
        ps = self.options.page_size
        tokens = self.options.sink + self.options.recent if spec.exact else capacity
        return max(1, math.ceil(tokens / ps))

    def _allocate(self, spec, capacity: int) -> TierState:
        kw, vw = record_words(spec, self.head_dim, self.options.seed, self.kv_dtype)
        per_head = self._pages_per_head(spec, capacity)
        return TierState.allocate(self.batch, self.kv_heads, per_head * self.batch * self.kv_heads,
                                  self.options.page_size, kw + vw, per_head, self.device)

    def grow(self, capacity: int) -> None:
        """Room for `capacity` tokens per KV head in the compressed tiers (contents kept)."""
        if capacity <= self.capacity:
            return
        for i, spec in enumerate(self.specs):
            if spec.exact and self.capacity:
                continue
            new = self._allocate(spec, capacity)
            if self.capacity:
                rebuild(new, *gather_tokens(self.states[i]), spec.name)
            self.states[i] = new
        self.capacity = capacity

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in self.states for t in s.tensors()] + [self.cursor]

    def shapes(self) -> tuple:
        return tuple(tuple(t.shape) for t in self.tensors())

    @property
    def tokens(self) -> int:
        return int(self.cursor[0])

    def ingest(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start from a dense past [B, Hkv, T, d] handed in by the caller."""
        from sphkv_compile.ops import update_cache
        o = self.options
        self.grow(2 * k.shape[2])
        update_cache([t for s in self.states for t in s.tensors()], k, v, None, None, self.tiers, o.seed,
                     str(self.kv_dtype).replace("torch.", ""), o.sink, o.recent, target_tier(o))
        self.cursor.fill_(k.shape[2])

    def kv_bytes(self) -> tuple[int, int]:
        resident = sum(s.record_bytes() + s.metadata_bytes() for s in self.states) + self.cursor.numel() * 8
        dense = 2 * self.batch * self.kv_heads * self.tokens * self.head_dim * 2  # K+V in bf16
        return resident, dense
