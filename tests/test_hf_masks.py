"""Attention masks that say more than causal-over-padding: the compressed store computes causal
attention over the unpadded tokens and reads only a mask's last row (hf.chunk_validity), so a
mask whose other rows differ (bidirectional image or prefix tokens, a custom 4D mask) must be
refused, never answered causally; and a model whose attention is bidirectional stays dense."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from sphkv_compile import api
from sphkv_compile.hf import SphkvUnsupportedError, refuse_mask_beyond_causal_padding
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
def test_causal_masks_over_left_padding_pass_and_any_other_change_in_a_real_row_is_refused(case):
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
    refuse_mask_beyond_causal_padding(mask.clone(), _layer(past, capacity), n)
    # a real query row other than the last (the reference the rows are cut from), one entry flipped
    real = [(b, i) for b, pad in enumerate(pads) for i in range(n - 1) if past + i >= pad]
    if not real:
        return  # every earlier row is padding: nothing else to change
    b, i = real[int(torch.randint(len(real), (1,), generator=g))]
    j = int(torch.randint(mask.shape[-1], (1,), generator=g))
    changed = mask.clone()
    changed[b, 0, i, j] = ~changed[b, 0, i, j]
    with pytest.raises(SphkvUnsupportedError, match="layer 3: the attention mask lets queries see more or fewer"):
        refuse_mask_beyond_causal_padding(changed, _layer(past, capacity), n)


def test_a_single_query_and_no_mask_are_not_checked():
    layer = _layer(4, None)
    refuse_mask_beyond_causal_padding(None, layer, 5)
    refuse_mask_beyond_causal_padding(torch.ones(1, 1, 1, 5, dtype=torch.bool), layer, 1)


@torch.no_grad()
def test_a_custom_4d_mask_with_a_bidirectional_block_is_refused_and_a_causal_one_runs():
    """A prompt whose tokens 2..5 see each other both ways (as image tokens do in Gemma 3): dense
    attention honours it; the store would have answered causally, so it refuses. The same call
    with a causal 4D mask gives dense's logits."""
    model = zoo.build(zoo.ZOO["llama"], 0)
    ids = torch.randint(3, zoo.VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    bidirectional = causal.clone()
    bidirectional[..., 2:6, 2:6] = True
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    keyword = api.cache_keyword(fast)
    dense = model(ids, attention_mask=causal).logits
    assert (model(ids, attention_mask=bidirectional).logits - dense).abs().max() > 1e-2  # the mask matters
    out = fast(ids, attention_mask=causal, **{keyword: api.new_cache(fast)}).logits
    assert torch.allclose(out, dense, atol=1e-5)
    with pytest.raises(SphkvUnsupportedError, match="only causal attention"):
        fast(ids, attention_mask=bidirectional, **{keyword: api.new_cache(fast)})


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
