"""Attention masks that say more than causal-over-padding (bidirectional image or prefix tokens,
a custom 4D mask): the store reads only a mask's last row (hf.chunk_validity), so such a mask is
detected (hf.mask_is_causal_over_padding). A prefill into an empty store honours it exactly
(dense attention over the chunk, hf.prefill_mask); after tokens are stored it is refused, never
answered causally. A model whose attention is bidirectional stays dense."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from sphkv_compile import api
from sphkv_compile.hf import SphkvUnsupportedError, mask_is_causal_over_padding
from tests import test_zoo as zoo


def _causal_padded_mask(pads: list[int], past: int, n: int, capacity: int | None) -> torch.Tensor:
    """transformers' 4D boolean mask [B, 1, n, kv] for a chunk of n queries after `past` tokens,
    row b left-padded by pads[b] tokens; kv = past + n (dynamic) or the static capacity."""
    kv = capacity or past + n
    cols = torch.arange(kv)
    qpos = past + torch.arange(n)
    rows = [(cols[None, :] <= qpos[:, None]) & (cols[None, :] >= pad) for pad in pads]
    return torch.stack(rows)[:, None]


def _layer(past: int, capacity: int | None):
    return SimpleNamespace(layer_idx=3, max_cache_len=capacity, cumulative_length=torch.tensor(past))


masks = st.fixed_dictionaries({
    "pads": st.lists(st.integers(0, 6), min_size=1, max_size=3),
    "past": st.integers(0, 9),
    "n": st.integers(2, 12),
    "static_room": st.none() | st.integers(0, 5),
    "seed": st.integers(0, 2**31 - 1),
})


@settings(max_examples=60, deadline=None)
@given(masks)
def test_causal_masks_over_left_padding_pass_and_any_other_change_in_a_real_row_is_detected(case):
    pads, past, n = case["pads"], case["past"], case["n"]
    pads = [min(p, past + n - 1) for p in pads]  # the last token is always real (left padding)
    capacity = None if case["static_room"] is None else past + n + case["static_room"]
    mask = _causal_padded_mask(pads, past, n, capacity)
    g = torch.Generator().manual_seed(case["seed"])
    # padded query rows may hold anything (transformers unmasks fully masked rows for SDPA)
    for b, pad in enumerate(pads):
        for i in range(n):
            if past + i < pad:
                mask[b, 0, i] = torch.rand(mask.shape[-1], generator=g) < 0.5
    assert mask_is_causal_over_padding(mask.clone(), _layer(past, capacity), n)
    # a real query row other than the last (the reference the rows are cut from), one entry flipped
    real = [(b, i) for b, pad in enumerate(pads) for i in range(n - 1) if past + i >= pad]
    if not real:
        return  # every earlier row is padding: nothing else to change
    b, i = real[int(torch.randint(len(real), (1,), generator=g))]
    j = int(torch.randint(mask.shape[-1], (1,), generator=g))
    changed = mask.clone()
    changed[b, 0, i, j] = ~changed[b, 0, i, j]
    assert not mask_is_causal_over_padding(changed, _layer(past, capacity), n)


def test_a_single_query_and_no_mask_are_not_checked():
    layer = _layer(4, None)
    assert mask_is_causal_over_padding(None, layer, 5)
    assert mask_is_causal_over_padding(torch.ones(1, 1, 1, 5, dtype=torch.bool), layer, 1)


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True])
def test_a_bidirectional_block_in_the_prefill_is_honoured_and_refused_after_stored_tokens(static):
    """Prompt tokens 2..5 see each other both ways (as image tokens do in Gemma 3): dense attention
    honours it, and so does the store's prefill (dense over the chunk); the next decode step, one
    token, equals dense's too. A chunk of several tokens with such a mask after stored tokens is
    refused: there the store would answer causally."""
    model = zoo.build(zoo.ZOO["llama"], 0)
    ids = torch.randint(3, zoo.VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    bidirectional = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    bidirectional[..., 2:6, 2:6] = True
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    keyword = api.cache_keyword(fast)
    dense_cache = tf.DynamicCache(config=model.config)
    dense = model(ids[:, :10], attention_mask=bidirectional, **{keyword: dense_cache}).logits
    causal = model(ids[:, :10]).logits
    assert (dense - causal).abs().max() > 1e-2  # the mask matters
    cache = api.new_cache(fast, max_cache_len=16) if static else api.new_cache(fast)
    width = 16 if static else 10  # a static cache's mask spans its capacity
    prefill = torch.zeros(1, 1, 10, width, dtype=torch.bool)
    prefill[..., :10] = bidirectional
    out = fast(ids[:, :10], attention_mask=prefill, **{keyword: cache}).logits
    assert torch.allclose(out, dense, atol=1e-5)
    step = torch.zeros(1, 1, 1, width if static else 11, dtype=torch.bool)
    step[..., :11] = True
    dense_step = model(ids[:, 10:], attention_mask=torch.ones(1, 1, 1, 11, dtype=torch.bool),
                       **{keyword: dense_cache}).logits
    out_step = fast(ids[:, 10:], attention_mask=step, **{keyword: cache}).logits
    # the step reads the prompt from 12-bit codes: relative logit error below 1e-3, as the sink test
    # in test_zoo states for these codes; had the prefill been causal the step would move 100x more
    step_error = ((out_step - dense_step).norm() / dense_step.norm()).item()
    causal_step = model(ids[:, 10:], **{keyword: _causal_cache(model, ids[:, :10], keyword)}).logits
    assert step_error < 1e-3 and ((causal_step - dense_step).norm() / dense_step.norm()).item() > 100 * step_error
    chunk = torch.zeros(1, 1, 3, width if static else 14, dtype=torch.bool)
    chunk[..., :14] = torch.ones(14, 14, dtype=torch.bool).tril()[-3:]
    chunk[..., 0, 12] = True  # the first new token sees the one after it
    with pytest.raises(SphkvUnsupportedError, match="only in the prefill of an empty cache"):
        fast(ids[:, :3], attention_mask=chunk, **{keyword: cache})


def _causal_cache(model, prompt, keyword):
    cache = tf.DynamicCache(config=model.config)
    model(prompt, **{keyword: cache})
    return cache


def test_a_bidirectional_model_stays_dense_with_the_reason():
    """Gemma 3 with use_bidirectional_attention (EmbeddingGemma's setting): before the plan knew,
    generate() ran it causally on the store and its tokens differed from dense's."""
    config = lambda: tf.Gemma3TextConfig(**zoo._common(  # noqa: E731
        hidden_size=zoo.HIDDEN, intermediate_size=2 * zoo.HIDDEN, num_hidden_layers=zoo.LAYERS,
        num_attention_heads=zoo.HEADS, num_key_value_heads=2, head_dim=zoo.HIDDEN // zoo.HEADS,
        max_position_embeddings=256, sliding_window=512, use_bidirectional_attention=True))
    model = zoo.build(config, 0)
    ids, mask = zoo.prompts(0)
    dense = zoo.greedy(model, ids, mask)
    out = zoo.greedy(zoo.optimized(model, **zoo.HIGH_BITS), ids, mask)
    sites = api.report()["sites"]
    assert sites and not any(s["rewritten"] for s in sites)
    assert all("Gemma3Attention is not causal" in s["reason"] for s in sites), sites
    assert torch.equal(out, dense)


@torch.no_grad()
def test_gemma3_image_tokens_attend_both_ways_in_the_prefill(monkeypatch):
    """A tiny Gemma 3 vision-language model with one image: its image tokens see each other both
    ways (token_type_ids). The prefill honours that mask, so generate() gives dense's tokens on
    both caches; the control answers the prefill causally and its logits move far more."""
    import copy

    from sphkv_compile import hf

    text = tf.Gemma3TextConfig(**zoo._common(
        hidden_size=zoo.HIDDEN, intermediate_size=2 * zoo.HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, sliding_window=512))
    vision = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=56, patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=5,
                             boi_token_index=6, eoi_token_index=7)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(10, zoo.VOCAB, (1, 14), generator=torch.Generator().manual_seed(1))
    ids[0, 3], ids[0, 4:8], ids[0, 8] = 6, 5, 7  # <boi>, four image tokens, <eoi>
    inputs = dict(pixel_values=torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2)),
                  token_type_ids=(ids == 5).long(), attention_mask=torch.ones_like(ids))
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, **inputs)
    dense = model.generate(ids, **kw)
    fast = api.optimize(copy.deepcopy(model), **zoo.HIGH_BITS)
    honoured = []
    real = hf.prefill_mask
    monkeypatch.setattr(hf, "prefill_mask", lambda *a: honoured.append(a[2]) or real(*a))
    for static in (False, True):
        out = fast.generate(ids, **kw, **({"cache_implementation": "static"} if static else {}))
        assert torch.equal(out, dense), static
        assert all(s["rewritten"] for s in api.report()["sites"])
    assert honoured and set(honoured) == {14}  # each layer's prefill, 14 tokens
    keyword = api.cache_keyword(fast)
    want = model(ids, **inputs).logits
    got = fast(ids, **inputs, **{keyword: api.new_cache(fast)}).logits
    monkeypatch.setattr(hf, "prefill_mask", lambda *a: None)  # the control: the prefill answered causally
    causal = fast(ids, **inputs, **{keyword: api.new_cache(fast)}).logits
    assert (got - want).abs().max() < 1e-5 < 1e-2 < (causal - want).abs().max()
