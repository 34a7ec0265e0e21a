"""Models whose attention does something the store cannot follow, found by probing every causal
LM transformers registers (benchmarks/probe_all_causal_lms.py): each must stay dense with the
reason in report(), or be refused with an error naming the cause, never answered wrongly."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from sphkv_compile import api
from sphkv_compile.hf import SphkvUnsupportedError
from tests import test_zoo as zoo


def _generate_both(config_fn):
    model = zoo.build(config_fn, 0)
    ids, mask = zoo.prompts(0)
    return zoo.greedy(model, ids, mask), lambda: zoo.greedy(zoo.optimized(model, **zoo.HIGH_BITS), ids, mask)


@pytest.mark.skipif(not hasattr(tf, "DiffLlamaConfig"), reason="transformers without DiffLlama")
def test_attention_called_twice_per_cache_update_is_refused():
    """DiffLlama calls attention twice per update, each time with half of the values: the store
    would keep the first call's values and store the chunk twice."""
    _, sphkv_run = _generate_both(lambda: zoo._llama_like(tf.DiffLlamaConfig))
    with pytest.raises(SphkvUnsupportedError, match="without a cache update before it"):
        sphkv_run()


@pytest.mark.skipif(not hasattr(tf, "JetMoeConfig"), reason="transformers without JetMoE")
def test_kv_heads_changed_between_update_and_attention_are_refused():
    """JetMoE tiles its KV heads top_k times after the cache update."""
    _, sphkv_run = _generate_both(lambda: tf.JetMoeConfig(**zoo._common(
        hidden_size=zoo.HIDDEN, num_hidden_layers=zoo.LAYERS, num_key_value_heads=2, kv_channels=64,
        intermediate_size=2 * zoo.HIDDEN, max_position_embeddings=256, num_local_experts=2, num_experts_per_tok=2)))
    with pytest.raises(SphkvUnsupportedError, match="reads keys with 4 heads of 64, but the cache update stored 2"):
        sphkv_run()


@pytest.mark.parametrize("name", ["bert", "mamba", "xlstm"])
def test_non_causal_and_attention_free_models_stay_dense_with_the_reason(name):
    """BertForCausalLM without is_decoder=True attends both ways (before, the mask check refused it
    mid-generate); Mamba has no attention heads (before, reading them raised AttributeError).
    xLSTM has none either and keeps its recurrent state in a cache class of its own: a model
    with no layer to compress gets no sphkv cache (before, generate() failed on sphkv's:
    'RoutedSphkvCache' object has no attribute 'rnn_state'; session 33's probe)."""
    if name == "xlstm" and not hasattr(tf, "xLSTMConfig"):
        pytest.skip("transformers without xLSTM")
    configs = {
        "xlstm": (lambda: tf.xLSTMConfig(**zoo._common(hidden_size=zoo.HIDDEN, embedding_dim=zoo.HIDDEN,
                                                       num_hidden_layers=zoo.LAYERS, num_blocks=zoo.LAYERS,
                                                       num_heads=4)), "no attention heads"),
        "bert": (lambda: tf.BertConfig(**zoo._common(hidden_size=zoo.HIDDEN, num_hidden_layers=zoo.LAYERS,
                                                     num_attention_heads=zoo.HEADS, intermediate_size=2 * zoo.HIDDEN,
                                                     max_position_embeddings=256)), "is not causal"),
        "mamba": (lambda: tf.MambaConfig(**zoo._common(hidden_size=zoo.HIDDEN, num_hidden_layers=zoo.LAYERS,
                                                       state_size=8)), "no attention heads"),
    }
    config_fn, reason = configs[name]
    dense, sphkv_run = _generate_both(config_fn)
    assert torch.equal(sphkv_run(), dense)
    rep = api.report()
    assert rep["sites"] and all(not s["rewritten"] and reason in s["reason"] for s in rep["sites"]), rep
    if reason == "no attention heads":  # no K/V anywhere: sphkv left the model's own cache alone
        assert rep["kv_bytes"] == rep["dense_kv_bytes"] == 0, rep


@pytest.mark.parametrize("module_causal,call_causal", [(False, None), (True, False), (False, True), (True, None)])
def test_dense_layer_without_a_mask_is_causal_only_where_the_call_is(module_causal, call_causal):
    """A layer kept dense runs the model's eager attention with the additive mask sphkv builds.
    With no mask that is causal only where sdpa would be (the call's is_causal, else the
    module's): Inkling2's block residual attends both ways with mask=None on a module with
    is_causal=False, and was made causal (its tokens differed from dense's; session 33's probe)."""
    from sphkv_compile import hf
    from transformers.models.llama import modeling_llama

    config = zoo._llama_like(tf.LlamaConfig)
    setattr(config, hf.DENSE_IMPL_ATTR, "eager")
    module = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    module.is_causal = module_causal
    gen = torch.Generator().manual_seed(0)
    d = config.hidden_size // config.num_attention_heads
    q = torch.randn(2, config.num_attention_heads, 5, d, generator=gen)
    k, v = (torch.randn(2, config.num_key_value_heads, 5, d, generator=gen) for _ in range(2))
    extra = {} if call_causal is None else {"is_causal": call_causal}
    got, _ = hf._dense_attention(module, q, k, v, None, scaling=d ** -0.5, dropout=0.0, **extra)
    causal = module_causal if call_causal is None else call_causal
    mask = torch.full((5, 5), float("-inf")).triu(1)[None, None] if causal else None
    want, _ = modeling_llama.eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5, dropout=0.0)
    assert torch.allclose(got, want, atol=1e-6)
    if not causal:  # and the causal answer would differ: the test tells the two apart
        causal_out, _ = modeling_llama.eager_attention_forward(
            module, q, k, v, torch.full((5, 5), float("-inf")).triu(1)[None, None], scaling=d ** -0.5, dropout=0.0)
        assert not torch.allclose(got, causal_out, atol=1e-3)


def _hrm():
    return tf.HrmTextConfig(**zoo._common(
        hidden_size=zoo.HIDDEN, intermediate_size=2 * zoo.HIDDEN, num_hidden_layers=16, num_layers_per_stack=2,
        num_attention_heads=4, head_dim=64, max_position_embeddings=256))


@pytest.mark.skipif(not hasattr(tf, "HrmTextConfig"), reason="transformers without HRM")
def test_attention_modules_reused_for_other_cache_slots_stay_dense_with_the_reason():
    """HRM runs its stack of layers for several cycles and writes cache slot layer_idx + an offset
    per cycle, so an attention module serves several slots: the store cannot follow. The plan sees
    it in the forward's source and keeps every layer dense, saying why; generate() gives dense's
    tokens (session 33's probe had it refused at run time)."""
    dense, sphkv_run = _generate_both(_hrm)
    assert torch.equal(sphkv_run(), dense)
    sites = api.report()["sites"]
    assert sites and all(not s["rewritten"] and "layer_idx + an offset" in s["reason"] for s in sites), sites


@pytest.mark.skipif(not hasattr(tf, "HrmTextConfig"), reason="transformers without HRM")
def test_attention_after_another_slots_update_is_refused_naming_the_cause(monkeypatch):
    """Where the plan cannot see it (here: its source check switched off), the attention that
    follows another slot's update is refused at run time with an error that says so, not the
    generic one."""
    from sphkv_compile import hf_plan

    monkeypatch.setattr(hf_plan, "slot_offset_class", lambda model: None)
    _, sphkv_run = _generate_both(_hrm)
    with pytest.raises(SphkvUnsupportedError, match="follows a cache update of slot .*, not of its own"):
        sphkv_run()
