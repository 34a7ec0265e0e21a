"""Keys stored centered on their row's and head's prefill mean (key_centering.py): attention is
unchanged for any mean (softmax cannot see one shift of every logit), the coded keys' error
shrinks when the keys share a large mean, and the mean follows the cache (reset, beam reorder)
without letting a non-finite key poison a row."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from sphkv_compile import api
from sphkv_compile.key_centering import centered, new_key_mean, select_rows_, select_rows_of, set_key_mean_
from sphkv_compile.options import SphkvOptionsError
from tests import test_zoo as zoo


def _llama(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            attention_bias=bias, pad_token_id=0)
    model = tf.LlamaForCausalLM(config).eval()
    if bias:  # keys with a large common mean, as real models' post-RoPE keys have
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 3.0)
    return model


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.integers(0, 6), st.integers(0, 2**31 - 1),
       st.booleans(), st.booleans())
def test_the_mean_is_over_each_rows_real_tokens_after_its_sinks(batch, heads, tokens, sink, seed, padded, poisoned):
    """μ: per row and head, the mean of the real (unpadded) tokens after the row's first `sink`
    real ones whose keys are finite; zero where a row has none. float64 reference."""
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(batch, heads, tokens, 8, generator=g, dtype=torch.float64) * 5 + 3
    valid = None
    if padded:
        lengths = torch.randint(0, tokens + 1, (batch,), generator=g)
        valid = torch.arange(tokens)[None, :] >= (tokens - lengths)[:, None]  # left padding
    if poisoned:
        key[0, 0, torch.randint(0, tokens, (1,), generator=g)] = float("nan")
    mean = new_key_mean(batch, heads, 8, "cpu")
    set_key_mean_(mean, key, valid, sink)
    for b in range(batch):
        real = torch.arange(tokens) if valid is None else valid[b].nonzero().flatten()
        kept = real[sink:]
        for h in range(heads):
            rows = key[b, h, kept]
            rows = rows[torch.isfinite(rows).all(-1)]
            expected = rows.mean(0) if len(rows) else torch.zeros(8, dtype=torch.float64)
            torch.testing.assert_close(mean[b, h, 0].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(mean).all()


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True])
def test_attention_is_unchanged_when_every_key_is_exact(static):
    """With the window holding every token nothing is coded: centered and plain keys give the
    same logits up to float32 rounding (the shift is invisible to softmax), as dense does."""
    model = _llama(bias=True)
    ids = torch.randint(3, 128, (2, 30))
    dense = model(ids).logits
    for center in (True, False):
        m = api.optimize(model, bits=3.5, sink=4, recent=64, kv_dtype=torch.float32, center_keys=center)
        cache = api.new_cache(m, max_cache_len=40) if static else api.new_cache(m)
        out = m(ids, past_key_values=cache).logits
        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
        step = m(ids[:, :1], past_key_values=cache).logits  # a decode step over the stored keys
        assert torch.isfinite(step).all()


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centering_cuts_the_coded_keys_error_when_keys_share_a_mean(seed):
    """Keys with a large common mean (k_proj bias): at 3.5 bits the logits of a decode step over
    coded keys are closer to dense's with centering than without, every seed."""
    model = _llama(bias=True, seed=seed)
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(seed))
    prompt, step = ids[:, :-1], ids[:, -1:]
    dense_cache = tf.DynamicCache(config=model.config)
    model(prompt, past_key_values=dense_cache)
    dense = model(step, past_key_values=dense_cache).logits.double()
    errors = {}
    for center in (True, False):
        m = api.optimize(model, bits=3.5, sink=4, recent=16, kv_dtype=torch.float32, center_keys=center)
        cache = api.new_cache(m)
        m(prompt, past_key_values=cache)
        errors[center] = (m(step, past_key_values=cache).logits.double() - dense).norm().item()
    assert errors[True] < errors[False], errors


@torch.no_grad()
def test_the_mean_follows_reset_and_beam_reorder_and_stays_zero_with_sink_logits():
    model = api.optimize(_llama(bias=True), bits=3.5)
    ids = torch.randint(3, 128, (3, 24))
    cache = api.new_cache(model, max_cache_len=32)
    model(ids, past_key_values=cache)
    layer = cache.compressed_layers()[0]
    before = layer.key_mean.clone()
    assert before.abs().sum() > 0 and not torch.equal(before[0], before[1])
    address = layer.key_mean.data_ptr()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.key_mean, before[[2, 0, 0]]) and layer.key_mean.data_ptr() == address
    cache.reset()
    assert layer.key_mean.abs().sum() == 0 and layer.key_mean.data_ptr() == address

    # gpt-oss's learned sink logits are one more logit on no key: the shift would move them
    # against the keys' logits, so those layers keep their keys as they are
    seed = zoo.SEED_ORDER.index("gpt_oss")
    gpt_oss = api.optimize(zoo.build(zoo.ZOO["gpt_oss"], seed), **zoo.DEFAULT_BITS)
    ids, mask = zoo.prompts(seed)
    cache = api.new_cache(gpt_oss)
    gpt_oss.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache)
    layers = cache.compressed_layers()
    assert layers and all(layer.key_mean.abs().sum() == 0 for layer in layers)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from([(2, 8, torch.float32), (3, 4, torch.bfloat16), (2, 8, torch.float16)]),
                min_size=1, max_size=6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_many_layers_means_move_together_as_each_would_alone(kinds, batch, seed):
    """select_rows_of (one gather per group of like tensors) gives every layer's μ what its own
    select_rows_ would, in place, whatever mix of shapes and dtypes the layers have."""
    g = torch.Generator().manual_seed(seed)
    means = [torch.randn(batch, h, 1, d, generator=g).to(dtype) for h, d, dtype in kinds]
    rows = torch.randint(0, batch, (batch,), generator=g)
    expected = [m.clone() for m in means]
    for m in expected:
        select_rows_(m, rows)
    addresses = [m.data_ptr() for m in means]
    select_rows_of(means, rows)
    for got, want, address in zip(means, expected, addresses):
        assert torch.equal(got, want) and got.data_ptr() == address


def test_center_keys_must_be_a_bool():
    with pytest.raises(SphkvOptionsError, match="center_keys"):
        api.optimize(_llama(bias=False), center_keys="yes")


def test_centered_keeps_the_dtype():
    key = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16) + 10
    mean = torch.full((1, 1, 1, 8), 10.0)
    out = centered(key, mean)
    assert out.dtype == torch.bfloat16 and out.float().abs().mean() < 2


# the backend's rewrite of plain modules (torch.compile(model, backend="sphkv")) --------------

def _gpt_fast_with_key_bias(seed: int):
    """gpt-fast-style model whose keys share a large mean: its fused qkv projection gets a
    bias on the key rows only."""
    from tests.models import gpt_fast
    torch.manual_seed(seed)
    model = gpt_fast.GPTFast().eval()
    c = model.cfg
    for block in model.blocks:
        old = block.attn.wqkv
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.zero_()
            new.bias[c.heads * c.head_dim:(c.heads + c.kv_heads) * c.head_dim].normal_(0, 3.0)
        block.attn.wqkv = new
    model.setup_caches(1)
    return model


def _recorded_keys(model, prompt):
    """The keys each layer writes for the prompt, in an uncompiled prefill: [1, Hkv, T, d]."""
    keys = []
    for block in model.blocks:
        update = block.attn.kv_cache.update
        block.attn.kv_cache.update = (lambda pos, k, v, update=update: (keys.append(k.clone()), update(pos, k, v))[1])
    with torch.no_grad():
        model(prompt, torch.arange(prompt.shape[1]))
    for block in model.blocks:
        del block.attn.kv_cache.update
    return keys


@torch.no_grad()
@pytest.mark.parametrize("center", [True, False])
def test_the_backend_centers_on_the_prefill_mean_and_keeps_it_while_decoding(monkeypatch, center):
    from sphkv_compile.inductor_passes.stores import store_of
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    sink = 2
    model = _gpt_fast_with_key_bias(0)
    prompts = [torch.randint(0, model.cfg.vocab, (1, n), generator=torch.Generator().manual_seed(n)) for n in (16, 11)]
    expected = [_recorded_keys(model, p) for p in prompts]
    model.setup_caches(1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={"sink": sink, "recent": 4, "center_keys": center})
    for prompt, keys in zip(prompts, expected):  # the second prompt starts a new sequence at position 0
        T = prompt.shape[1]
        compiled(prompt, torch.arange(T))
        means = [store_of(block.attn.kv_cache.k_cache).key_mean.clone() for block in model.blocks]
        for mean, k in zip(means, keys):
            want = k[:, :, sink:].mean(2, keepdim=True) if center else torch.zeros_like(mean)
            torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-5)
        for i in range(3):  # decode steps leave μ where the prefill put it
            compiled(prompt[:, :1], torch.tensor([T + i]))
        for mean, block in zip(means, model.blocks):
            assert torch.equal(store_of(block.attn.kv_cache.k_cache).key_mean, mean)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_backend_centering_cuts_the_coded_keys_error(monkeypatch, seed):
    """Through the backend's rewrite, at 3.5 bits, decode logits over keys sharing a large mean
    are closer to dense's with centering than without, every seed (same forced tokens)."""
    from tests.models import gpt_fast
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    model = _gpt_fast_with_key_bias(seed)
    prompt = torch.randint(0, model.cfg.vocab, (1, 64), generator=torch.Generator().manual_seed(seed))
    tokens, dense = gpt_fast.generate(model, prompt, 12)
    errors = {}
    for center in (True, False):
        model.setup_caches(1)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sphkv", options={"bits": 3.5, "sink": 2, "recent": 4,
                                                                   "center_keys": center})
        _, logits = gpt_fast.generate(model, prompt, 12, compiled, forced=tokens)
        errors[center] = (logits.double() - dense.double()).norm().item()
    assert errors[True] < errors[False], errors


@torch.no_grad()
def test_a_dense_past_handed_to_the_backend_is_centered_as_it_is_ingested(monkeypatch):
    """nanoGPT's cat cache filled by the uncompiled model, then handed to the compiled one: the
    store takes the past whole, with μ from its keys after the sinks, and keeps μ through the
    next steps."""
    from sphkv_compile.inductor_passes.stores import store_of
    from tests.models import nanogpt
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    torch.manual_seed(8)
    model = nanogpt.NanoGPT().eval()
    prompt = torch.randint(0, model.cfg.vocab, (1, 20))
    _, past = model(prompt, model.empty_past(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={"sink": 2, "recent": 4})
    _, new_past = compiled(prompt[:, :1], past)
    for (k, _), (placeholder, _) in zip(past, new_past):
        mean = store_of(placeholder).key_mean
        torch.testing.assert_close(mean, k[:, :, 2:].mean(2, keepdim=True), rtol=1e-5, atol=1e-5)
    before = [store_of(p).key_mean.clone() for p, _ in new_past]
    compiled(prompt[:, 1:2], new_past)
    assert all(torch.equal(store_of(p).key_mean, b) for (p, _), b in zip(new_past, before))
