"""Compiled generate on the compressed store: the same tokens as the eager path (and as dense
at high bits), and no recompilation across decode steps or generate calls, for Llama with
Inductor and for every model of the zoo (tests/test_zoo.py)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf

from sphkv_compile import api
from sphkv_compile.hf_cache import SphkvCache
from tests import test_zoo as zoo
from tests.models.tiny_llama import tiny_llama

HIGH_BITS = dict(tiers=("exact:exact", "hi:k12:polar12:r32"), sink=2, recent=4, kv_dtype=torch.float32)
STEPS = 64


def _model():
    return tiny_llama(max_positions=256)


def _generate(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                          pad_token_id=0, cache_implementation="static", **kw)


def test_compiled_static_generate_one_graph_same_tokens():
    model = _model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dense = _generate(model, ids, mask)
    fast = api.optimize(copy.deepcopy(model), **HIGH_BITS)
    eager = _generate(fast, ids, mask)
    assert torch.equal(eager, dense)

    config = _compile_config()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = _generate(fast, ids, mask, compile_config=config)
    graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first == 1, dict(counters["stats"])  # every decode step ran one graph
    assert torch.equal(compiled, eager)
    sites = api.report()["sites"]
    assert sites and all(s["rewritten"] for s in sites), sites

    again = _generate(fast, ids, mask, compile_config=config)  # a new cache: still no recompile
    # unique_graphs counts a recompile too (torch 2.13 leaves counters["recompiles"] empty even
    # when a guard fails, so that counter would check nothing)
    assert counters["stats"]["unique_graphs"] == graphs_after_first, dict(counters["stats"])
    assert torch.equal(again, eager)


def _compile_config():
    config = tf.CompileConfig(backend="sphkv", fullgraph=False)
    config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    return config


@pytest.mark.parametrize("name", zoo.SEED_ORDER)
def test_zoo_compiled_generate_no_recompiles_after_warmup(name, monkeypatch):
    """Every zoo model, compiled generate on a static cache, 64 steps: one graph serves every
    decode step (the first one compiles it: the warm-up), a second generate with a fresh cache
    compiles nothing, and the tokens are dense's. Recompiles are Dynamo's guards, which do not
    depend on the compiler behind the backend, so the graph runs through AOT autograd without
    Inductor codegen here (seconds instead of minutes for the zoo); the Llama test above runs
    Inductor."""
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    seed = zoo.SEED_ORDER.index(name)
    fast, ids, mask = _compiled_generate_is_one_graph(zoo.build(zoo.ZOO[name], seed), seed)
    assert all(s["rewritten"] for s in api.report()["sites"]), api.report()["sites"]
    counters = torch._dynamo.utils.counters
    _generate(fast, ids, mask, compile_config=_compile_config())  # fresh cache, same graph
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _compiled_generate_is_one_graph(model, seed: int):
    """Compiled generate of the optimized model on a static cache: dense's tokens from one graph
    without breaks. Returns (optimized model, ids, mask)."""
    ids, mask = zoo.prompts(seed)
    dense = _generate(model, ids, mask)
    fast = api.optimize(copy.deepcopy(model), **HIGH_BITS)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = _generate(fast, ids, mask, compile_config=_compile_config())
    # unique_graphs counts every graph Dynamo compiled, a recompile's included (on torch 2.13 the
    # "recompiles" counter stays empty even when a guard fails, so it is not what is checked)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(compiled, dense)
    return fast, ids, mask


@pytest.mark.parametrize("name", sorted(zoo.HYBRID_ZOO))
def test_hybrid_compiled_generate_is_one_graph(name, monkeypatch):
    """A hybrid model (linear-attention layers on transformers' own cache layers beside
    compressed attention layers), compiled generate on a static cache: one graph, no graph
    break, dense's tokens."""
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    _compiled_generate_is_one_graph(zoo.build(zoo.HYBRID_ZOO[name], 50), 50)
    assert any(s["rewritten"] for s in api.report()["sites"]), api.report()["sites"]


@pytest.fixture
def meta_is_an_accelerator(monkeypatch):
    """Models on the meta device stand for models on an accelerator (no GPU here): let the
    compile rules (compile_rules.compile_blocker, transformers' device list) count it as one."""
    from sphkv_compile import compile_rules

    monkeypatch.setattr(compile_rules, "COMPILED_DEVICE_TYPES", (*compile_rules.COMPILED_DEVICE_TYPES, "meta"))


@pytest.mark.usefixtures("meta_is_an_accelerator")
def test_generate_keeps_cuda_graphs_only_where_the_decode_step_decides_nothing_on_the_host():
    """generate() compiles a static cache's decode step with mode 'reduce-overhead' (CUDA graphs)
    by default. On the Triton kernels the store is updated on the device alone (a byte budget
    is only checked; RDR's decode token joins the exact tier, and its re-budgets run between
    steps), so that default stays. A configuration the kernels do not cover (their torch
    references read back to the host) would be skipped by a replay: sphkv sets mode 'default',
    and a compile config asking for CUDA graphs with another backend is refused, naming the
    cause and the fix."""
    from sphkv_compile.api import _decode_step_mode, graph_blocker

    def settle(kwargs, model):  # what generate() does with its kwargs before it starts
        return _decode_step_mode(kwargs, model, api.new_cache(model, max_cache_len=70))

    defaults = dict(bits=3.5, sink=2, recent=4)
    device_only = api.optimize(_model().to("meta"), **defaults)  # meta stands for an accelerator
    assert graph_blocker(device_only) is None
    kept = {}
    settle(kept, device_only)
    assert "compile_config" not in kept  # transformers' default (CUDA graphs) applies
    odd_config = lambda: tf.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)  # head dim 24
    odd = tf.LlamaForCausalLM(odd_config())
    assert graph_blocker(api.optimize(_model().to("meta"), **defaults, budget=0.9)) is None  # only checked
    # RDR: the decode token joins the exact tier on the device, re-budgets run between steps
    rdr_meta = api.optimize(_model().to("meta"), **defaults, policy="rdr", budget=0.5, rebudget_every=4)
    assert graph_blocker(rdr_meta) is None
    assert settle({}, rdr_meta) == (True, "static cache, every op on the Triton kernels, RDR re-budgets between steps")
    blockers = {
        "radius_bits=32": api.optimize(_model(), **HIGH_BITS),  # the kernels read 16-bit radii only
        "head_dim=24": api.optimize(odd, **defaults, pad_head_dim=False),  # on CUDA it would be padded (head_pad)
    }
    for words, model in blockers.items():
        assert words in graph_blocker(model), (words, graph_blocker(model))
    blocked = blockers["head_dim=24"]
    plain = {}
    settle(plain, blocked)
    assert "compile_config" not in plain  # on the CPU generate() does not auto-compile: nothing to set
    odd_meta = api.optimize(tf.LlamaForCausalLM(odd_config()).to("meta"), **defaults, pad_head_dim=False)
    settle(plain, odd_meta)
    assert plain["compile_config"].mode == "default"
    ids = torch.randint(3, 128, (1, 6))
    for mode in ("reduce-overhead", "max-autotune"):  # both make CUDA graphs
        with pytest.raises(ValueError, match="CUDA graphs.*head_dim=24.*Fix: pass compile_config"):
            _generate(blocked, ids, torch.ones_like(ids), compile_config=tf.CompileConfig(mode=mode))
    sphkv_backend = {"compile_config": tf.CompileConfig(backend="sphkv")}  # it makes no graphs in any mode
    settle(sphkv_backend, blocked)
    assert sphkv_backend["compile_config"].mode == "reduce-overhead"


def test_a_dynamic_cache_on_an_accelerator_warns_with_the_fix():
    """generate() with the default dynamic cache is not compiled: on an accelerator that is
    host-bound, so sphkv says so and names the fix; on the CPU it stays quiet."""
    from sphkv_compile.api import SphkvPerformanceWarning
    from sphkv_compile.hf_advice import advise_static

    with pytest.warns(SphkvPerformanceWarning, match="cache_implementation='static'"):
        advise_static(api.optimize(_model().to("meta"), **HIGH_BITS).device)  # meta stands for an accelerator
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvPerformanceWarning)
        advise_static(api.optimize(_model(), **HIGH_BITS).device)


def test_a_model_the_kernels_do_not_cover_warns_once_on_an_accelerator():
    """An odd head dim on an accelerator, not padded: every sphkv op runs its torch reference. generate()
    says so once per model, naming the cause (head_dim=24) and what the kernels need; a covered
    model and the CPU stay quiet."""
    from sphkv_compile.api import SphkvPerformanceWarning, graph_blocker
    from sphkv_compile.hf_advice import warn_if_kernels_do_not_cover

    def _warn_if_kernels_do_not_cover(model, why):
        warn_if_kernels_do_not_cover(model._sphkv_state, model.device, why)

    odd = tf.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # head dim 24
    odd_meta = api.optimize(tf.LlamaForCausalLM(odd).to("meta"), bits=3.5, pad_head_dim=False)  # meta: an accelerator
    with pytest.warns(SphkvPerformanceWarning, match="head_dim=24.*power-of-two head dim"):
        _warn_if_kernels_do_not_cover(odd_meta, graph_blocker(odd_meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvPerformanceWarning)
        _warn_if_kernels_do_not_cover(odd_meta, graph_blocker(odd_meta))  # once per model
        odd_cpu = api.optimize(tf.LlamaForCausalLM(odd), bits=3.5, pad_head_dim=False)
        _warn_if_kernels_do_not_cover(odd_cpu, graph_blocker(odd_cpu))  # CPU
        covered = api.optimize(_model().to("meta"), bits=3.5)
        _warn_if_kernels_do_not_cover(covered, graph_blocker(covered))


def test_a_budget_excess_recorded_inside_a_cuda_graph_is_raised_after_generate(monkeypatch):
    """While a decode step is captured into a CUDA graph the budgeting node cannot stop at an
    excess (its replays never reach the host): it records the worst one on the device, and
    generate() raises it when it returns. Outside a capture it raises at once. (Every update is
    taken as captured here, with a budget of one byte per layer and row.)"""
    from sphkv_compile.rdr import node
    from sphkv_compile.rdr import ops as rdr_ops
    from sphkv_compile.rdr.budget import SphkvBudgetError

    model = api.optimize(_model(), bits=3.5, sink=2, recent=4, budget=0.9)
    ids = torch.randint(3, 128, (1, 10))
    _generate(model, ids, torch.ones_like(ids))  # within the budget: nothing raised
    monkeypatch.setattr(rdr_ops, "_budget", lambda *args: 1)
    with pytest.raises(SphkvBudgetError, match="over its budget of 1"):
        _generate(model, ids, torch.ones_like(ids))  # raised at the first update
    monkeypatch.setattr(node, "capturing", lambda: True)
    calls = []
    monkeypatch.setattr(SphkvCache, "raise_if_over_budget",
                        lambda self, original=SphkvCache.raise_if_over_budget: calls.append(1) or original(self))
    with pytest.raises(SphkvBudgetError, match="over its budget of 1"):
        _generate(model, ids, torch.ones_like(ids))  # recorded at every update, raised at the end
    assert calls == [1]


@pytest.mark.usefixtures("meta_is_an_accelerator")
def test_report_says_how_generate_ran_the_decode_step():
    """report()['decode_step']: whether generate() replays the decode step from CUDA graphs, and
    why not when it does not."""
    from sphkv_compile.api import _decode_step_mode

    defaults = dict(bits=3.5, sink=2, recent=4)
    model = api.optimize(_model(), **defaults)
    ids = torch.randint(3, 128, (1, 6))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    step = api.report()["decode_step"]
    assert step["cuda_graphs"] is False and "dynamic cache" in step["reason"], step
    _generate(model, ids, torch.ones_like(ids))
    step = api.report()["decode_step"]
    assert step["cuda_graphs"] is False and "accelerators only" in step["reason"], step
    meta = api.optimize(_model().to("meta"), **defaults)  # stands for an accelerator
    static = api.new_cache(meta, max_cache_len=20)
    assert _decode_step_mode({}, meta, static) == (True, "static cache, uniform policy, every op on the Triton kernels")
    no_graphs = {"compile_config": tf.CompileConfig(mode="default")}
    assert _decode_step_mode(no_graphs, meta, static) == (False, "compile_config asks for mode 'default'")
    autotune = {"compile_config": tf.CompileConfig(mode="max-autotune")}
    assert _decode_step_mode(autotune, meta, static)[0] is True
    rdr = api.optimize(_model().to("meta"), **defaults, policy="rdr", budget=0.5, rebudget_every=4)
    graphs, why = _decode_step_mode({}, rdr, api.new_cache(rdr, max_cache_len=70))
    assert graphs and "RDR re-budgets between steps" in why


def test_a_shorter_static_generate_reuses_the_compiled_step(monkeypatch):
    """generate() sizes its static cache at least as large as the largest it built before for the
    model (as transformers does for its StaticCache), so a shorter call after a longer one
    replays the compiled decode step instead of recompiling it for new pool shapes, and gives
    the tokens of a cache sized for it alone."""
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")  # recompiles are Dynamo's guards
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    short, short_mask = ids[:, :12], mask[:, :12]
    fast = api.optimize(_model(), **HIGH_BITS)
    alone = fast.generate(short, attention_mask=short_mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                          do_sample=False, pad_token_id=0, past_key_values=api.new_cache(fast, 12 + STEPS))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    _generate(fast, ids, mask, compile_config=_compile_config())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    seen, original = [], api.new_cache
    monkeypatch.setattr(api, "new_cache", lambda model, max_cache_len=None, **kw:
                        seen.append(max_cache_len) or original(model, max_cache_len, **kw))
    assert torch.equal(_generate(fast, short, short_mask, compile_config=_compile_config()), alone)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert seen == [30 + STEPS]  # the longer call's capacity
