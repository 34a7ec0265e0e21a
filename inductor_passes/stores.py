"""The compressed stores the backend owns, one per KV cache (keys and values together).

A store is bound to the tensors that stand for its cache outside the graph: the module's
buffers (static caches) or the placeholders a cat cache hands back. Those tensors are
swapped for placeholders that hold almost no memory (a cat result: a 1-element storage expanded
to the cache's shape; a static buffer: release_buffer), so the dense cache is never resident;
the store's pages are. report() reads kv_bytes and
dense_kv_bytes from live stores.

Each store also carries the budget meter (sphkv_compile.rdr.meter) the graph's budgeting
node counts in. Under policy 'rdr' every tier's pool is sized so that any allocation within
the budget fits (rdr.pool_pages); the budget is that of the store's capacity in tokens.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sphkv_compile import rdr
from sphkv_compile.rdr import meter as budget_meter
from sphkv_compile.rdr.budget import protected_tokens
from sphkv_compile.rdr.node import measure
from sphkv_compile.key_centering import centered, new_key_mean, set_key_mean_
from sphkv_compile.head_pad import choose_stored_head_dim, options_for_stored, pad_last, padding_report
from sphkv_compile.report import register_kv_source
from sphkv_compile.ops import tiers_string
from sphkv_compile.store import TierState, gather_tokens, rebuild
from sphkv_compile.tiers import record_words

_STORE_OF = WeakIdKeyDictionary()  # cache tensor (buffer or placeholder) -> CompressedCache
_RELEASED_AT = WeakIdKeyDictionary()  # released buffer -> its version counter right after release


def store_of(t) -> "CompressedCache | None":
    return _STORE_OF.get(t) if isinstance(t, torch.Tensor) else None


def bind(t: torch.Tensor, store: "CompressedCache") -> None:
    _STORE_OF[t] = store


def zero_memory_like(shape, dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def released_elements(shape) -> int:
    """Elements a released buffer of this shape keeps: 1 + Σ(size - 1) (a few KB)."""
    return 1 + sum(max(int(s) - 1, 0) for s in shape)


def release_buffer(t: torch.Tensor) -> None:
    """Make a dense buffer hold (almost) no memory; it keeps its shape (the store holds the
    data). Its strides become 1 in every dim over released_elements(shape) elements: a view
    that overlaps itself, which PyTorch's writes do not refuse. A stride of 0 would make
    Dynamo's re-trace of a slice assignment into it fail ("more than one element of the
    written-to tensor refers to a single memory location": session 40)."""
    n = released_elements(t.shape)
    if t.untyped_storage().nbytes() > n * t.element_size():
        t.set_(torch.zeros(n, dtype=t.dtype, device=t.device).untyped_storage(), 0, t.shape, (1,) * t.dim())
        _RELEASED_AT[t] = t._version


def written_since_release(t: torch.Tensor) -> bool:
    """Did code outside the compiled model write keys or values into this released buffer (an
    uncompiled forward of the module, whose attention then read the one element it holds)? Its
    version counter says whether anything wrote; only then is the element read (one host read),
    so that a reset to zeros (torchtune's KVCache.reset) does not count. Forgets the write."""
    if t not in _RELEASED_AT or t._version == _RELEASED_AT[t]:
        return False
    held = t.as_strided((released_elements(t.shape),), (1,))  # (a reshape would copy the whole view)
    wrote = bool(held.ne(0).any())
    with torch.no_grad():
        held.zero_()
    _RELEASED_AT[t] = t._version
    return wrote


def target_tier(options) -> int:
    return rdr.uniform_target_tier(options)


def kv_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class CompressedCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, options, kv_dtype, device,
                 max_tokens: int | None = None):
        """max_tokens: the fixed length of a static cache (its budget is the fraction of dense
        at that length, as the graph's budgeting node computes it); None for a cat cache."""
        self.device = torch.device(device)
        # the graph's head dim, and the one the store holds (zero-padded for the kernels: head_pad.py;
        # the rewrite pads the graph's q/k/v the same way)
        self.model_head_dim = head_dim
        stored = choose_stored_head_dim(options, kv_heads, head_dim, self.device, kv_dtype, kv_dtype, max_tokens)
        self.base_options = options  # as the user gave them: a backend handed this store checks them
        options = options_for_stored(options, head_dim, stored)
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, stored
        self.max_tokens = max_tokens
        self.options, self.kv_dtype = options, kv_dtype
        self.specs = tuple(options.tier_ladder)
        self.tiers = tiers_string(self.specs)
        self.capacity = 0
        self.rdr = options.policy == "rdr"
        self.states = [self._allocate(spec, i, 0) for i, spec in enumerate(self.specs)]
        self.cursor = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.meter = budget_meter.new_meter(batch, kv_heads, self.device)
        # μ the stored keys are centered on (key_centering.py); the graph sets it at position 0
        self.key_mean = new_key_mean(batch, kv_heads, stored, self.device, kv_dtype)
        self.grow(capacity)
        ref = weakref.ref(self)
        register_kv_source(lambda: ref().kv_bytes() if ref() is not None else (0, 0), group="graph",
                           padding=lambda: padding_report(ref().model_head_dim, ref().head_dim) if ref() else None)

    def _pages_per_head(self, spec, capacity: int) -> int:
        ps = self.options.page_size
        tokens = self.options.sink + self.options.recent if spec.exact else capacity
        return max(1, math.ceil(tokens / ps))

    def _rdr_pools(self, capacity: int) -> list[tuple[int, int]]:
        """RDR: pools that any allocation within the budget fits. A static cache has the budget
        the budgeting node re-budgets to (fixed by its length); a cat cache the growing form at
        `capacity` tokens."""
        nbytes = rdr.budget_bytes(self.options, capacity, self.kv_heads, self.head_dim, self.kv_dtype,
                                  self.max_tokens)
        return rdr.pool_pages(self.specs, nbytes, self.batch, self.kv_heads, self.head_dim, self.options.page_size,
                              seed=self.options.seed, kv_dtype=self.kv_dtype,
                              protected=protected_tokens(self.options), tokens=capacity,
                              distortion=self.options.distortion)

    def _allocate(self, spec, index: int, capacity: int) -> TierState:
        kw, vw = record_words(spec, self.head_dim, self.options.seed, self.kv_dtype)
        if self.rdr and capacity:
            num_pages, per_head = self._rdr_pools(capacity)[index]
        else:
            per_head = self._pages_per_head(spec, capacity)
            num_pages = per_head * self.batch * self.kv_heads
        return TierState.allocate(self.batch, self.kv_heads, num_pages, self.options.page_size, kw + vw, per_head,
                                  self.device)

    def grow(self, capacity: int) -> None:
        """Room for `capacity` tokens per KV head (contents kept). The uniform policy's exact
        tier never holds more than the sinks and recent window; under RDR every pool follows
        the budget, which grows with the capacity."""
        if capacity <= self.capacity:
            return
        for i, spec in enumerate(self.specs):
            if spec.exact and self.capacity and not self.rdr:
                continue
            new = self._allocate(spec, i, capacity)
            if self.capacity:
                rebuild(new, *gather_tokens(self.states[i]), spec.name)
            self.states[i] = new
        self.capacity = capacity

    def tensors(self) -> list[torch.Tensor]:
        """The order the rewrite's placeholders expect: tier states, cursor, meter, key mean."""
        return [t for s in self.states for t in s.tensors()] + [self.cursor, self.meter, self.key_mean]

    def shapes(self) -> tuple:
        return tuple(tuple(t.shape) for t in self.tensors())

    @property
    def tokens(self) -> int:
        return int(self.cursor[0])

    def ingest(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start from a dense past [B, Hkv, T, d] handed in by the caller: the same update and
        budgeting ops as the graph runs."""
        o = self.options
        k, v = pad_last(k, self.head_dim), pad_last(v, self.head_dim)
        if o.center_keys:  # the past starts the sequence: μ from it, as the graph does at position 0
            set_key_mean_(self.key_mean, k, None, o.sink)
            k = centered(k, self.key_mean)
        self.grow(2 * k.shape[2])
        state = [t for s in self.states for t in s.tensors()]
        budget_meter.reset(self.meter)
        self.cursor.fill_(k.shape[2])
        dt = kv_dtype_name(self.kv_dtype)
        budget = float(o.budget or 0.0)
        if self.rdr:
            torch.ops.sphkv.update_cache_rdr(state, self.meter, self.cursor, k, v, None, None, self.tiers, o.seed, dt,
                                             o.sink, o.recent, budget, 0, o.rebudget_every)
        else:
            torch.ops.sphkv.update_cache(state, k, v, None, None, self.tiers, o.seed, dt, o.sink, o.recent,
                                         target_tier(o))
        torch.ops.sphkv.kv_budget(state, self.meter, self.cursor, self.tiers, o.seed, dt, self.head_dim, o.sink,
                                  o.recent, o.policy, budget, 0, o.rebudget_every)

    def tokens_per_row(self) -> torch.Tensor:
        """[B] real tokens written into the store per batch row, dropped ones included (what a
        causal mask shows as the past). Without drops (uniform) the pages hold all of them."""
        if self.rdr:
            return budget_meter.entered(self.meter).clone()
        return sum(s.count[:, 0].to(torch.int64) for s in self.states)

    def kv_bytes(self) -> tuple[int, int]:
        """(every byte the store holds: pools, metadata, cursor, meter and key mean; dense bf16 K+V bytes)."""
        resident = (sum(s.record_bytes() + s.metadata_bytes() for s in self.states)
                    + (self.cursor.numel() + self.meter.numel()) * 8
                    + self.key_mean.numel() * self.key_mean.element_size())
        dense = 2 * self.batch * self.kv_heads * self.tokens * self.model_head_dim * 2  # K+V in bf16
        return resident, dense

    def budget_report(self) -> dict:
        """What the budgeting node measured, plus the bytes of pages in use (rdr.node.measure)."""
        return measure(self.states, self.specs, self.meter, head_dim=self.head_dim, seed=self.options.seed,
                       kv_dtype=self.kv_dtype)
