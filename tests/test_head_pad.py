"""Head dims the Triton kernels cannot take, stored zero-padded (sphkv_compile/head_pad.py):
the store at the padded dim against float64 dense attention at the real one, the byte budget
kept in bytes, and both integration paths (transformers' generate() and a graph-rewritten
plain model) giving dense's tokens at high bits with the padding reported. On the CPU the
padding is asked for (pad_head_dim=True); on CUDA it is the default."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

import sphkv_compile
from helpers import DTYPES, dense_attention, rel_err
from sphkv_compile import api, rdr
import sphkv_compile.rdr.budget  # noqa: F401  (rdr.budget.floor_bytes)
from sphkv_compile.head_pad import kernel_head_dim, options_for_stored, pad_last, stored_head_dim
from sphkv_compile.options import SphkvOptions, SphkvOptionsError
from sphkv_compile.rdr.budget import SphkvBudgetError, dense_bytes
from sphkv_compile.rdr.costs import choice_table
from sphkv_compile.store import LayerStore
from sphkv_compile.tiers import TierSpec
from tests import test_zoo as zoo
from tests.models import gpt_fast
from tests.models.bounds import attention_rms_bound, rms_error_in_value_units

EXACT = TierSpec("exact")
HIGH = TierSpec("hi", 14.0, "polar", 14.0, 32)
HIGH_OPTIONS = {"tiers": ("exact:exact", "hi:k14:polar14:r32")}  # HIGH, for the codec's error bound
ODD_DIMS = [1, 3, 8, 24, 80, 96, 100, 130, 200]


def test_kernel_head_dim_is_the_smallest_power_of_two_the_kernels_take():
    expected = {1: 16, 8: 16, 16: 16, 17: 32, 24: 32, 64: 64, 80: 128, 96: 128, 128: 128, 130: 256, 256: 256,
                257: 257, 320: 320}
    assert {d: kernel_head_dim(d) for d in expected} == expected
    assert stored_head_dim(96, "cpu") == 96  # auto: only where the kernels run
    assert stored_head_dim(96, "cuda") == 128
    assert stored_head_dim(96, "meta", True) == 128
    assert stored_head_dim(96, "cuda", False) == 96
    assert stored_head_dim(128, "cuda") == 128


def test_pad_head_dim_option_is_validated():
    for ok in ("auto", True, False):
        SphkvOptions.from_dict({"pad_head_dim": ok})
    for bad in ("yes", 1, 0, None):
        with pytest.raises(SphkvOptionsError, match="pad_head_dim"):
            SphkvOptions.from_dict({"pad_head_dim": bad})


def _randn(*shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@given(d=st.sampled_from(ODD_DIMS), group=st.sampled_from([1, 2, 4, 8]),
       T=st.one_of(st.integers(1, 64), st.integers(65, 700)), dtype=st.sampled_from(DTYPES),
       magnitude=st.sampled_from([0.0, 1.0, 1e3]), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_padded_store_attends_like_dense_attention_at_the_real_head_dim(d, group, T, dtype, magnitude, seed):
    """A store at the padded dim, fed zero-padded q/k/v and the real dim's scale: the output's
    first d columns equal float64 dense attention at d (the same tolerance as the unpadded
    store's test), and the padded columns stay zero. Zero keys and huge norms included."""
    hkv, D = 2, kernel_head_dim(d)
    k = _randn(1, hkv, T, d, seed=seed, dtype=dtype) * magnitude
    v = _randn(1, hkv, T, d, seed=seed + 1, dtype=dtype)
    q = _randn(1, hkv * group, 1, d, seed=seed + 2, dtype=dtype)
    store = LayerStore(1, hkv, D, (EXACT, HIGH), kv_dtype=dtype)
    store.append(pad_last(k, D), pad_last(v, D), tier="hi")
    out, _ = store.attend(pad_last(q, D), scale=d ** -0.5)
    assert out.shape[-1] == D
    ref = dense_attention(q, k, v)  # float64, scale d ** -0.5
    tol = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    if magnitude <= 1:
        assert rel_err(out[..., :d], ref) < tol
    else:  # huge keys: a relative key error moves logits by a lot; the codec's derived bound, at the stored dim
        bound = attention_rms_bound(HIGH_OPTIONS, pad_last(q, D).double(), pad_last(k, D).double(), d ** -0.5)
        assert rms_error_in_value_units(out[..., :d], ref, v) <= bound + tol
    # the padded value coordinates decode to (nearly) zero: each output coordinate is a convex
    # combination of decoded values, so its error is within the codec's relative error of max|v|
    assert float(out[..., d:].abs().max()) <= tol * float(v.abs().max())


@pytest.mark.parametrize("d", [24, 80, 96])
def test_a_budget_at_the_padded_dim_is_the_same_bytes(d):
    D = kernel_head_dim(d)
    opts = SphkvOptions(budget=0.3, policy="rdr")
    padded = options_for_stored(opts, d, D)
    for tokens, max_tokens in ((1000, None), (500, 4096)):
        real = rdr.budget_bytes(opts, tokens, 4, d, torch.bfloat16, max_tokens)
        stored = rdr.budget_bytes(padded, tokens, 4, D, torch.bfloat16, max_tokens)
        if max_tokens:  # the fixed budget: fraction x dense bytes at the real dim (int rounding apart)
            assert abs(stored - real) <= 1, (stored, real)
            assert abs(stored - int(0.3 * dense_bytes(max_tokens, 4, d))) <= 1
        else:  # the growing one adds the protected exact tokens' bytes, which are stored padded
            floor = lambda o, dim: rdr.budget.floor_bytes(o, 4, dim, torch.bfloat16)  # noqa: E731
            assert abs((stored - floor(padded, D)) - (real - floor(opts, d))) <= 1, (stored, real)
    assert options_for_stored(SphkvOptions(), d, D) == SphkvOptions()  # no budget: nothing to scale


def test_a_uniform_budget_the_padded_records_exceed_is_refused_naming_the_padding():
    """A budget that holds head dim 24's records but not those of 32, its padding: refused when
    the store is built, naming the padding and pad_head_dim=False."""
    d, D = 24, 32
    spec = (EXACT, TierSpec("uniform", 3.5, "polar", 3.5))
    prompt, new = 8, 120
    T = prompt + new  # the static cache's length, what its fixed budget is a fraction of

    def needed(dim):  # bytes per layer, row and KV head: 6 exact sink/recent tokens, the rest encoded
        table = choice_table(spec, dim, 0, torch.bfloat16)
        return 6 * table.bytes[0] + (T - 6) * table.bytes[1]

    assert needed(d) < needed(D)
    budget = (needed(d) + needed(D)) / 2 / dense_bytes(T, 1, d)
    ids = torch.randint(3, 128, (1, prompt))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    model = api.optimize(_odd_llama(), bits=3.5, sink=2, recent=4, budget=budget, pad_head_dim=True)
    with pytest.raises(SphkvBudgetError, match="zero-padded to 32.*pad_head_dim=False"):
        model.generate(ids, **kw)
    kept = api.optimize(_odd_llama(), bits=3.5, sink=2, recent=4, budget=budget, pad_head_dim=False)
    kept.generate(ids, **kw)  # the real dim's records fit


def _odd_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # head dim 24
    return tf.LlamaForCausalLM(config).eval()


HIGH_BITS = dict(tiers=("exact:exact", "hi:k12:polar12:r32"), sink=2, recent=4, kv_dtype=torch.float32)


def test_generate_on_a_padded_store_gives_dense_tokens_and_reports_the_padding():
    model = _odd_llama()
    ids, mask = zoo.prompts(3)  # two prompts, the second left-padded
    kw = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    dense = model.generate(ids, **kw)
    fast = api.optimize(copy.deepcopy(model), pad_head_dim=True, **HIGH_BITS)
    for cache in ("static", "dynamic"):
        out = fast.generate(ids, cache_implementation=cache, **kw) if cache == "static" else fast.generate(ids, **kw)
        assert torch.equal(out, dense), cache
        padding = api.report()["head_dim_padding"]
        assert (padding["head_dim"], padding["stored_head_dim"]) == (24, 32), padding
        assert "pad_head_dim=False" in padding["note"]
    layer = fast.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kw).past_key_values.layers[0]
    assert layer.store.head_dim == 32 and layer.head_dim == 24
    assert layer.keys.shape[-1] == 24  # what code asking the cache for its keys' shape sees
    tokens = layer.tokens()
    assert layer.dense_bytes() == 2 * 2 * 2 * tokens * 24 * 2  # dense bytes at the model's head dim
    plain = api.optimize(copy.deepcopy(model), pad_head_dim=False, **HIGH_BITS)
    assert torch.equal(plain.generate(ids, cache_implementation="static", **kw), dense)
    assert api.report()["head_dim_padding"] is None


def test_graph_rewrite_pads_a_plain_model_and_reports_it(monkeypatch):
    """gpt-fast-style model with head dim 24, compiled with backend='sphkv': the rewrite pads
    q/k/v in the graph and slices the output; tokens equal dense at high bits."""
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    torch.manual_seed(0)
    model = gpt_fast.GPTFast(gpt_fast.Config(dim=96)).eval()
    model.setup_caches(1)
    prompt = torch.randint(0, model.cfg.vocab, (1, 16))
    ref, _ = gpt_fast.generate(model, prompt, 12)
    model.setup_caches(1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={"bits": 12, "pad_head_dim": True})
    tokens, _ = gpt_fast.generate(model, prompt, 12, compiled)
    assert torch.equal(tokens, ref)
    rep = sphkv_compile.report()
    assert rep["sites"] and all(s["rewritten"] for s in rep["sites"]), rep["sites"]
    assert rep["head_dim_padding"]["stored_head_dim"] == 32
    # dense bytes count the model's head dim: 2 layers x K+V x 2 KV heads x 28 tokens x 24 x 2 bytes
    assert rep["dense_kv_bytes"] == 2 * 2 * 2 * 28 * 24 * 2


def test_padding_lets_cuda_graphs_replay_an_odd_head_dim():
    """graph_blocker decides on the head dim the stores will hold: padded, the kernels cover it."""
    from sphkv_compile.api import graph_blocker

    assert "head_dim=24" in graph_blocker(api.optimize(_odd_llama().to("meta"), bits=3.5, pad_head_dim=False))
    assert graph_blocker(api.optimize(_odd_llama().to("meta"), bits=3.5, pad_head_dim=True)) is None


def test_auto_pads_only_where_the_kernels_and_the_budget_take_the_padded_dim(monkeypatch):
    """choose_stored_head_dim, which every path asks: 'auto' pads on CUDA when the kernels would
    serve the padded store and the budget holds its records; a budget that does not keeps the
    real dim with a warning (under True it is refused, quoting the user's budget)."""
    from sphkv_compile import head_pad
    from sphkv_compile.options import SphkvPerformanceWarning

    monkeypatch.setattr(head_pad, "kernels_cover", lambda *args: True)
    spec_bytes = [choice_table((EXACT, TierSpec("uniform", 3.5, "polar", 3.5)), dim, 0, torch.bfloat16).bytes[1]
                  for dim in (96, 128)]
    tight = (spec_bytes[0] + spec_bytes[1] * 96 / 128) / 2 / dense_bytes(1, 1, 96)  # holds 96's records, not 128's

    def choose(pad, budget=None, device="cuda"):
        o = SphkvOptions(bits=3.5, pad_head_dim=pad, budget=budget)
        return head_pad.choose_stored_head_dim(o, 8, 96, device, torch.bfloat16, torch.bfloat16, 4096)

    assert choose("auto") == 128 and choose(True) == 128 and choose(False) == 96
    assert choose("auto", device="cpu") == 96 and choose(True, device="cpu") == 128
    assert choose("auto", budget=0.5) == 128
    with pytest.warns(SphkvPerformanceWarning, match="kept unpadded"):
        assert choose("auto", budget=tight) == 96
    with pytest.raises(SphkvBudgetError, match=f"budget={tight} does not hold head_dim 96 stored zero-padded to 128"):
        choose(True, budget=tight)
    monkeypatch.setattr(head_pad, "kernels_cover", lambda *args: False)  # e.g. 32-bit radii: padding buys nothing
    assert choose("auto") == 96 and choose(True) == 128


def test_rdr_on_a_padded_store_keeps_the_budget_in_bytes():
    """Policy 'rdr' with the padding: the layers run with the budget re-expressed at the padded
    dim (derived from the user's options, which stay as given), and generate() finishes within it
    (an excess would raise when it returns)."""
    model = api.optimize(_odd_llama(), policy="rdr", budget=0.5, rebudget_every=4, sink=2, recent=4,
                         pad_head_dim=True)
    ids = torch.randint(3, 128, (1, 40))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, cache_implementation="static", return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert layer.store.head_dim == 32 and layer.base_options.budget == 0.5
    assert layer.options.budget == pytest.approx(0.5 * 24 / 32)
    held, dense = out.past_key_values.kv_bytes()
    tokens = layer.tokens()  # the prompt and every generated token but the last, which was never fed
    assert tokens == 51 and held > 0
    assert dense == 2 * 2 * 2 * tokens * 24 * 2  # layers x K+V x KV heads x tokens x the model's d x 2 bytes


def test_beam_search_on_a_padded_store_gives_dense_beams():
    """num_beams=3 reorders the padded store's rows (page copies of records at the padded dim);
    at high bits the beams equal dense's."""
    model = _odd_llama(1)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, num_beams=3,
              do_sample=False, pad_token_id=0)
    dense = model.generate(ids, **kw)
    fast = api.optimize(copy.deepcopy(model), pad_head_dim=True, **HIGH_BITS)
    for cache in ("static", "dynamic"):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        assert torch.equal(fast.generate(ids, **extra, **kw), dense), cache
        assert api.report()["head_dim_padding"]["stored_head_dim"] == 32


@torch.no_grad()
def test_a_dense_past_ingested_into_a_padded_cat_cache_continues_like_dense(monkeypatch):
    """nanoGPT's cat cache, head dim 24: the prompt runs uncompiled, so the compiled model's first
    call gets a dense past that the store ingests (padding it) before decoding from it."""
    from tests.models import nanogpt

    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    torch.manual_seed(7)
    model = nanogpt.NanoGPT(nanogpt.Config(dim=96)).eval()
    prompt = torch.randint(0, model.cfg.vocab, (2, 14))
    logits, past = model(prompt, model.empty_past(2))
    ref, _ = nanogpt.generate(model, prompt, 10)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={"bits": 12, "sink": 2, "recent": 4,
                                                              "pad_head_dim": True})
    tokens = []
    for _ in range(10):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits, past = compiled(nxt, past)
    assert torch.equal(torch.cat(tokens, 1), ref)
    assert sphkv_compile.report()["head_dim_padding"]["stored_head_dim"] == 32
    assert all(k.untyped_storage().nbytes() <= k.element_size() for k, _ in past)  # the store holds them


@torch.no_grad()
def test_a_cache_compressed_under_other_options_is_refused(monkeypatch):
    """A static cache buffer already bound to a store (padded to 32) handed to a model compiled
    with pad_head_dim=False: the records do not fit that graph, and the error names the option."""
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    torch.manual_seed(0)
    model = gpt_fast.GPTFast(gpt_fast.Config(dim=96)).eval()
    model.setup_caches(1)
    prompt = torch.randint(0, model.cfg.vocab, (1, 8))
    torch._dynamo.reset()
    gpt_fast.generate(model, prompt, 2, torch.compile(model, backend="sphkv", options={"pad_head_dim": True}))
    torch._dynamo.reset()
    other = torch.compile(model, backend="sphkv", options={"pad_head_dim": False})
    with pytest.raises(RuntimeError, match=r"other sphkv options.*'pad_head_dim': \(True, False\)"):
        other(prompt[:, :1], torch.tensor([10]))  # the next decode step, on the bound buffers
