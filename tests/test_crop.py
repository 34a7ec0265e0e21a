"""Removing the newest tokens (crop), which assisted and prompt-lookup decoding call after the
model rejects draft tokens: the store's page bookkeeping, then generate() against dense."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from sphkv_compile import api
from sphkv_compile import hf_cache
from sphkv_compile.hf import SphkvUnsupportedError
from sphkv_compile.store import LayerStore, drop_newest, gather_tokens, pages_for
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
    drop = hf_cache.SphkvLayer._drop_newest

    def spy(self, n):
        st = self.store
        coded = sum(int(s.count.sum()) for t, s in enumerate(st.states) if t != st.tier_index("exact"))
        seen.append((n, coded))
        return drop(self, n)

    monkeypatch.setattr(hf_cache.SphkvLayer, "_drop_newest", spy)
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
    naming the recent window; one within it works and the cache reports the shorter length."""
    fast = api.optimize(_model(), tiers=HIGH_BITS, sink=2, recent=4, kv_dtype=torch.float32)
    out = fast(torch.randint(3, 128, (1, 20)), use_cache=True)
    cache = out[api.cache_keyword(fast)] if api.cache_keyword(fast) in out else out["past_key_values"]
    with pytest.raises(SphkvUnsupportedError, match="recent"):
        cache.crop(-5)
    assert cache.get_seq_length() == 20  # checked before any layer changed
    cache.crop(-4)
    assert cache.get_seq_length() == 16
    with pytest.raises(ValueError, match="minus the number"):
        cache.crop(3)


@torch.no_grad()
def test_rdr_refuses_assisted_decoding_with_the_reason():
    fast = api.optimize(_model(), bits=3.5, policy="rdr", budget=0.5)
    ids = _repeating_prompt()
    for drafts in ({"prompt_lookup_num_tokens": 2}, {"assistant_model": _model(layers=1)}):
        with pytest.raises(ValueError, match="policy='uniform'"):
            fast.generate(ids, max_new_tokens=6, do_sample=False, **drafts)
    out = fast(ids, use_cache=True)
    cache = out[api.cache_keyword(fast)] if api.cache_keyword(fast) in out else out["past_key_values"]
    assert not cache.is_croppable
    with pytest.raises(SphkvUnsupportedError, match="policy='uniform'"):
        cache.crop(-1)


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
