"""Models whose attention does something the store cannot follow, found by probing every causal
LM transformers registers (benchmarks/probe_all_causal_lms.py): each must stay dense with the
reason in report(), or be refused with an error naming the cause, never answered wrongly."""
from __future__ import annotations

import re

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


def _jetmoe():
    return tf.JetMoeConfig(**zoo._common(
        hidden_size=zoo.HIDDEN, num_hidden_layers=zoo.LAYERS, num_key_value_heads=2, kv_channels=64,
        intermediate_size=2 * zoo.HIDDEN, max_position_embeddings=256, num_local_experts=2, num_experts_per_tok=2))


def _doge():
    return tf.DogeConfig(**zoo._common(hidden_size=zoo.HIDDEN, intermediate_size=2 * zoo.HIDDEN,
                                       num_hidden_layers=zoo.LAYERS, num_attention_heads=zoo.HEADS,
                                       num_key_value_heads=2, max_position_embeddings=256))


# (config, what the run-time refusal says): the store cannot follow these, and only running the
# attention shows it (session 33's probe refused each mid-generate)
RUN_TIME_REFUSALS = {
    # DiffLlama calls attention twice per update, each time with half of the values: the store
    # would keep the first call's values and store the chunk twice
    "DiffLlamaConfig": (lambda: zoo._llama_like(tf.DiffLlamaConfig), "without a cache update before it"),
    # JetMoE tiles its KV heads top_k times after the cache update
    "JetMoeConfig": (_jetmoe, "reads keys with 4 heads of 64, but the cache update stored 2"),
    # Doge adds a learned dynamic mask (float) to the logits
    "DogeConfig": (_doge, "torch.float32 \\(an additive mask: the model builds its own"),
}


@pytest.mark.parametrize("config_name", sorted(RUN_TIME_REFUSALS))
def test_attention_the_store_cannot_follow_is_planned_dense_by_the_trial_forward(config_name):
    """optimize()'s trial forward (hf_trial.py) meets the refusal before any real token, keeps
    every layer with that attention code dense with the refusal as its reason, and warns once:
    generate() then gives dense's tokens instead of raising."""
    if not hasattr(tf, config_name):
        pytest.skip(f"transformers without {config_name}")
    from sphkv_compile.options import SphkvCoverageWarning

    config_fn, message = RUN_TIME_REFUSALS[config_name]
    model = zoo.build(config_fn, 0)
    ids, mask = zoo.prompts(0)
    dense = zoo.greedy(model, ids, mask)
    with pytest.warns(SphkvCoverageWarning, match=f"{zoo.LAYERS} of {zoo.LAYERS} layers stay dense"):
        fast = zoo.optimized(model, **zoo.HIGH_BITS)
    assert torch.equal(zoo.greedy(fast, ids, mask), dense)
    sites = api.report()["sites"]
    assert len(sites) == zoo.LAYERS, sites
    for site in sites:  # the run-time refusal's own words, for every layer of that attention code
        assert not site["rewritten"] and "trial forward" in site["reason"], site
        assert re.search(message, site["reason"]), site


@pytest.mark.parametrize("config_name", sorted(RUN_TIME_REFUSALS))
def test_without_the_trial_the_same_attention_is_refused_at_run_time_naming_the_cause(config_name):
    """trial=False: the run-time check still refuses, with an error that names the cause."""
    if not hasattr(tf, config_name):
        pytest.skip(f"transformers without {config_name}")
    config_fn, message = RUN_TIME_REFUSALS[config_name]
    model = zoo.build(config_fn, 0)
    ids, mask = zoo.prompts(0)
    with pytest.raises(SphkvUnsupportedError, match=message):
        zoo.greedy(zoo.optimized(model, trial=False, **zoo.HIGH_BITS), ids, mask)


def test_the_trial_forward_leaves_the_rng_and_the_report_as_it_found_them():
    """Whatever the model's forward draws from the RNG or records in report() during the trial
    (here a hook on its first layer does both), the RNG state and report() are as before:
    a seeded sampling run after optimize() samples as without it, and report() still describes
    the user's last run (here: another model's generate())."""
    import importlib
    import warnings

    from sphkv_compile.options import SphkvCoverageWarning

    report_module = importlib.import_module("sphkv_compile.report")  # the package exports report() by that name
    other = zoo.optimized(zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 1), **zoo.HIGH_BITS)
    ids, mask = zoo.prompts(0)
    zoo.greedy(other, ids, mask)
    before = api.report()
    assert before["kv_bytes"] > 0 and all(s["rewritten"] for s in before["sites"])

    model = zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 0)
    calls = []

    def draws_and_records(module, args):
        calls.append(torch.rand(1))
        report_module.record_rebudget("decode", 0.5)

    model.model.layers[0].register_forward_pre_hook(draws_and_records)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvCoverageWarning)  # the trial must finish
        api.optimize(model, policy="rdr", budget=0.5, sink=2, recent=4)
    assert len(calls) == 2, "the trial forward (a prefill and a step) did not run"
    assert torch.equal(torch.rand(4), want)
    assert api.report() == before


def test_no_trial_while_a_module_is_training_and_it_runs_when_optimize_is_called_again(monkeypatch):
    """A module left in training mode could refuse for its dropout, which says nothing about the
    attention code: the trial waits, and re-optimizing after model.eval() runs it (once)."""
    from sphkv_compile import api as api_module

    ran = []
    inner = api_module.trial_forward
    monkeypatch.setattr(api_module, "trial_forward", lambda *a: ran.append(1) or inner(*a))
    model = zoo.build(lambda: zoo._llama_like(tf.LlamaConfig, attention_dropout=0.1), 0)
    model.model.layers[0].self_attn.train()
    api.optimize(model, sink=2, recent=4)
    assert ran == []
    model.eval()
    api.optimize(model, sink=2, recent=4)
    api.optimize(model, sink=2, recent=4)
    assert ran == [1]
    api.new_cache(model)
    assert all(s["rewritten"] for s in api.report()["sites"])


def test_a_trial_forward_that_cannot_run_warns_and_changes_nothing(monkeypatch):
    """A model the trial's input does not suit (here: its forward raises) keeps the plan as it
    was, and the warning says the plan is unchecked and how to skip the trial."""
    from sphkv_compile import hf_trial
    from sphkv_compile.options import SphkvCoverageWarning

    def fails(*args, **kwargs):
        raise ValueError("this model needs pixel_values")

    monkeypatch.setattr(hf_trial, "_prefill_and_step", fails)
    model = zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 0)
    with pytest.warns(SphkvCoverageWarning, match="did not finish .ValueError: this model needs pixel_values"):
        api.optimize(model, sink=2, recent=4)
    api.new_cache(model)
    assert all(s["rewritten"] for s in api.report()["sites"])


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
    model = zoo.build(_hrm, 0)
    ids, mask = zoo.prompts(0)
    sphkv_run = lambda: zoo.greedy(zoo.optimized(model, trial=False, **zoo.HIGH_BITS), ids, mask)  # noqa: E731
    with pytest.raises(SphkvUnsupportedError, match="follows a cache update of slot .*, not of its own"):
        sphkv_run()


@pytest.mark.parametrize("call_causal,refused", [(False, True), (None, False), (True, False)])
def test_a_compressed_layer_refuses_a_call_that_says_is_causal_false(call_causal, refused):
    """Without a mask, a multi-query attention call is causal only where sdpa's rule says so (the
    call's is_causal, else the module's). A compressed layer computes causal attention only, so
    an explicit is_causal=False on a causal module is refused, naming the cause, and the other
    calls are answered (after their cache update, as the model makes them)."""
    from sphkv_compile import hf

    model = api.optimize(zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 0), trial=False, **zoo.HIGH_BITS)
    cache = api.new_cache(model)
    module = next(m for m in model.modules() if getattr(m, "layer_idx", None) == 0 and hasattr(m, "is_causal"))
    assert module.is_causal
    gen = torch.Generator().manual_seed(0)
    d = zoo.HIDDEN // zoo.HEADS
    q = torch.randn(1, zoo.HEADS, 5, d, generator=gen)
    k, v = (torch.randn(1, 2, 5, d, generator=gen) for _ in range(2))
    cache.update(k, v, 0)  # what the model's attention does before it calls the interface
    extra = {} if call_causal is None else {"is_causal": call_causal}
    call = lambda: hf.sphkv_attention(module, q, k, v, None, scaling=d ** -0.5, **extra,  # noqa: E731
                                      **{hf.CACHE_KWARG: cache})
    if refused:
        with pytest.raises(SphkvUnsupportedError, match="layer 0: the attention module is not causal"):
            call()
    else:
        out, _ = call()
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True, scale=d ** -0.5)
        assert torch.allclose(out.transpose(1, 2), want, atol=1e-4)
