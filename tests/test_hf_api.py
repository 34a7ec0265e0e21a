"""optimize(): option validation, errors raised up front, refusals instead of wrong answers,
the report, and the plain forward path (no generate)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies

from sphkv_compile import api, packed_state
from sphkv_compile.hf import SphkvUnsupportedError
from sphkv_compile.hf_cache import SphkvBudgetError, SphkvCache
from sphkv_compile.options import SphkvOptionsError
from sphkv_compile.rdr import meter as budget_meter


def _model(**kw):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2) | kw)
    return tf.LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_attention_the_store_never_answers_raises():
    """A compressed layer's cache update returns only the new tokens. Attention computed where
    sphkv does not reach (here: the attention implementation switched back to eager after
    optimize) would attend over those alone; it raises instead, naming the layer, and a later
    call with the store's attention works."""
    model = api.optimize(_model())
    ids = torch.randint(3, 128, (1, 8))
    model.config._attn_implementation = "eager"
    with pytest.raises(SphkvUnsupportedError, match="layer 0 updated the compressed cache"):
        model(ids, use_cache=True)
    model.config._attn_implementation = "sphkv"
    assert model(ids, use_cache=True).logits.shape == (1, 8, 128)


def test_bad_options_are_rejected_by_name():
    with pytest.raises(SphkvOptionsError, match="bits"):
        api.optimize(_model(), bits=0.5)
    with pytest.raises(SphkvOptionsError, match="unknown"):
        api.optimize(_model(), bitz=3)
    with pytest.raises(ValueError, match="kv_dtype"):
        api.optimize(_model(), kv_dtype="float32")


def test_budget_too_small_fails_before_the_first_token():
    model = api.optimize(_model(), budget=0.1, bits=3.5)  # 3.5 bits need about 0.22 of dense bytes
    ids = torch.randint(3, 128, (1, 8))
    with pytest.raises(SphkvBudgetError, match="budget"):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    model = api.optimize(_model(), budget=0.3, bits=3.5, sink=4, recent=60)
    with pytest.raises(SphkvBudgetError, match="exact"):  # 64 exact tokens in a 70-token cache
        model.generate(ids, max_new_tokens=62, do_sample=False, cache_implementation="static")


def test_forward_without_cache_gets_a_store_and_matches_dense_logits():
    model = _model()
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        dense = model(ids).logits
        fast = api.optimize(copy.deepcopy(model), tiers=("exact:exact", "hi:k12:polar12:r32"), sink=2, recent=4,
                            kv_dtype=torch.float32)
        out = fast(ids, use_cache=True)
    cache = out[api.cache_keyword(fast)] if api.cache_keyword(fast) in out else out["past_key_values"]
    assert isinstance(cache, SphkvCache)
    assert cache.get_seq_length() == 10
    # prefill attends the dense chunk itself, so it is exact up to float rounding
    torch.testing.assert_close(out.logits, dense, rtol=1e-5, atol=1e-5)


def test_report_lists_every_layer_and_measured_bytes():
    model = api.optimize(_model(), bits=3.5)
    cache = api.new_cache(model)
    model.generate(torch.randint(3, 128, (1, 16)), max_new_tokens=4, do_sample=False,
                   **{api.cache_keyword(model): cache})
    rep = api.report()
    assert [s["details"]["layer"] for s in rep["sites"]] == [0, 1]
    assert all(s["rewritten"] and s["reason"] is None for s in rep["sites"])
    held, dense = cache.kv_bytes()  # measured from the cache's own pools and page tables
    assert (rep["kv_bytes"], rep["dense_kv_bytes"]) == (held, dense)
    assert dense == 2 * 2 * 32 * 2 * 2 * cache.get_seq_length()  # layers x KV heads x head dim x (K, V) x 16 bits
    assert held > 0  # (at 19 tokens the pages held can exceed the dense bytes)


@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_beam_search_under_rdr_reorders_rows_and_holds_the_budget(static, monkeypatch):
    """Beam search reorders the batch rows after every step (SphkvCache.reorder_cache): under
    RDR each row's tokens, tiers and meter entries move together (test_store checks the move
    itself), re-budgets keep running, and no row ever exceeds its budget (the budgeting node
    raises if one does)."""
    import sphkv_compile.hf_cache as hf_cache

    moves = []
    select_rows_of = hf_cache.select_rows_of
    monkeypatch.setattr(hf_cache, "select_rows_of", lambda stores, rows, **kw: (
        moves.append((len(stores), rows.tolist())), select_rows_of(stores, rows, **kw)))
    model = api.optimize(_model(), policy="rdr", budget=0.3, sink=2, recent=4, rebudget_every=4)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cache = api.new_cache(model, max_cache_len=40 + 12 if static else None)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, num_beams=3,
                         num_return_sequences=3, do_sample=False, **{api.cache_keyword(model): cache})
    assert out.shape == (6, 52)
    assert len(moves) == 12 and all(n == 2 for n, _ in moves)  # every step, both layers at once
    assert any(m != list(range(6)) for _, m in moves)
    for layer in cache.compressed_layers():
        rep = layer.budget_report()
        assert rep["rebudgets"] >= 3 and rep["max_excess"] <= 0, rep
        # rows 0-2 are the first prompt's beams, 3-5 the second's (6 padding tokens fewer)
        entered = budget_meter.entered(layer.meter).tolist()
        assert entered == [40 + 11] * 3 + [34 + 11] * 3, entered


@torch.no_grad()
def test_reorder_cache_moves_each_layers_rows_and_meter():
    """SphkvCache.reorder_cache on a filled RDR cache whose two rows differ in length (so the
    tiers are rebuilt, not copied page by page): every layer's tiers, tokens entered and key
    gain follow their rows."""
    from sphkv_compile.store import gather_tokens

    model = api.optimize(_model(), policy="rdr", budget=0.3, sink=2, recent=4, distortion="logit")
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    cache = api.new_cache(model)
    model(ids, attention_mask=mask, use_cache=True, **{api.cache_keyword(model): cache})
    layers = cache.compressed_layers()
    before = [([gather_tokens(st) for st in layer.store.states], layer.meter.clone()) for layer in layers]
    B = 2
    for _, meter in before:
        assert budget_meter.entered(meter).tolist() == [48, 38]
        gain = budget_meter.key_gain(meter)
        assert gain is not None and not torch.equal(gain[0], gain[1])  # so the move is visible
    cache.reorder_cache(torch.tensor([1, 1]))
    for layer, (tiers, meter) in zip(layers, before):
        assert budget_meter.entered(layer.meter).tolist() == [38, 38]
        gain = layer.meter[budget_meter.SIZE + B:].view(B, -1)
        assert torch.equal(gain, meter[budget_meter.SIZE + B:].view(B, -1)[[1, 1]])
        for st, (rec, util, ok) in zip(layer.store.states, tiers):
            rec2, util2, ok2 = gather_tokens(st)
            n = rec2.shape[2]
            assert torch.equal(ok2, ok[[1, 1], :, :n]) and torch.equal(rec2[ok2], rec[[1, 1], :, :n][ok2])
            assert torch.equal(util2[ok2], util[[1, 1], :, :n][ok2])


def test_meter_rows_follow_a_reorder():
    meter = budget_meter.new_meter(3, 2)
    budget_meter.entered(meter).copy_(torch.tensor([10, 20, 30]))
    meter[budget_meter.SIZE + 3:] = torch.arange(6) + 1
    budget_meter.select_rows(meter, torch.tensor([2, 2, 0]))
    assert budget_meter.entered(meter).tolist() == [30, 30, 10]
    assert meter[budget_meter.SIZE + 3:].tolist() == [5, 6, 5, 6, 1, 2]
    assert int(meter[budget_meter.BATCH]) == 3


@given(seed=strategies.integers(0, 2**31 - 1), layers=strategies.integers(1, 5), batch=strategies.integers(1, 4),
       heads=strategies.sampled_from([1, 3]))
@settings(max_examples=20, deadline=None)
def test_meters_of_many_layers_follow_a_reorder_together(seed, layers, batch, heads):
    """select_rows_of (every layer's meter in one pass, as a beam reorder runs it) leaves each
    meter as select_rows on it alone; layers with other head counts in the same call too."""
    gen = torch.Generator().manual_seed(seed)
    meters = [budget_meter.new_meter(batch, heads if i % 2 else 2) for i in range(layers)]
    for m in meters:
        m[:budget_meter.BATCH] = torch.randint(-5, 100, (budget_meter.BATCH,), generator=gen)
        m[budget_meter.SIZE:] = torch.randint(0, 10**6, (m.numel() - budget_meter.SIZE,), generator=gen)
    rows = torch.randint(0, batch, (batch,), generator=gen)
    alone = [m.clone() for m in meters]
    for m in alone:
        _select_rows_one_by_one(m, rows)
    budget_meter.select_rows_of(meters, rows)
    for got, want in zip(meters, alone):
        assert torch.equal(got, want)


def _select_rows_one_by_one(meter, rows):
    """The per-row reorder written out: entries and key gains of row rows[i] go to row i."""
    B = rows.shape[0]
    entered = budget_meter.entered(meter, B).clone()
    gain = meter[budget_meter.SIZE + B:].view(B, -1).clone()
    for i, r in enumerate(rows.tolist()):
        meter[budget_meter.SIZE + i] = entered[r]
        meter[budget_meter.SIZE + B:].view(B, -1)[i] = gain[r]


def test_training_dropout_on_the_store_refuses():
    model = api.optimize(_model(attention_dropout=0.1), bits=3.5)
    model.train()
    ids = torch.randint(3, 128, (1, 8))
    key = api.cache_keyword(model)
    with pytest.raises(SphkvUnsupportedError, match="dropout"):
        model(ids, use_cache=True, **{key: api.new_cache(model)})
    # without a cache (ordinary training) attention stays dense and runs
    model(ids, use_cache=False).logits.sum().backward()


def test_only_rdr_spends_work_on_the_observation_window(monkeypatch):
    """The attention mass of the last obs_window queries is RDR's utility; the uniform policy
    never reads it, so attention (prefill and decode) is asked for none (window 0)."""
    from sphkv_compile import hf
    from sphkv_compile.options import SphkvOptions

    assert SphkvOptions.from_dict({"obs_window": 16}).utility_window == 0
    assert SphkvOptions.from_dict({"policy": "rdr", "budget": 0.25, "obs_window": 16}).utility_window == 16
    windows = []
    chunk, call_op = hf.chunk_attention, hf.call_op

    def chunk_spy(query, key, value, valid, scale, window, *rest):
        windows.append(("prefill", window))
        return chunk(query, key, value, valid, scale, window, *rest)

    def attend_spy(name, *args):
        if name == "attend":
            windows.append(("decode", args[9]))
        return call_op(name, *args)

    monkeypatch.setattr(hf, "chunk_attention", chunk_spy)
    monkeypatch.setattr(hf, "call_op", attend_spy)
    ids = torch.randint(3, 128, (1, 40))
    for options, want in (({"bits": 3.5, "obs_window": 16}, 0),
                          ({"policy": "rdr", "budget": 0.5, "obs_window": 16, "rebudget_every": 8}, 16)):
        windows.clear()
        model = api.optimize(_model(), **options)
        model.generate(ids, max_new_tokens=3, do_sample=False)
        assert {"prefill", "decode"} <= {phase for phase, _ in windows}, windows
        assert all(w == want for _, w in windows), (options, windows)


def test_optimize_gives_the_ops_their_cuda_kernels():
    """generate() compiles an optimized model with Inductor's own backend, so optimize() must
    register the Triton implementations itself (session 3 ran the torch references on the GPU).
    In a fresh process, so no other test's backend call registers them first."""
    import subprocess
    import sys

    code = ("import torch, transformers as tf\n"
            "from sphkv_compile import api\n"
            "has = lambda: [torch._C._dispatch_has_kernel_for_dispatch_key(f'sphkv::{op}', 'CUDA')\n"
            "               for op in ('attend', 'update_cache', 'encode_append')]\n"
            "before = has()\n"
            "cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,\n"
            "                     num_attention_heads=2, num_key_value_heads=1)\n"
            "api.optimize(tf.LlamaForCausalLM(cfg).eval())\n"
            "print(before, has())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, False, False] [True, True, True]"


def test_rdr_at_long_contexts_warns_about_its_host_allocation():
    """Policy 'rdr' allocates every token of a layer on the host at each re-budget (about a second
    per layer and row at 262k tokens x heads): building a cache that long says so with the fix;
    a short one and the uniform policy stay quiet."""
    from sphkv_compile import SphkvPerformanceWarning

    rdr_model = api.optimize(_model(), policy="rdr", budget=0.25)
    with pytest.warns(SphkvPerformanceWarning, match="max_cache_len=40000 x 2 KV heads.*policy='uniform'"):
        api.new_cache(rdr_model, max_cache_len=40000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvPerformanceWarning)
        api.new_cache(rdr_model, max_cache_len=4000)
        api.new_cache(api.optimize(_model(), bits=3.5), max_cache_len=40000)


def test_generation_longer_than_a_static_cache_is_refused_up_front():
    """A generation that would write past max_cache_len (a device-side assert on a GPU) is refused
    before the first forward, naming the length needed; as transformers sizes its own static
    cache, the last token is never fed back, so prompt + max_new_tokens - 1 positions suffice.
    Also when the length comes from max_length, or from transformers' default of 20 new tokens."""
    model = api.optimize(_model(), bits=3.5)
    ids = torch.randint(3, 128, (1, 20))
    cache = api.new_cache(model, max_cache_len=30)
    kw = {api.cache_keyword(model): cache}
    with pytest.raises(ValueError, match=r"needs 31 cache positions \(prompt 20 \+ max_new_tokens 12 - 1.*"
                                         r"max_cache_len=30.*max_cache_len=31"):
        model.generate(ids, max_new_tokens=12, do_sample=False, **kw)
    with pytest.raises(ValueError, match=r"needs 33 cache positions \(max_length 34 - 1"):
        model.generate(ids, max_length=34, do_sample=False, **kw)
    with pytest.raises(ValueError, match=r"needs 39 cache positions \(prompt 20 \+ transformers' default of 20"):
        model.generate(ids, do_sample=False, **kw)
    out = model.generate(ids, max_new_tokens=11, min_new_tokens=11, do_sample=False, **kw)
    assert out.shape == (1, 31)  # 30 positions held: the 31st token was sampled, not fed back


def test_rdr_rebudgets_that_dominate_a_generate_are_reported():
    """When RDR's host-side re-budgets take most of a generate() call, it warns with their share
    and the fix; short calls and a minority share stay quiet. generate() passes this call's
    timed re-budgets (report()['rebudgets'])."""
    from sphkv_compile import SphkvPerformanceWarning
    from sphkv_compile.hf_advice import warn_if_rebudgets_dominate

    timed = {"prefill": {"count": 2, "host_seconds": 0.5}, "decode": {"count": 8, "host_seconds": 1.5}}
    with pytest.warns(SphkvPerformanceWarning, match=r"took 2.00 s of this generate\(\)'s 3.00 s \(10 layer "
                                                     r"re-budgets, 200.0 ms each.*rebudget_every \(now 32\)"):
        warn_if_rebudgets_dominate(3.0, timed, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvPerformanceWarning)
        warn_if_rebudgets_dominate(5.0, timed, 32)  # 40%
        warn_if_rebudgets_dominate(0.5, {"decode": {"count": 1, "host_seconds": 0.4}}, 32)  # a short call
        warn_if_rebudgets_dominate(10.0, {}, 32)  # the uniform policy: none

    seen = []
    model = api.optimize(_model(), policy="rdr", budget=0.3, sink=2, recent=4, rebudget_every=4)
    import sphkv_compile.api as api_module
    original = api_module.warn_if_rebudgets_dominate
    api_module.warn_if_rebudgets_dominate = lambda seconds, timed, every: seen.append((seconds, timed, every))
    try:
        model.generate(torch.randint(3, 128, (1, 40)), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    finally:
        api_module.warn_if_rebudgets_dominate = original
    (seconds, timed, every), = seen
    assert every == 4 and seconds > timed["decode"]["host_seconds"] > 0 and timed["decode"]["count"] >= 2


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 2])
def test_a_dynamic_cache_reserves_every_layer_at_the_first_with_one_read(beams, monkeypatch):
    """A dynamic cache grows its pools before each chunk; the step's first layer reserves the
    tiers of all layers at once (one read back, a sync on a GPU, instead of two per layer). With
    pages of 4 tokens the pools grow many times; greedy and beam search (whose reorder moves
    tokens between rows and so clears what was reserved) give the tokens of a static cache,
    which never grows."""
    from sphkv_compile import hf_cache

    calls = []
    real = hf_cache.reserve_tiers
    monkeypatch.setattr(hf_cache, "reserve_tiers", lambda requests: calls.append(len(requests)) or real(requests))
    options = dict(page_size=4, sink=2, recent=4)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, num_beams=beams, attention_mask=torch.ones_like(ids))
    model = api.optimize(_model(num_hidden_layers=3), **options)
    calls.clear()  # optimize()'s trial forward used a cache of its own
    dynamic = model.generate(ids, **kw)
    # the prefill: each layer's store starts in its own update, so each reserves itself alone;
    # then one call per decode step for all 3 layers x (exact + compressed tier)
    assert calls == [2, 2, 2] + [6] * 23, calls
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)


@torch.no_grad()
def test_a_dropped_cache_is_freed_without_the_cycle_collector():
    """The layers know their cache only weakly: a cache dropped after generate() frees its pools at
    once, not whenever Python's cycle collector next runs (which a GPU out of memory never calls)."""
    import gc
    import weakref

    model = api.optimize(_model())
    cache = api.new_cache(model)
    ids = torch.randint(3, 128, (1, 9))
    model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids),
                   **{api.cache_keyword(model): cache})
    layer, store = weakref.ref(cache.layers[0]), weakref.ref(cache.layers[0].store)
    gc.disable()
    try:
        del cache
        assert layer() is None and store() is None
    finally:
        gc.enable()


@torch.no_grad()
def test_a_cache_of_the_callers_own_runs_dense_and_says_so_once():
    """transformers' own cache passed to an optimized model holds dense K/V: the tokens are
    dense's, and a SphkvCoverageWarning names the cause and the fix, once per cache object."""
    from sphkv_compile.options import SphkvCoverageWarning

    model = _model()
    ids = torch.randint(3, 128, (1, 12))
    dense = model.generate(ids, max_new_tokens=5, do_sample=False)
    fast = api.optimize(copy.deepcopy(model))
    for cache in (tf.DynamicCache(config=model.config), tf.StaticCache(config=model.config, max_cache_len=32)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fast.generate(ids, max_new_tokens=5, do_sample=False, **{api.cache_keyword(fast): cache})
        said = [w for w in caught if issubclass(w.category, SphkvCoverageWarning)]
        assert torch.equal(out, dense)
        assert len(said) == 1 and type(cache).__name__ in str(said[0].message)
        assert "new_cache" in str(said[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvCoverageWarning)  # sphkv's own cache: nothing to say
        fast.generate(ids, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_a_prefilled_cache_deep_copied_per_request_gives_dense_tokens(static):
    """transformers' prompt reuse: prefill a shared prefix once, deep-copy the cache for each
    request. Each copy continues like dense, the original stays as it was, and the copy's layers
    belong to the copy (their pool reservations follow it, not the original)."""
    model = _model()
    fast = api.optimize(copy.deepcopy(model), tiers=("exact:exact", "hi:k12:polar12:r32"), sink=2, recent=8,
                        kv_dtype=torch.float32)
    key = api.cache_keyword(fast)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 128, (1, 40), generator=g)
    dense_cache = tf.DynamicCache(config=model.config)
    model(prefix, **{key: dense_cache})
    shared = api.new_cache(fast, max_cache_len=80) if static else api.new_cache(fast)
    fast(prefix, **{key: shared})
    counts = [[int(s.count.sum()) for s in layer.store.states] for layer in shared.compressed_layers()]
    for _ in range(2):
        ids = torch.cat([prefix, torch.randint(3, 128, (1, 6), generator=g)], 1)
        dense = model.generate(ids, max_new_tokens=10, do_sample=False, **{key: copy.deepcopy(dense_cache)})
        mine = copy.deepcopy(shared)
        assert all(layer.owner() is mine for layer in mine.compressed_layers())
        for layer in mine.compressed_layers():  # a packed copy's views are found by its arena, not rebuilt
            st = layer.store
            if st.arena is not None:
                found = packed_state.views_of(st.arena, st.layout, torch.float16, None)
                assert all(a is b for a, b in zip(found, st.states))
        assert torch.equal(fast.generate(ids, max_new_tokens=10, do_sample=False, **{key: mine}), dense)
        assert int(shared.get_seq_length()) == 40
        assert [[int(s.count.sum()) for s in layer.store.states] for layer in shared.compressed_layers()] == counts


@torch.no_grad()
def test_a_dynamic_cache_holds_a_fraction_of_dense_bytes_after_a_long_prompt():
    """The default generate() cache (dynamic) grows its pools per step. After a prompt the exact
    tier holds the sinks and the recent window only, so its pool stays that size (it once
    reserved room for the whole prompt: 1.5x dense bytes on SmolLM2's shape); the store's share
    of dense bytes falls as the prompt grows (fixed exact tokens, pages and growth headroom
    weigh less), to well under half at 2,000 tokens."""
    model = api.optimize(_model(max_position_embeddings=4096), bits=3.5)
    o = model._sphkv_state.options
    shares = []
    for prompt in (300, 900, 2000):
        cache = api.new_cache(model)
        model.generate(torch.randint(3, 128, (1, prompt)), max_new_tokens=8, do_sample=False,
                       **{api.cache_keyword(model): cache})
        held, dense = cache.kv_bytes()
        shares.append(held / dense)
        for layer in cache.compressed_layers():
            st = layer.store
            exact = st.states[st.tier_index("exact")]
            per_head = -(-(o.sink + o.recent) // exact.page_size)
            assert exact.pool.shape[0] <= 2 * st.batch * st.kv_heads * per_head + 1, (prompt, exact.pool.shape)
    assert shares == sorted(shares, reverse=True) and shares[-1] < 0.4, shares


@torch.no_grad()
def test_continuous_batching_is_refused_naming_the_fix():
    """transformers' continuous batching keeps K/V in its own paged cache: every entry point
    (generate_batch, init_continuous_batching, cache_implementation='paged') raises up front
    with the cause and the fix, instead of failing inside transformers or running dense."""
    model = api.optimize(_model())
    ids = torch.randint(3, 128, (1, 8))
    config = tf.GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=2)
    for call in (lambda: model.generate_batch(inputs=[ids[0].tolist()], generation_config=config),
                 lambda: model.init_continuous_batching(generation_config=config),
                 lambda: model.generate(ids, max_new_tokens=4, cache_implementation="paged")):
        with pytest.raises(ValueError, match="paged cache, which sphkv does not compress. Fix: batch"):
            call()
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)


@torch.no_grad()
def test_asking_for_attention_weights_warns_once_that_compressed_layers_give_none():
    """Compressed layers return no attention weights (as with sdpa): output_attentions=True
    gives no entries for them, and the caller is told so once per model, with the fix."""
    model = api.optimize(_model())
    ids = torch.randint(3, 128, (1, 8))
    with pytest.warns(api.SphkvCoverageWarning, match="output_attentions=True, but compressed layers"):
        out = model(ids, output_attentions=True)
    assert not any(a is not None for a in out.attentions)
    with warnings.catch_warnings():
        warnings.simplefilter("error", api.SphkvCoverageWarning)
        model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
        model(ids)


@torch.no_grad()
@pytest.mark.parametrize("length", ["max_new_tokens", "max_length"])
def test_a_prompt_given_as_embeddings_sizes_a_static_cache(length):
    """generate(inputs_embeds=...) without input_ids: a static cache is sized from the
    embeddings' length as transformers sizes its own (max_length counts the prompt), gives
    dense's tokens at 12-bit codes, and a cache one position short is refused up front."""
    model = _model()
    ids = torch.randint(3, 128, (2, 24))
    embeds = model.get_input_embeddings()(ids)
    ask = {"max_new_tokens": 9} if length == "max_new_tokens" else {"max_length": 24 + 9}
    dense = model.generate(inputs_embeds=embeds, do_sample=False, **ask)
    model = api.optimize(model, bits=12)
    out = model.generate(inputs_embeds=embeds, do_sample=False, cache_implementation="static", **ask)
    assert torch.equal(out, dense)
    short = api.new_cache(model, max_cache_len=24 + 9 - 2)
    with pytest.raises(ValueError, match="needs 32 cache positions"):
        model.generate(inputs_embeds=embeds, do_sample=False, past_key_values=short, **ask)


@torch.no_grad()
def test_a_cache_with_every_layer_dense_says_so_once():
    """Every layer of this Mistral slides a 16-token window over a longer sequence, so all stay
    dense (hf_plan) and the cache saves nothing: generate() still gives dense's tokens, and the
    caller is told once, with the reason, not only through report()."""
    torch.manual_seed(0)
    config = tf.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=16, pad_token_id=0)
    model = tf.MistralForCausalLM(config).eval()
    ids = torch.randint(3, 128, (1, 40))
    dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    model = api.optimize(model, bits=12)
    with pytest.warns(api.SphkvCoverageWarning, match="none of this model's 2 layers is compressed.*sliding window of 16"):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", api.SphkvCoverageWarning)
        model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert not any(site["rewritten"] for site in api.report()["sites"])


@torch.no_grad()
def test_a_compiled_forward_over_a_dynamic_cache_warns_once_naming_the_static_cache():
    """A forward the caller compiled breaks its graph wherever a dynamic cache's pools grow: the
    tokens are dense's, and generate() says once why the step runs mostly eagerly and how to
    compile it instead; over a static cache it says nothing."""
    model = _model()
    ids = torch.randint(3, 128, (1, 12))
    dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    model = api.optimize(model, bits=12)
    model.forward = torch.compile(model.forward, backend="eager")
    with pytest.warns(api.SphkvPerformanceWarning, match="forward is compiled, but .* dynamic sphkv cache"):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error", api.SphkvPerformanceWarning)
        model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static"), dense)
    torch._dynamo.reset()


@torch.no_grad()
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_cache_passed_to_the_forward_by_either_keyword_is_the_one_used(keyword):
    """transformers 5.25 names the forward's cache `cache` and still maps the older
    `past_key_values` to it: a sphkv cache passed by either name is prefilled and continued (until
    session 38 the older name was ignored, a new cache made, and the decode step attended over
    nothing), and the step's logits are dense's at 12-bit codes."""
    model = _model()
    ids = torch.randint(3, 128, (1, 40))
    dense = model(ids).logits[:, -1]
    model = api.optimize(model, bits=12)
    cache = api.new_cache(model)
    model(ids[:, :-1], **{keyword: cache})
    step = model(ids[:, -1:], **{keyword: cache}).logits[:, -1]
    assert cache.get_seq_length() == 40
    torch.testing.assert_close(step, dense, rtol=0, atol=2e-3)
