"""Beam search's decode step compiled by sphkv (beam_decode.py): transformers leaves it
uncompiled, the sphkv cache reorders in place, so it can run compiled. On the CPU the compile
is asked for explicitly (CompileConfig._compile_all_devices, as transformers allows) with a
counting backend; the GPU test runs it with CUDA graphs."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import test_zoo as zoo
from sphkv_compile import api


def counting_config(calls: list):
    def backend(gm, example_inputs):
        def run(*args):
            calls.append(len(args))
            return gm.forward(*args)
        return run

    config = tf.CompileConfig(backend=backend, mode=None)
    config._compile_all_devices = True  # transformers' switch for compiling off accelerators
    return config


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_beam_decode_steps_run_compiled_and_equal_dense(name):
    """Llama (rotary), GPT-2 and OPT (learned absolute positions: generate() must still pass
    position_ids, which it decides from the forward's signature), left-padded prompts: beams
    equal dense ones, every step after the prefill runs the compiled graph, forward hooks run
    once per step, and the model's forward is restored afterwards."""
    seed = zoo.SEED_ORDER.index(name)
    model = zoo.build(zoo.ZOO[name], seed)
    ids, mask = zoo.prompts(seed)
    dense = zoo.greedy(model, ids, mask, num_beams=3)
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    forward = fast.forward
    hooks, calls = [], []
    fast.register_forward_hook(lambda *a: hooks.append(1))
    out = zoo.greedy(fast, ids, mask, num_beams=3, cache_implementation="static", compile_config=counting_config(calls))
    assert "beam search, its decode step compiled by sphkv" in api.report()["decode_step"]["reason"]
    assert len(calls) == zoo.NEW - 1  # every step after the prefill's token ran the compiled graph
    assert len(hooks) == zoo.NEW
    assert fast.forward is forward
    assert torch.equal(out, dense), f"{name}: first mismatch at step {(out != dense).any(0).nonzero()[0]}"


def test_beam_decode_runs_eagerly_past_the_recompile_limit():
    """When torch.compile gives up on the forward (here: the recompile limit, 1, reached by a
    second beam width), the step runs the plain forward: same beams, no recursion."""
    seed = zoo.SEED_ORDER.index("llama")
    model = zoo.build(zoo.ZOO["llama"], seed)
    ids, mask = zoo.prompts(seed)
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    calls = []
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            for beams in (2, 3):
                out = zoo.greedy(fast, ids, mask, num_beams=beams, cache_implementation="static",
                                 compile_config=counting_config(calls))
                assert torch.equal(out, zoo.greedy(model, ids, mask, num_beams=beams)), beams
    finally:
        torch._dynamo.reset()
    assert len(calls) == zoo.NEW - 1  # only the first width ran compiled


@pytest.mark.parametrize("case", ["dynamic", "dense_layers", "disabled"])
def test_beam_decode_stays_uncompiled_with_the_reason(case):
    seed = zoo.SEED_ORDER.index("gemma2" if case == "dense_layers" else "llama")
    if case == "dense_layers":  # a window of 8 keeps Gemma2's sliding layers dense (test_zoo)
        model = zoo.build(lambda: zoo._llama_like(tf.Gemma2Config, head_dim=zoo.HIDDEN // zoo.HEADS,
                                                  attn_logit_softcapping=None, sliding_window=8), seed)
    else:
        model = zoo.build(zoo.ZOO["llama"], seed)
    ids, mask = zoo.prompts(seed)
    dense = zoo.greedy(model, ids, mask, num_beams=2)
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    calls = []
    kw = dict(num_beams=2, compile_config=counting_config(calls))
    kw["cache_implementation"] = "dynamic" if case == "dynamic" else "static"
    if case == "disabled":
        kw["disable_compile"] = True
    out = zoo.greedy(fast, ids, mask, **kw)
    reason = api.report()["decode_step"]["reason"]
    expected = {"dynamic": "dynamic cache", "dense_layers": "dense cache", "disabled": "disable_compile"}[case]
    assert reason.startswith("beam search runs uncompiled") and expected in reason, reason
    assert calls == []
    assert torch.equal(out, dense)
