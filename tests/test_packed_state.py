"""A store packed into one arena (packed_state.py) against the same store unpacked: the custom
ops read and write the same tokens through the arena's views, a grown or rebuilt tier packs
again, and a state list that does not match its layout is refused by name."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import DTYPES
from sphkv_compile import packed_state
from sphkv_compile.ops import tiers_arg, unflatten_state
from sphkv_compile.store import UTILITY_DTYPE, LayerStore, TierState, gather_tokens
from sphkv_compile.tiers import DEFAULT_TIERS

SEED = 0


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def fixed_store(batch, kv_heads, d, dtype, tokens, page_size=16) -> LayerStore:
    store = LayerStore(batch, kv_heads, d, DEFAULT_TIERS, kv_dtype=dtype, page_size=page_size, seed=SEED)
    per_head = -(-tokens // page_size) + 1
    store.allocate_packed([(batch * kv_heads * per_head, per_head)] * len(DEFAULT_TIERS))
    return store


def test_views_tile_the_arena_without_overlap_and_aligned():
    store = fixed_store(2, 3, 64, torch.bfloat16, 100)
    base = store.arena.data_ptr()
    spans = []
    for st_ in store.states:
        for t in st_.tensors():
            assert t.untyped_storage().data_ptr() == store.arena.untyped_storage().data_ptr()
            start = t.data_ptr() - base
            assert start % (4 * packed_state.ALIGN_WORDS) == 0, "every view starts on a 128-byte boundary"
            spans.append((start, start + t.numel() * t.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "views overlap"
    assert spans[-1][1] <= store.arena.numel() * 4
    assert store.op_state() == [store.arena]
    assert store.tiers_arg == tiers_arg(DEFAULT_TIERS, store.layout)


@given(batch=st.integers(1, 2), group=st.sampled_from([1, 4]), n=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=12, deadline=None)
def test_ops_on_the_arena_equal_the_ops_on_separate_tensors(batch, group, n, dtype, seed):
    """update_cache then attend through the packed state and through the same store's tensors
    passed one by one: the same tokens in every tier, bit for bit the same attention output
    (the ops' accuracy against dense is test_ops.py's and test_store.py's)."""
    d, hkv, sink, recent = 32, 2, 4, 16
    k, v = randn(batch, hkv, n, d, seed=seed, dtype=dtype), randn(batch, hkv, n, d, seed=seed + 1, dtype=dtype)
    q = randn(batch, hkv * group, 1, d, seed=seed + 2, dtype=dtype)
    kv_dtype = str(dtype).removeprefix("torch.")
    packed = fixed_store(batch, hkv, d, dtype, n + 1)
    loose = fixed_store(batch, hkv, d, dtype, n + 1)
    flat = [t.clone() for s in loose.states for t in s.tensors()]  # the same empty store, one tensor each
    plain = tiers_arg(DEFAULT_TIERS)
    torch.ops.sphkv.update_cache(packed.op_state(), k, v, None, None, packed.tiers_arg, SEED, kv_dtype, sink, recent, 1)
    torch.ops.sphkv.update_cache(flat, k, v, None, None, plain, SEED, kv_dtype, sink, recent, 1)
    for a, b in zip(packed.states, unflatten_state(flat, plain)):
        for x, y in zip(gather_tokens(a), gather_tokens(b)):
            assert torch.equal(x, y)
    out_p, mass_p = torch.ops.sphkv.attend(q, packed.op_state(), None, None, None, packed.tiers_arg, SEED, kv_dtype,
                                           d ** -0.5, 8, False)
    out_l, mass_l = torch.ops.sphkv.attend(q, flat, None, None, None, plain, SEED, kv_dtype, d ** -0.5, 8, False)
    assert torch.equal(out_p, out_l) and torch.equal(mass_p, mass_l)


def test_a_grown_tier_packs_again_with_its_tokens():
    store = fixed_store(1, 2, 32, torch.float32, 40)
    k, v = randn(1, 2, 40, 32, seed=1), randn(1, 2, 40, 32, seed=2)
    store.append(k, v, tier="exact")
    before = [gather_tokens(s) for s in store.states]
    old_arena = store.arena
    store.grow_tier(1, store.states[1].pool.shape[0] * 2, store.states[1].pages.shape[-1] * 2)
    assert store.arena is not old_arena and store.op_state() == [store.arena]
    assert store.states[1].pool.untyped_storage().data_ptr() == store.arena.untyped_storage().data_ptr()
    for a, b in zip(before, (gather_tokens(s) for s in store.states)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    got = unflatten_state(store.op_state(), store.tiers_arg)
    assert all(torch.equal(x, y) for a, b in zip(got, store.states) for x, y in zip(a.tensors(), b.tensors()))


def test_views_made_from_the_layout_alone_equal_the_stores():
    """An op handed an arena it has no cached views for (a clone) rebuilds them from the layout."""
    store = fixed_store(2, 2, 32, torch.float32, 30)
    store.append(randn(2, 2, 30, 32, seed=3), randn(2, 2, 30, 32, seed=4), tier="exact")
    twin = store.arena.clone()
    views = unflatten_state([twin], store.tiers_arg)
    for a, b in zip(views, store.states):
        for x, y in zip(a.tensors(), b.tensors()):
            assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            assert x.untyped_storage().data_ptr() == twin.untyped_storage().data_ptr()


def test_a_state_list_that_does_not_match_its_tiers_is_refused():
    store = fixed_store(1, 2, 32, torch.float32, 10)
    loose = [t for s in store.states for t in s.tensors()]
    with pytest.raises(ValueError, match="packed store state is one tensor"):
        unflatten_state(loose, store.tiers_arg)
    with pytest.raises(ValueError, match="store state has 1 tensors"):
        unflatten_state([store.arena], tiers_arg(DEFAULT_TIERS))
    with pytest.raises(ValueError, match="needs"):
        unflatten_state([store.arena[:10]], store.tiers_arg)
    with pytest.raises(ValueError, match="contiguous 1-D int32"):
        packed_state.make_views(store.arena.view(torch.float32), store.layout, UTILITY_DTYPE, TierState)


def test_a_fixed_cache_layer_hands_the_ops_one_tensor():
    """The transformers cache's fixed (static) layers are packed: their `state` is the arena."""
    import transformers as tf

    import sphkv_compile.api as sphkv

    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    model = sphkv.optimize(tf.LlamaForCausalLM(cfg).eval())
    cache = sphkv.new_cache(model, max_cache_len=96)
    ids = torch.randint(3, 100, (2, 40))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{sphkv.cache_keyword(model): cache})
    for layer in cache.compressed_layers():
        assert layer.state == [layer.store.arena]
        assert layer.op_tiers.endswith("@" + layer.store.layout)


def test_a_repacked_arena_stays_marked_for_cuda_graphs():
    """An arena marked as a static address (the fixed cache marks it) passes the mark on when a
    grown tier packs the store again, so CUDA graphs re-record on it instead of copying it."""
    store = fixed_store(1, 2, 32, torch.float32, 20)
    torch._dynamo.mark_static_address(store.arena)
    store.grow_tier(1, store.states[1].pool.shape[0] * 2, store.states[1].pages.shape[-1])
    assert store.arena._dynamo_static_input_type == "unguarded"


def test_beam_reorder_of_a_packed_store_moves_rows_in_its_arena():
    """select_rows on a fixed (packed) store keeps the arena and its views, and leaves the same
    tokens as the same store unpacked."""
    packed = fixed_store(3, 2, 32, torch.float32, 40)
    loose = LayerStore(3, 2, 32, DEFAULT_TIERS, kv_dtype=torch.float32, page_size=16, seed=SEED)
    k, v = randn(3, 2, 40, 32, seed=5), randn(3, 2, 40, 32, seed=6)
    for store in (packed, loose):
        store.append(k[:, :, :24], v[:, :, :24], tier="exact")
        store.append(k[:, :, 24:], v[:, :, 24:], tier="mid")
    arena, views = packed.arena, [t for s in packed.states for t in s.tensors()]
    rows = torch.tensor([2, 2, 0])
    packed.select_rows(rows, can_grow=False)
    loose.select_rows(rows)
    assert packed.arena is arena and all(a is b for a, b in zip(views, (t for s in packed.states for t in s.tensors())))
    for a, b in zip(packed.states, loose.states):
        for x, y in zip(gather_tokens(a), gather_tokens(b)):
            assert torch.equal(x, y)


def test_the_view_cache_lives_as_long_as_the_store_and_keys_on_the_dtype():
    import gc

    store = fixed_store(1, 2, 32, torch.float32, 10)
    key = (store.arena.device, store.arena.dtype, store.arena.data_ptr(), store.arena.numel(), store.layout)
    assert key in packed_state._VIEWS
    with pytest.raises(ValueError, match="contiguous 1-D int32"):  # not the cached int32 views
        unflatten_state([store.arena.view(torch.float32)], store.tiers_arg)
    store.pack()
    gc.collect()
    assert key not in packed_state._VIEWS, "a repacked arena's views are dropped"
    key = (store.arena.device, store.arena.dtype, store.arena.data_ptr(), store.arena.numel(), store.layout)
    del store
    gc.collect()
    assert key not in packed_state._VIEWS, "the views go with the store"


def test_resident_bytes_of_a_packed_store_are_its_arena():
    store = fixed_store(2, 2, 32, torch.bfloat16, 50)
    views = sum(t.numel() * t.element_size() for s in store.states for t in s.tensors())
    assert store.resident_bytes() == store.arena.numel() * 4
    assert views <= store.resident_bytes() <= views + packed_state.alignment_bytes(len(store.tiers))
    assert store.resident_bytes() == store.record_bytes() + store.metadata_bytes()
