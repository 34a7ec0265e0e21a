"""Removing the newest tokens (crop), which assisted and prompt-lookup decoding call after the
model rejects draft tokens: the store's page bookkeeping, then generate() against dense."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from sphkv_compile import api
from sphkv_compile import cache_crop
from sphkv_compile.hf import SphkvUnsupportedError
from sphkv_compile.store import LayerStore, drop_newest, gather_tokens, pages_for, split_exact
from sphkv_compile.tiers import DEFAULT_TIERS

HIGH_BITS = ("exact:exact", "hi:k12:polar12:r32")


@given(batch=st.integers(1, 3), heads=st.integers(1, 3), page_size=st.sampled_from([1, 4, 16]),
       chunks=st.lists(st.integers(1, 40), min_size=1, max_size=4), more=st.integers(0, 20),
       seed=st.integers(0, 2**31 - 1), data=st.data())
@settings(max_examples=30, deadline=None)
def test_drop_newest_keeps_the_oldest_tokens_and_frees_their_pages(batch, heads, page_size, chunks, more, seed, data):
    """Per head a random number of newest tokens goes: the others keep their records, utilities
    and order; pages past the kept tokens go back to the free stack (page tables and stack are
    disjoint and cover the pool); tokens appended afterwards follow the kept ones."""
    g = torch.Generator().manual_seed(seed)
    d = 32
    store = LayerStore(batch, heads, d, DEFAULT_TIERS, kv_dtype=torch.float32, page_size=page_size)
    for n in chunks:
        store.append(torch.randn(batch, heads, n, d, generator=g), torch.randn(batch, heads, n, d, generator=g))
    state = store.states[store.tier_index("exact")]
    total = sum(chunks)
    drop = torch.tensor(data.draw(st.lists(st.integers(0, total), min_size=batch * heads, max_size=batch * heads),
                                  label="drop")).view(batch, heads)
    before, before_util, _ = gather_tokens(state)
    drop_newest(state, drop)
    kept = total - drop
    assert torch.equal(state.count.to(torch.int64), kept)
    after, after_util, ok = gather_tokens(state)
    for b in range(batch):
        for h in range(heads):
            n = int(kept[b, h])
            assert torch.equal(after[b, h][ok[b, h]], before[b, h, :n])
            assert torch.equal(after_util[b, h][ok[b, h]], before_util[b, h, :n])
    held = pages_for(kept, page_size)
    slots = torch.arange(state.pages.shape[-1])
    assert bool(((state.pages >= 0) == (slots < held[..., None])).all())
    used = state.pages[state.pages >= 0].tolist()
    free = state.free[: int(state.free_top[0])].tolist()
    assert sorted(used + free) == list(range(state.pool.shape[0]))
    if more:
        k, v = torch.randn(batch, heads, more, d, generator=g), torch.randn(batch, heads, more, d, generator=g)
        store.append(k, v)  # may grow the pool: a new TierState
        records, _, ok = gather_tokens(store.states[store.tier_index("exact")])
        fresh = LayerStore(batch, heads, d, DEFAULT_TIERS, kv_dtype=torch.float32, page_size=page_size)
        fresh.append(k, v)
        new, _, _ = gather_tokens(fresh.states[fresh.tier_index("exact")])
        for b in range(batch):
            for h in range(heads):
                n = int(kept[b, h])
                row = records[b, h][ok[b, h]]
                assert torch.equal(row[:n], before[b, h, :n]) and torch.equal(row[n:], new[b, h])


def _model(layers=2, **kw):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2) | kw)
    return tf.LlamaForCausalLM(config).eval()


def _repeating_prompt(seed=0):
    """A prompt whose second half repeats its first, so prompt lookup finds drafts, some rejected."""
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :30]], 1)


@pytest.fixture
def crops(monkeypatch):
    """The tokens generate()'s crops remove from compressed layers, and whether codes were held then."""
    seen = []
    drop = cache_crop.drop

    def spy(layer, n):
        st = layer.store
        coded = sum(int(s.count.sum()) for t, s in enumerate(st.states) if t != st.tier_index("exact"))
        seen.append((n, coded))
        return drop(layer, n)

    monkeypatch.setattr(cache_crop, "drop", spy)
    return seen


@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_prompt_lookup_decoding_gives_dense_tokens(static, crops):
    """At 12-bit codes the compressed cache gives dense's greedy tokens with prompt lookup, which
    rejects drafts and crops the cache, while older tokens are held as codes."""
    model = _model()
    ids = _repeating_prompt()
    dense = model.generate(ids, max_new_tokens=40, do_sample=False)
    fast = api.optimize(copy.deepcopy(model), tiers=HIGH_BITS, sink=2, recent=16, kv_dtype=torch.float32)
    # transformers' own static cache needs room for one draft past max_length (it fails at exactly
    # prompt + max_new_tokens), so the static cache here is larger
    cache = {api.cache_keyword(fast): api.new_cache(fast, max_cache_len=160)} if static else {}
    out = fast.generate(ids, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=5, **cache)
    assert torch.equal(out, dense)
    assert crops, "no draft was rejected: the test did not exercise crop"
    assert all(n > 0 and coded > 0 for n, coded in crops)


@torch.no_grad()
def test_assisted_decoding_with_a_draft_model_gives_dense_tokens(crops):
    model = _model(layers=3)
    draft = _model(layers=1)
    draft.generation_config.num_assistant_tokens = 8  # transformers' default of 20 is more than recent=16
    ids = _repeating_prompt(seed=1)
    dense = model.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=draft)
    assert torch.equal(dense, model.generate(ids, max_new_tokens=30, do_sample=False))
    fast = api.optimize(copy.deepcopy(model), tiers=HIGH_BITS, sink=2, recent=16, kv_dtype=torch.float32)
    out = fast.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=draft)
    assert torch.equal(out, dense)
    assert crops


@torch.no_grad()
def test_crop_deeper_than_the_exact_tokens_names_the_fix():
    """Tokens held as codes cannot be removed by position: a crop that reaches them raises,
    naming the recent window, and changes nothing; one within it works and the cache reports the
    shorter length."""
    fast = api.optimize(_model(), tiers=HIGH_BITS, sink=2, recent=4, kv_dtype=torch.float32)
    out = fast(torch.randint(3, 128, (1, 20)), use_cache=True)
    cache = out[api.cache_keyword(fast)] if api.cache_keyword(fast) in out else out["past_key_values"]
    with pytest.raises(SphkvUnsupportedError, match="recent"):
        cache.crop(-5)
    assert cache.get_seq_length() == 20  # checked before any layer changed
    cache.crop(-2)
    assert cache.get_seq_length() == 18
    cache.crop(16)  # earlier transformers 5.x pass the length to keep
    assert cache.get_seq_length() == 16
    with pytest.raises(SphkvUnsupportedError, match="only the newest 0"):
        cache.crop(-1)  # the recent window is used up until new tokens come


def _exact_positions(layer) -> list[list[list[int]]]:
    """Per row and KV head, the positions (written into each key's first coordinate) of the
    exact tier's tokens, in their order there."""
    st = layer.store
    records, _, ok = gather_tokens(st.states[st.tier_index("exact")])
    keys, _ = split_exact(records, st.head_dim, st.kv_dtype)
    return [[[int(p) for p in keys[b, h][ok[b, h]][:, 0].tolist()] for h in range(keys.shape[1])]
            for b in range(keys.shape[0])]


@pytest.mark.parametrize("policy", ["uniform", "rdr"])
@given(steps=st.lists(st.tuples(st.sampled_from(["append", "crop"]), st.integers(1, 12)), min_size=1, max_size=14),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
@torch.no_grad()
def test_a_crop_the_check_allows_removes_only_the_newest_exact_tokens(policy, steps, seed):
    """Random appends and crops on one layer, each key carrying its position in its first
    coordinate: whenever the check (cache_crop.removable_newest) allows a crop of n, the exact
    tier's last n tokens are the newest n positions in order, and after the crop no tier holds
    a removed position; a crop it refuses changes nothing. Under 'rdr' a tight budget and a
    re-budget every 3 updates keep older exact tokens between the sinks and the newest."""
    from sphkv_compile import hf

    # center_keys off: the keys carry their positions, which the stored keys must show as given
    options = dict(sink=2, recent=6, kv_dtype=torch.float32, center_keys=False)
    if policy == "rdr":
        options |= dict(policy="rdr", budget=0.7, rebudget_every=3)
    fast = api.optimize(_model(), trial=False, **options)
    cache = api.new_cache(fast)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(seed)
    d, heads, kv_heads = 32, 4, 2
    length = 0
    for op, n in steps:
        if op == "append":
            key = torch.randn(1, kv_heads, n, d, generator=g)
            key[..., 0] = torch.arange(length, length + n, dtype=torch.float32)
            value, query = torch.randn(1, kv_heads, n, d, generator=g), torch.randn(1, heads, n, d, generator=g)
            if layer.store is None:
                layer.lazy_initialization(key, value)
            hf.attend_and_update(layer, query, key, value, None, d ** -0.5)
            length += n
            continue
        coded = [int(s.count.sum()) for s in layer.store.states] if layer.store is not None else None
        allowed = layer.store is not None and n <= int(cache_crop.removable_newest(layer))
        if not allowed:
            if layer.store is not None and n <= length:
                with pytest.raises(SphkvUnsupportedError, match="recent"):
                    cache.crop(-n)
                assert [int(s.count.sum()) for s in layer.store.states] == coded and layer.tokens() == length
            continue
        for row in _exact_positions(layer):
            for head in row:
                assert head[len(head) - n:] == list(range(length - n, length)), (head, n, length)
        cache.crop(-n)
        length -= n
        assert layer.tokens() == length
        for row in _exact_positions(layer):
            for head in row:
                assert all(p < length for p in head)
        exact = layer.store.tier_index("exact")
        assert [int(s.count.sum()) for t, s in enumerate(layer.store.states) if t != exact] == \
            [c for t, c in enumerate(coded) if t != exact]  # only the exact tier changed


@torch.no_grad()
def test_drafts_the_cache_cannot_crop_are_refused_before_the_prefill():
    ids = _repeating_prompt()
    fast = api.optimize(_model(), tiers=HIGH_BITS, sink=2, recent=4)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens <= 4"):
        fast.generate(ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=5)
    with pytest.raises(ValueError, match="num_assistant_tokens <= 4"):  # the draft model's default: 20
        fast.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=_model(layers=1))
    fast = api.optimize(_model(), tiers=HIGH_BITS, sink=2, recent=0)
    for drafts in ({"prompt_lookup_num_tokens": 2}, {"assistant_model": _model(layers=1)}):
        with pytest.raises(ValueError, match="recent=0"):
            fast.generate(ids, max_new_tokens=6, do_sample=False, **drafts)


@torch.no_grad()
def test_rdr_prompt_lookup_crops_between_rebudgets(crops):
    """Policy 'rdr' with prompt lookup, on a budget that re-budgets: crops remove rejected draft
    tokens while older tokens are held as codes, and generate() gives every token asked for
    (RDR drops tokens, so its tokens are not dense's; the property test above holds the crops
    to the newest exact tokens)."""
    fast = api.optimize(_model(), tiers=HIGH_BITS, sink=2, recent=8, policy="rdr", budget=0.5, rebudget_every=4)
    ids = _repeating_prompt()
    out = fast.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=5)
    assert out.shape == (1, ids.shape[1] + 40)
    # two layers: more than two re-budgets means some ran after the prompt's
    assert sum(kind["count"] for kind in api.report()["rebudgets"].values()) > 2
    assert crops and all(n > 0 and coded > 0 for n, coded in crops)


def _lookup_prompt(vocab: int):
    g = torch.Generator().manual_seed(1000)
    half = torch.randint(3, vocab, (1, 12), generator=g)
    return torch.cat([half, half, half[:, :6]], 1)


@pytest.mark.parametrize("name", ["llama", "falcon", "gemma2", "gpt_oss", "own_sdpa_llama", "qwen3_next"])
@torch.no_grad()
def test_zoo_prompt_lookup_gives_dense_tokens(name):
    """Prompt lookup on both cache kinds over the zoo's harder cases: SDPA calls routed to the
    store (Falcon before transformers 5.25, own_sdpa_llama), dense sliding layers beside
    compressed ones (Gemma2), sink logits (gpt-oss), linear-attention layers that crop their own
    state (Qwen3-Next). generate() sizes the static cache for prompt lookup's last draft."""
    from tests import test_zoo as zoo

    model = zoo.build(zoo.ZOO.get(name) or zoo.HYBRID_ZOO[name], 7)
    ids = _lookup_prompt(zoo.VOCAB)
    kw = dict(max_new_tokens=zoo.NEW, min_new_tokens=zoo.NEW, do_sample=False, pad_token_id=0)
    dense = model.generate(ids, **kw)
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    for cache in ("dynamic", "static"):
        out = fast.generate(ids, prompt_lookup_num_tokens=3, cache_implementation=cache, **kw)
        assert torch.equal(out, dense), f"{name}/{cache}: first mismatch at {(out != dense).nonzero()[0].tolist()}"


@torch.no_grad()
def test_a_static_cache_too_small_for_prompt_lookup_is_refused_up_front():
    fast = api.optimize(_model(), tiers=HIGH_BITS, sink=2, recent=16)
    ids = _repeating_prompt()
    cache = api.new_cache(fast, max_cache_len=ids.shape[1] + 20)  # enough without drafts
    with pytest.raises(ValueError, match="prompt lookup"):
        fast.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3,
                      **{api.cache_keyword(fast): cache})


@torch.no_grad()
def test_rdr_removes_nothing_once_a_replayed_step_lost_a_token():
    """A decode step replayed from a CUDA graph that could not store its token (the meter's
    lost count) breaks the run of newest exact tokens the meter counts: then no crop is allowed."""
    from sphkv_compile.rdr import meter as budget_meter

    fast = api.optimize(_model(), trial=False, tiers=HIGH_BITS, sink=2, recent=8, policy="rdr", budget=0.5)
    out = fast(_repeating_prompt(), use_cache=True)
    cache = out[api.cache_keyword(fast)] if api.cache_keyword(fast) in out else out["past_key_values"]
    layer = cache.compressed_layers()[0]
    assert int(cache_crop.removable_newest(layer)) > 0
    layer.meter[budget_meter.LOST] = 1
    assert int(cache_crop.removable_newest(layer)) == 0
    with pytest.raises(SphkvUnsupportedError, match="only the newest 0"):
        cache.crop(-1)


@torch.no_grad()
def test_a_dynamic_cache_cropped_to_empty_prefills_again():
    fast = api.optimize(_model(), trial=False, tiers=HIGH_BITS, sink=2, recent=16, kv_dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 10))
    out = fast(ids, use_cache=True)
    cache = out[api.cache_keyword(fast)] if api.cache_keyword(fast) in out else out["past_key_values"]
    cache.crop(-10)
    assert cache.get_seq_length() == 0 and not any(layer.stored_any for layer in cache.compressed_layers())
    again = fast(ids, use_cache=True, **{api.cache_keyword(fast): cache})
    torch.testing.assert_close(again.logits, out.logits)
