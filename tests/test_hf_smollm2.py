"""A 4k-token SmolLM2 generation on the compressed store: resident KV bytes within the budget
(plus the documented metadata) and no dense KV tensor held by the cache or left alive.

The model's first two decoder layers only (real weights, real KV geometry: 3 KV heads of
dim 64), so the test stays within the suite's time on two CPU cores."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import sphkv_compile
from sphkv_compile import api, rdr
from sphkv_compile.hf_cache import SphkvCache, SphkvLayer
from sphkv_compile.rdr.capacity import metadata_allowance_bytes

smollm2 = pytest.importorskip("sphkv_compile.smollm2")

PROMPT, NEW, BUDGET = 4096, 8, 0.25
# Documented metadata (store.TierState.metadata_bytes): a float16 utility per token slot plus
# int32 page tables, counts and free lists; about 1% of a dense 16-bit cache at head dim 64.
METADATA_FRACTION = 0.01


@pytest.fixture(scope="module")
def model_and_ids():
    try:
        tokenizer, full = smollm2.load_smollm2()
    except smollm2.SmolLM2Unavailable as err:
        pytest.skip(str(err))
    model = copy.deepcopy(full)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model, smollm2.text_token_ids(PROMPT, tokenizer)


def _reachable_tensors(root, limit=100000):
    """Every tensor reachable from root through attributes, lists, tuples and dicts."""
    seen, found, stack = set(), [], [root]
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            stack.extend(vars(obj).values())
    return found


def _dense_kv_like(t: torch.Tensor, tokens: int, head_dim: int) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == head_dim and t.shape[-2] >= tokens


def test_4k_generation_within_budget_and_no_dense_kv(model_and_ids):
    model, ids = model_and_ids
    fast = api.optimize(copy.deepcopy(model), budget=BUDGET, bits=3.5, sink=4, recent=60)
    key = api.cache_keyword(fast)
    cache = api.new_cache(fast, max_cache_len=PROMPT + NEW)
    with torch.no_grad():
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False, **{key: cache})
    assert out.shape[1] == PROMPT + NEW
    assert isinstance(cache, SphkvCache)
    layers = cache.compressed_layers()
    assert len(layers) == len(cache.layers) == 2  # every layer is on the store
    head_dim = layers[0].store.head_dim
    for layer in layers:
        store = layer.store
        dense = layer.dense_bytes()
        assert layer.tokens() == PROMPT + NEW - 1  # the last generated token is never fed back
        assert store.record_bytes() <= BUDGET * dense, (store.record_bytes(), dense)
        assert store.metadata_bytes() <= METADATA_FRACTION * dense, (store.metadata_bytes(), dense)
        assert store.resident_bytes() == store.record_bytes() + store.metadata_bytes()
        counts = store.token_counts()
        assert counts["exact"] == 64 * store.batch * store.kv_heads  # sinks + recent window
    held, dense_total = cache.kv_bytes()
    assert held <= (BUDGET + METADATA_FRACTION) * dense_total
    assert api.report()["kv_bytes"] == held

    # No dense KV: nothing reachable from the cache looks like [.., tokens, head_dim] floats,
    # and every tensor it holds is a page pool, a table or a small counter, or one of the
    # layers' keys/values placeholders, which hold no token at all ([B, H, 0, d]), or a layer's
    # key mean (one vector per row and KV head, key_centering.py: [B, H, 1, d]).
    placeholders = {id(t) for layer in layers for t in (layer.keys, layer.values)}
    means = {id(layer.key_mean) for layer in layers}
    for t in _reachable_tensors(cache):
        assert not _dense_kv_like(t, 256, head_dim), tuple(t.shape)
        if id(t) in placeholders:
            assert t.numel() == 0 and t.shape[-2:] == (0, head_dim), tuple(t.shape)
            continue
        if id(t) in means:
            assert t.shape == (1, 3, 1, head_dim), tuple(t.shape)  # SmolLM2: 3 KV heads, batch 1
            continue
        assert t.dtype in (torch.int32, torch.int64, torch.float16), (t.dtype, tuple(t.shape))
    # ... and no such tensor is left alive anywhere once generate returned.
    gc.collect()
    params = {p.data_ptr() for p in fast.parameters()} | {b.data_ptr() for b in fast.buffers()}
    # plain tensors only: tracing leftovers of other tests (fake tensors) hold no memory
    leftovers = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)
                 and _dense_kv_like(o, PROMPT, head_dim) and o.data_ptr() not in params]
    assert not leftovers, [tuple(t.shape) for t in leftovers]


def test_4k_generation_under_rdr_within_budget_after_every_update(model_and_ids):
    """policy='rdr' at budget 1/8 of the static cache: the prefill is allocated into the budget
    (tokens dropped and demoted), decode re-budgets every rebudget_every steps. The meter
    records the token bytes after every update; the page tables are recounted at the end.
    The memory held (every tensor of the layer: pools, tables, meter) is the budget plus the
    documented metadata (rdr/capacity.py; tests/test_rdr_memory.py checks it at every step)."""
    model, ids = model_and_ids
    new, every = 24, 8
    fast = api.optimize(copy.deepcopy(model), policy="rdr", budget=1 / 8, sink=4, recent=28, rebudget_every=every)
    cache = api.new_cache(fast, max_cache_len=PROMPT + new)
    with torch.no_grad():
        fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, **{api.cache_keyword(fast): cache})
    timed = sphkv_compile.report()["rebudgets"]  # this generate()'s re-budgets, every layer's, timed
    layers = cache.compressed_layers()
    assert timed["prefill"]["count"] == len(layers)  # the prompt exceeds the budget in every layer
    assert timed["prefill"]["count"] + timed["decode"]["count"] == sum(l.budget_report()["rebudgets"] for l in layers)
    assert timed["prefill"]["host_seconds"] > 0 and timed["decode"]["host_seconds"] > 0
    for layer in layers:
        r = layer.budget_report()
        budget = rdr.layer_budget_bytes(1 / 8, PROMPT + new, layer.store.kv_heads, layer.store.head_dim)
        assert r["budget_bytes"] == budget
        assert r["max_excess"] <= 0 and r["token_bytes"] <= budget
        assert r["page_bytes_in_use"] <= budget + r["page_slack_bytes"]
        assert r["rebudgets"] >= 1 + (new - 1) // every - 1  # the prefill, then every `every` steps
        assert r["entered"] == [PROMPT + new - 1]
        assert sum(r["tokens"].values()) < layer.store.kv_heads * (PROMPT + new - 1)
        st = layer.store
        held = layer.resident_bytes() + layer.cumulative_length.numel() * 8
        allowance = metadata_allowance_bytes(st.tiers, st.batch, st.kv_heads, st.head_dim, st.page_size, budget,
                                             seed=st.seed, kv_dtype=st.kv_dtype)
        assert held <= budget + allowance, (held, budget, allowance)
        print(f"layer {layer.layer_idx}: held {held}, budget {budget}, allowance {allowance}, dense "
              f"{layer.dense_bytes()}, records+utility {st.record_bytes() + sum(s.utility.numel() * 2 for s in st.states)}")
    for t in _reachable_tensors(cache):
        assert not _dense_kv_like(t, 256, layers_head_dim(cache)), tuple(t.shape)


def layers_head_dim(cache) -> int:
    return cache.compressed_layers()[0].store.head_dim
