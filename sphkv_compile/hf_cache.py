"""A transformers Cache whose layers are compressed stores (SphkvLayer), not dense tensors.

`update()` of a compressed layer returns only the chunk it was given: the dense chunk is all
the attention function needs besides the store (sphkv::attend reads the past from codes),
and the chunk enters the store after attention (sphkv::update_cache). So no dense K/V of
past tokens is ever held. `get_seq_length()` and `get_mask_sizes()` still report the full
length, so positions and masks come out as with HF's own caches.

Two flavours, as in transformers:
- static (max_cache_len given): fixed-size page pools allocated once, is_compileable, the
  state tensors keep their addresses (one compiled graph for every decode step);
- dynamic: pools grow between steps in Python (outside any compiled graph), geometrically.

Layers the plan (hf_plan) keeps dense are HF's own Dynamic/Static(SlidingWindow)Layer.

The chunk enters through `SphkvLayer.store_chunk`, the same ops as the compiled graph's
rewrite: the cache update (sphkv::update_cache, or sphkv::update_cache_rdr under policy
'rdr') and then the budgeting node sphkv::kv_budget (sphkv_compile/rdr/node.py), which counts
in the layer's meter tensor (without a budget only the count, done without the node). Under 'rdr' a static cache's pools hold its fixed budget (per-tier
capacities, rdr/capacity.py); a dynamic cache grows them as its budget grows with the tokens
seen (rdr/budget.py), so what a layer holds stays within the budget plus documented metadata.
"""
from __future__ import annotations

import contextlib
import copy
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer

from . import cache_crop, rdr
from .eager_ops import call_op
from .ops import prepare_store
from .rdr import meter as budget_meter
from .rdr.budget import SphkvBudgetError
from .rdr.budget import protected_tokens, warn_if_allocation_is_long
from .rdr.eager import ensure_capacity
from .rdr.node import (cadence_counters, cadence_due, count_unbudgeted_step, current_budget, measure, over_budget_error,
                       rebudget_if_due)
from .report import register_kv_source
from .head_pad import choose_stored_head_dim, options_for_stored, pad_last, padding_report
from .key_centering import new_key_mean, select_rows_
from .key_centering import select_rows_of as select_key_mean_rows_of
from .options import SphkvOptions
from .store import LayerStore, reserve_tiers, select_rows_of
from .hf_plan import LayerPlan


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class SphkvLayer(CacheLayerMixin):
    """One decoder layer's KV as a compressed paged store (see module docstring)."""

    is_sliding = False

    def __init__(self, options: SphkvOptions, layer_idx: int, max_cache_len: int | None = None,
                 sliding_window: int | None = None, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.kv_dtype = kv_dtype  # of the exact tier; None: see storage_dtype
        self.options = options  # what the store runs with (a padded head dim rescales the budget: init_store)
        self.base_options = options  # as the user gave them
        self.layer_idx = layer_idx
        self.max_cache_len = max_cache_len
        self.sliding_window = sliding_window  # only ever set when max_cache_len <= window (exact)
        self.is_compileable = max_cache_len is not None
        self.store: LayerStore | None = None
        self.seen = 0  # dynamic: positions seen (incl. padding), a Python int
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)  # static: the same, on device
        self.stored_any = False  # until the first update the store is empty (prefill needs no codes)
        self.awaiting_attention = False  # an update returned a chunk the store has not answered yet
        self.meter: torch.Tensor | None = None  # the budgeting node's counters (rdr/meter.py)
        self.head_dim: int | None = None  # the model's; the store may hold it zero-padded (head_pad.py)
        # the cache this layer belongs to, weakly: the cache holds its layers, and a strong
        # reference back would leave every dropped cache (pools and all) to the cycle collector
        self.owner: weakref.ref | None = None
        self.reserved_for: tuple[int, int] | None = None  # (seen, chunk) another layer reserved this one for
        self.crop_base: tuple[torch.Tensor, torch.Tensor] | None = None  # policy 'rdr': cache_crop._newest_run
        self.key_mean: torch.Tensor | None = None  # μ the stored keys are centered on (key_centering.py)

    # ---- allocation ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, d = key_states.shape
        if value_states.shape[-1] != d:
            raise ValueError(f"layer {self.layer_idx}: keys and values have different head dims "
                             f"({d} vs {value_states.shape[-1]}); the store needs one head dim")
        self.init_store(B, H, d, storage_dtype(self.kv_dtype, key_states.dtype), key_states.device, key_states.dtype)

    def init_store(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                   q_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.head_dim = head_dim
        # the store may hold the head dim zero-padded for the kernels; its budget, the same bytes
        stored = choose_stored_head_dim(self.base_options, kv_heads, head_dim, self.device, q_dtype or dtype, dtype,
                                        self.max_cache_len)
        self.options = o = options_for_stored(self.base_options, head_dim, stored)
        self.store = LayerStore(batch, kv_heads, stored, o.tier_ladder, kv_dtype=dtype, page_size=o.page_size,
                                seed=o.seed, device=device)
        self.meter = budget_meter.new_meter(batch, kv_heads, device)
        self.key_mean = new_key_mean(batch, kv_heads, head_dim, device, q_dtype or dtype)
        if self.max_cache_len is not None:  # a dynamic layer's stays on the host: the budget reads it every step
            self.cumulative_length = self.cumulative_length.to(device)
        # no dense K/V here, only codes: code that asks a cache layer whether it holds keys
        # (Mllama's cross-attention check reads layer.keys.numel()) sees none, not None
        self.keys = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        prepare_store(self.store.tiers, stored, o.seed, dtype, self.device)
        if self.max_cache_len is not None:
            self._allocate_fixed(self.max_cache_len)
            if not _compiling():  # stable addresses: one graph, and CUDA graphs can replay it
                for t in self.state + [self.meter, self.key_mean]:
                    torch._dynamo.mark_static_address(t)
                torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def _allocate_fixed(self, max_tokens: int) -> None:
        """Uniform: pools that hold max_tokens per (row, KV head): the exact tier holds at most
        the sinks plus the recent window after every update; each compressed tier may have to
        hold all. RDR: per-tier capacities that together hold the fixed budget (rdr.pool_pages,
        rdr/capacity.py); the allocation respects them."""
        st, o = self.store, self.options
        ps = o.page_size
        if o.policy == "rdr":
            sizes = rdr.pool_pages(st.tiers, self.budget_bytes(max_tokens), st.batch, st.kv_heads, st.head_dim, ps,
                                   seed=o.seed, kv_dtype=st.kv_dtype, protected=protected_tokens(o), tokens=max_tokens,
                                   distortion=o.distortion)
            st.allocate_packed([(n, per_head) for n, per_head in sizes])
            return
        per_head = {}
        for spec in st.tiers:
            cap = min(max_tokens, o.sink + o.recent) if spec.exact else max_tokens
            per_head[spec.name] = max(1, -(-cap // ps))
        # one tensor for the ops to take (packed_state.py): a compiled step's host time grows per input
        st.allocate_packed([(st.batch * st.kv_heads * per_head[spec.name], per_head[spec.name]) for spec in st.tiers])

    def budget_bytes(self, tokens: int) -> int:
        """The layer's token-byte budget per batch row with `tokens` seen (rdr/budget.py)."""
        st = self.store
        return rdr.budget_bytes(self.options, tokens, st.kv_heads, st.head_dim, st.kv_dtype, self.max_cache_len)

    @torch._dynamo.disable
    def reserve(self, new_tokens: int) -> None:
        """Dynamic layers: grow the pools (in Python, outside compiled graphs) so that a chunk of
        new_tokens fits. Uniform: the worst case of placement.graduate; RDR: the capacities of the
        budget the layer will have after the chunk (it grows with the tokens; pools never shrink)."""
        st = self.store
        if self.options.policy == "rdr":
            tokens = self.seen + new_tokens
            ensure_capacity(st, self.budget_bytes(tokens), protected=protected_tokens(self.options), tokens=tokens,
                            distortion=self.options.distortion)
            return
        if self.reserved_for == (self.seen, new_tokens):  # the step's first layer reserved this one too
            self.reserved_for = None
            return
        # Every uniform dynamic layer of the cache that has a store takes the same chunk this step
        # and has not changed since: reserve them all now, with one read back (a sync on a GPU).
        # A layer marks what it was reserved for, (tokens seen, chunk); anything else that moves
        # its tokens (reset, beam reorder) clears the mark.
        cache = self.owner() if self.owner is not None else None
        peers = cache.compressed_layers() if cache is not None else []
        group = [self] + [layer for layer in peers if layer is not self and layer.store is not None
                          and layer.max_cache_len is None and layer.options.policy != "rdr"
                          and layer.seen == self.seen]  # not those this step has updated already
        reserve_tiers([request for layer in group for request in layer._reservations(new_tokens)])
        for layer in group[1:]:
            layer.reserved_for = (layer.seen, new_tokens)

    def _reservations(self, new_tokens: int) -> list:
        """Uniform: placement.graduate's worst case, every exact token graduating into each
        compressed tier. The exact tier itself never holds more than the sinks and the recent
        window after an update (graduate rebuilds it with those; the device update moves its
        window in place), so it reserves for at most that many more tokens, not the whole chunk:
        a prefill's chunk would otherwise leave it a pool the size of the prompt."""
        st, o = self.store, self.options
        e = st.tier_index("exact")
        return [(st, e, min(new_tokens, o.sink + o.recent))] + \
            [(st, t, new_tokens, e) for t, spec in enumerate(st.tiers) if not spec.exact]

    @property
    def state(self) -> list[torch.Tensor]:
        """The state list the custom ops take: a fixed store's packed arena, else
        TierState.tensors() per tier (LayerStore.op_state)."""
        return self.store.op_state()

    @property
    def op_tiers(self) -> str:
        """The ops' `tiers` argument: the tier specs and, packed, the state's layout."""
        return self.store.tiers_arg

    @torch._dynamo.disable
    def advance_dynamic(self, n: int) -> None:
        self.seen += n
        self.store.tokens_seen = self.seen
        self.cumulative_length.fill_(self.seen)  # the budgeting ops read the tokens seen from a tensor

    def store_chunk(self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                    mass: torch.Tensor, query: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """The chunk [B, Hkv, N, d] enters the store after attention (mass: the observation-window
        attention on it, its utility; query: the queries that attended, for RDR's key gain), then
        the budgeting node runs: both as custom ops, so a compiled forward runs exactly this.
        Without a budget (policy 'uniform', budget None) the node would only count the step in
        the meter, which two in-place ops do instead of the op's dispatch (rdr.node.count_unbudgeted_step)."""
        o, st = self.options, self.store
        key, value, query = (pad_last(x, st.head_dim) for x in (key, value, query))
        tiers = self.op_tiers
        kv_dtype = str(st.kv_dtype).removeprefix("torch.")
        budget, max_tokens = float(o.budget or 0.0), self.max_cache_len or 0
        # without a budget the budgeting node only counts the step: done here, without the op
        unbudgeted = o.policy != "rdr" and budget <= 0
        tokens = None if unbudgeted else self.cumulative_length + key.shape[2]  # seen, this chunk included
        if o.policy == "rdr":
            call_op("update_cache_rdr", self.state, self.meter, tokens, key, value, valid, mass, tiers, o.seed,
                    kv_dtype, o.sink, o.recent, budget, max_tokens, o.rebudget_every,
                    query if o.distortion == "logit" else None, float(scale), o.obs_window)
        else:
            call_op("update_cache", self.state, key, value, valid, mass, tiers, o.seed, kv_dtype, o.sink, o.recent,
                    rdr.uniform_target_tier(o))
        if unbudgeted:
            count_unbudgeted_step(self.meter)
        else:
            call_op("kv_budget", self.state, self.meter, tokens, tiers, o.seed, kv_dtype, st.head_dim, o.sink,
                    o.recent, o.policy, budget, max_tokens, o.rebudget_every)

    def rebudgets(self) -> bool:
        """Does this layer re-budget between steps (policy 'rdr' with a budget, store filled)?"""
        o = self.options
        return o.policy == "rdr" and bool(o.budget) and self.store is not None and self.stored_any

    def rebudget_if_due(self, cadence: tuple[int, int]) -> bool:
        """Policy 'rdr', between decode steps replayed from CUDA graphs: the re-budget check the
        budgeting node makes inside an uncaptured step (rdr.node.rebudget_if_due), given the
        meter's (calls, last re-budget) read back (SphkvCache.rebudget_due reads every layer's at
        once). Returns whether it re-budgeted."""
        o, st = self.options, self.store
        if not cadence_due(*cadence, o.rebudget_every, counted=True):
            return False
        nbytes = current_budget(st.states, st.tiers, self.cumulative_length, head_dim=st.head_dim, seed=st.seed,
                                kv_dtype=st.kv_dtype, policy="rdr", fraction=float(o.budget),
                                max_tokens=self.max_cache_len or 0, sink=o.sink, recent=o.recent,
                                rebudget_every=o.rebudget_every)
        return rebudget_if_due(st.states, st.tiers, self.meter, head_dim=st.head_dim, seed=st.seed,
                               kv_dtype=st.kv_dtype, sink=o.sink, recent=o.recent, budget_bytes=nbytes,
                               rebudget_every=o.rebudget_every, counted=True, cadence=cadence)

    # ---- the CacheLayerMixin protocol ---------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return the chunk itself: the attention function reads the past from the store and
        appends the chunk after attending (sphkv::update_cache). An update whose chunk no
        attention over the store answered before this one raises (hf.check_attended)."""
        if self.awaiting_attention:
            from .hf import SphkvUnsupportedError, unattended_update_message

            self.awaiting_attention = False
            raise SphkvUnsupportedError(unattended_update_message(self.layer_idx), layer_idx=self.layer_idx)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.awaiting_attention = True
        return key_states, value_states

    def get_seq_length(self):
        if self.max_cache_len is not None:
            return self.cumulative_length if self.is_initialized else 0
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers 5.x pass cache_position
            query_length = query_length.shape[0]
        if self.max_cache_len is not None:
            return self.max_cache_len, 0  # like StaticLayer: a constant, so no per-step recompiles
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self) -> None:
        """Empty the store in place (static caches are reused across generate calls)."""
        if self.store is not None:
            for st in self.store.states:
                st.empty_()
            self.store.tokens_seen = 0
        if self.meter is not None:
            budget_meter.reset(self.meter)
        if self.key_mean is not None:
            self.key_mean.zero_()  # the next prefill sets it again
        self.seen = 0
        self.cumulative_length.zero_()
        self.stored_any = False
        self.awaiting_attention = False
        self.reserved_for = None
        self.crop_base = None

    @torch._dynamo.disable
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """This layer alone (SphkvCache.reorder_cache, which beam search calls, reorders all
        layers together): batch row i continues beam beam_idx[i]. Each tier's records move in
        place (store.LayerStore.select_rows: pages copied where the rows keep their token
        counts, else the tier rebuilt; a copy of the moved records, as HF's dense layers copy
        their K/V with index_select), and the meter's per-row entries follow their rows."""
        if self.store is None or not self.stored_any:
            return
        self.reserved_for = None  # rows' token counts change
        self.store.select_rows(beam_idx, can_grow=self.max_cache_len is None)
        budget_meter.select_rows(self.meter, beam_idx)
        select_rows_(self.key_mean, beam_idx)
        cache_crop.reorder_rows(self, beam_idx)

    @property
    def is_croppable(self) -> bool:
        """Can crop remove newest tokens (cache_crop.py)? Not with recent=0: once a token is coded
        none of the newest is sure to be exact."""
        return self.options.recent > 0

    @torch._dynamo.disable
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest -tokens_to_remove tokens of every batch row (assisted and
        prompt-lookup decoding drop the draft tokens the model rejected; generate() only crops
        tokens it generated, which every row holds). Possible while they are all still exact
        (cache_crop.py). SphkvCache.crop checks all layers with one read back."""
        n = self._tokens_to_crop(tokens_to_remove)
        if n:
            self._check_crop(n, int(cache_crop.removable_newest(self)))
            cache_crop.drop(self, n)

    def _tokens_to_crop(self, tokens_to_remove: int) -> int:
        if self.store is None:
            return 0
        n = cache_crop.tokens_to_remove(self, tokens_to_remove)
        if n and not self.is_croppable:
            from .hf import SphkvUnsupportedError

            raise SphkvUnsupportedError(
                f"layer {self.layer_idx}: recent=0 keeps none of the newest tokens exact, so they cannot be removed "
                "(crop, used by assisted and prompt-lookup decoding). Fix: optimize(model, recent=...) at least as "
                "long as the drafts", layer_idx=self.layer_idx)
        return n

    def _check_crop(self, n: int, removable: int) -> None:
        if n > removable:
            from .hf import SphkvUnsupportedError

            raise SphkvUnsupportedError(
                f"layer {self.layer_idx}: cannot remove the newest {n} tokens (crop): only the newest {removable} are "
                f"sure to be exact (recent window {self.options.recent}); older ones may be held as codes, which "
                "cannot be removed by position. Fix: optimize(model, recent=...) at least as long as the drafts, or "
                "draft fewer tokens (prompt_lookup_num_tokens; with a draft model num_assistant_tokens, with "
                "num_assistant_tokens_schedule='constant': 'heuristic' lengthens the drafts after each fully "
                "accepted one)", layer_idx=self.layer_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a filled sphkv cache cannot be expanded along the batch; repeat the prompt in "
                                  "the batch before the prefill (generate() does so for num_beams and "
                                  "num_return_sequences)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the sphkv cache cannot select batch rows")

    def offload(self):
        pass

    def prefetch(self):
        pass

    # ---- accounting ---------------------------------------------------------------------------
    def tokens(self) -> int:
        return int(self.cumulative_length) if self.max_cache_len is not None else self.seen

    def resident_bytes(self) -> int:
        """Every byte of the store: pools (records), their metadata, the meter and the key mean."""
        if self.store is None:
            return 0
        mean_bytes = self.key_mean.numel() * self.key_mean.element_size()
        return self.store.resident_bytes() + self.meter.numel() * 8 + mean_bytes

    def budget_report(self) -> dict:
        """What the budgeting node measured, plus the bytes of pages in use (rdr.node.measure)."""
        st = self.store
        return measure(st.states, st.tiers, self.meter, head_dim=st.head_dim, seed=st.seed, kv_dtype=st.kv_dtype)

    def dense_bytes(self) -> int:
        if self.store is None:
            return 0
        return 2 * self.store.batch * self.store.kv_heads * self.tokens() * self.head_dim * 2  # the model's head dim


def storage_dtype(requested: torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The exact tier's dtype: as requested, else the model's if it is 16-bit, else bfloat16
    (a float32 model would otherwise keep its sinks and recent window at twice the bytes of the
    dense 16-bit cache the budget is measured against)."""
    if requested is not None:
        return requested
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _model_layers(config, max_cache_len: int | None) -> list | None:
    """The layers transformers' own cache builds for this config (dynamic, or static with this
    capacity), or None where it cannot build them from a config. Hybrid models (linear
    attention, Mamba, convolution layers) keep state other than K/V in some layers, and only
    transformers' layer classes for those layer types hold it."""
    from transformers import cache_utils as cu

    try:
        if max_cache_len is None:
            return list(cu.DynamicCache(config=config).layers)
        return list(cu.StaticCache(config=config, max_cache_len=max_cache_len).layers)
    except Exception:  # older transformers, or a config its caches cannot read: plain K/V layers
        return None


def _dense_layer(plan: LayerPlan, max_cache_len: int | None) -> CacheLayerMixin:
    """A K/V layer (sliding where the plan says so) for a layer that stays dense, where
    transformers' own cache gives none (_model_layers)."""
    from transformers import cache_utils as cu

    if plan.sliding_window is not None:
        if max_cache_len is None:
            return cu.DynamicSlidingWindowLayer(sliding_window=plan.sliding_window)
        return cu.StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=plan.sliding_window)
    return DynamicLayer() if max_cache_len is None else StaticLayer(max_cache_len=max_cache_len)


def _dense_layer_bytes(layer: CacheLayerMixin) -> tuple[int, int]:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or not isinstance(keys, torch.Tensor):
        return 0, 0
    held = keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return held, (keys.numel() + values.numel()) * 2


class SphkvCache(Cache):
    """The cache for a model prepared by sphkv_compile.optimize (pass it as the model's cache).

    plans: one hf_plan.LayerPlan per decoder layer. max_cache_len: None for a dynamic cache,
    else the static capacity (prompt + new tokens)."""

    def __init__(self, options: SphkvOptions, plans: list[LayerPlan], max_cache_len: int | None = None,
                 kv_geometries: list[tuple[int, int]] | None = None, kv_dtype: torch.dtype | None = None,
                 config=None):
        self.options = options
        self.plans = plans
        self.capacity = max_cache_len  # not `max_cache_len`: a read-only property on older Cache classes
        own = _model_layers(config, max_cache_len) if config is not None else None
        if own is not None and len(own) != len(plans):
            own = None
        layers = [SphkvLayer(options, p.layer_idx, max_cache_len, p.sliding_window, kv_dtype) if p.compressed
                  else own[i] if own else _dense_layer(p, max_cache_len) for i, p in enumerate(plans)]
        super().__init__(layers=layers)
        for layer in self.compressed_layers():
            layer.owner = weakref.ref(self)
        for kv_heads, head_dim in kv_geometries or ():  # of the compressed layers (hf_plan.compressed_geometries)
            # the exact tier is 16-bit unless asked otherwise (storage_dtype)
            rdr.check_budget(options, kv_heads, head_dim, kv_dtype or torch.bfloat16, max_cache_len)
            warn_if_allocation_is_long(options, kv_heads, max_cache_len)
        _track(self)

    @property
    def is_compileable(self) -> bool:
        return self.capacity is not None

    def __deepcopy__(self, memo):
        """A copy whose layers belong to it: transformers' prompt reuse deep-copies a prefilled
        cache per request, and a layer's weak reference to its cache (SphkvLayer.owner, which
        the step's pool reservation follows to its sibling layers) would otherwise still name
        the original."""
        new = memo[id(self)] = type(self).__new__(type(self))
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        for layer in new.compressed_layers():
            layer.owner = weakref.ref(new)
        _track(new)  # report() measures the cache made last, which the copy is
        return new

    def compressed_layers(self) -> list[SphkvLayer]:
        return [layer for layer in self.layers if isinstance(layer, SphkvLayer)]

    @torch._dynamo.disable
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row i of every layer continues beam beam_idx[i]. The compressed
        layers go together (store.select_rows_of: one read back checks all of them, and the
        page copies of all layers share their gathers), their meters follow, together too; other
        layers reorder as transformers' do."""
        filled = [layer for layer in self.compressed_layers() if layer.store is not None and layer.stored_any]
        for layer in filled:
            layer.reserved_for = None  # rows' token counts change
        select_rows_of([layer.store for layer in filled], beam_idx,
                       can_grow=all(layer.max_cache_len is None for layer in filled))
        budget_meter.select_rows_of([layer.meter for layer in filled], beam_idx)
        select_key_mean_rows_of([layer.key_mean for layer in filled], beam_idx)
        for layer in filled:
            cache_crop.reorder_rows(layer, beam_idx)
        for layer in self.layers:
            if not isinstance(layer, SphkvLayer):
                layer.reorder_cache(beam_idx)

    @torch._dynamo.disable
    def crop(self, tokens_to_remove: int) -> None:
        """Every layer drops its newest tokens (SphkvLayer.crop). The compressed layers are all
        checked first, with one read back per device, and change last, so a crop that a
        compressed layer cannot make leaves every layer as it was."""
        counts = {id(layer): layer._tokens_to_crop(tokens_to_remove) for layer in self.compressed_layers()}
        layers = [layer for layer in self.compressed_layers() if counts[id(layer)]]
        removable = {}
        for device in {layer.meter.device for layer in layers}:
            on = [layer for layer in layers if layer.meter.device == device]
            removable.update(zip(map(id, on), torch.stack([cache_crop.removable_newest(layer)
                                                           for layer in on]).tolist()))
        for layer in layers:
            layer._check_crop(counts[id(layer)], removable[id(layer)])
        for layer in self.layers:
            if not isinstance(layer, SphkvLayer):
                layer.crop(tokens_to_remove)
        for layer in layers:
            cache_crop.drop(layer, counts[id(layer)])

    def rebudget_due(self) -> int:
        """Between decode steps replayed from CUDA graphs (policy 'rdr'): every layer's re-budget
        check (SphkvLayer.rebudget_if_due), with one read back to the host for all layers' cadence
        counters (it runs after every step). Returns how many layers re-budgeted."""
        layers = [layer for layer in self.compressed_layers() if layer.rebudgets()]
        cadence = {}
        for device in {layer.meter.device for layer in layers}:  # one read per device (a model may span several)
            on = [layer for layer in layers if layer.meter.device == device]
            counters = torch.stack([cadence_counters(layer.meter) for layer in on]).tolist()
            cadence.update({id(layer): tuple(c) for layer, c in zip(on, counters)})
        return sum(layer.rebudget_if_due(cadence[id(layer)]) for layer in layers)

    def raise_if_over_budget(self) -> None:
        """A decode step replayed from a CUDA graph cannot stop at an excess; its budgeting node
        records the worst one on the device (rdr.node.budget_step) and this raises it, as it
        raises tokens such a step could not store (rdr.update.append_decode_token)."""
        if not self.options.budget:
            return
        for layer in self.compressed_layers():
            if layer.meter is None:
                continue
            counters = layer.meter[:budget_meter.SIZE].tolist()  # one read back per layer
            calls, budget, excess, lost = (counters[i] for i in (budget_meter.CALLS, budget_meter.BUDGET,
                                                                 budget_meter.MAX_EXCESS, budget_meter.LOST))
            if budget > 0 and excess > 0:
                raise over_budget_error(budget + excess, budget, self.options.policy, calls)
            if lost > 0:
                raise SphkvBudgetError(
                    f"sphkv: layer {layer.layer_idx} could not store {lost} decode tokens: its exact tier was "
                    f"full between re-budgets (policy 'rdr', update {calls}). The re-budget check runs between "
                    "decode steps replayed from CUDA graphs (SphkvCache.rebudget_due, called by optimize()'s "
                    "generate()); a decode loop of your own must call it after every step. Fix: call "
                    "cache.rebudget_due() after each step, or pass compile_config=CompileConfig(mode='default').")

    def head_dim_padding(self) -> dict | None:
        """report()["head_dim_padding"]: the first compressed layer whose store holds its head dim
        zero-padded (head_pad.py), or None."""
        layers = [layer for layer in self.compressed_layers() if layer.store is not None]
        return next((found for found in (padding_report(layer.head_dim, layer.store.head_dim) for layer in layers)
                     if found), None)

    def kv_bytes(self) -> tuple[int, int]:
        """(resident bytes of every layer's KV: compressed stores and dense fallbacks,
        what a dense 16-bit cache would hold for the same tokens)."""
        held = dense = 0
        for layer in self.layers:
            if isinstance(layer, SphkvLayer):
                held += layer.resident_bytes()
                dense += layer.dense_bytes()
            else:
                h, d = _dense_layer_bytes(layer)
                held, dense = held + h, dense + d
        return held, dense


# ---- report: the live cache's measured bytes ------------------------------------------------
_latest: "weakref.ref[SphkvCache] | None" = None
_snapshot: tuple[int, int] = (0, 0)
_snapshot_padding: dict | None = None


def snapshot_kv_bytes(cache: SphkvCache) -> None:
    """Remember the cache's bytes and padding (at the end of a generate call, before it is freed)."""
    global _snapshot, _snapshot_padding
    if _latest is not None and _latest() is cache:
        _snapshot = cache.kv_bytes()
        _snapshot_padding = cache.head_dim_padding()


def _latest_kv_bytes() -> tuple[int, int]:
    cache = _latest() if _latest is not None else None
    return _snapshot if cache is None else cache.kv_bytes()


def _latest_padding() -> dict | None:
    cache = _latest() if _latest is not None else None
    return _snapshot_padding if cache is None else cache.head_dim_padding()


@contextlib.contextmanager
def tracking_preserved():
    """The cache report() measures (and its snapshot), restored on exit (optimize()'s trial forward)."""
    global _latest, _snapshot, _snapshot_padding
    saved = (_latest, _snapshot, _snapshot_padding)
    try:
        yield
    finally:
        _latest, _snapshot, _snapshot_padding = saved


def _track(cache: SphkvCache) -> None:
    """report() measures the most recently created cache (the one generate is using)."""
    global _latest, _snapshot, _snapshot_padding
    _latest = weakref.ref(cache)
    _snapshot, _snapshot_padding = (0, 0), None
    register_kv_source(_latest_kv_bytes, group="hf", padding=_latest_padding)  # kept once; makes the HF cache
    # what report() measures
