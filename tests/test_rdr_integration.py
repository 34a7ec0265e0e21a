"""The budget in both integration paths: the budgeting node of the graph rewrite (a compiled
gpt-fast-style model) and the transformers cache (generate() on a tiny Llama), under
policy 'uniform' (byte accounting) and 'rdr' (re-budgeting every rebudget_every steps)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from sphkv_compile import api, rdr
from sphkv_compile.backend import sphkv_backend
from sphkv_compile.inductor_passes.stores import store_of
from sphkv_compile.ops import tiers_string
from sphkv_compile.rdr import meter as budget_meter
from sphkv_compile.rdr.capacity import metadata_allowance_bytes
from sphkv_compile.store import TierState
from sphkv_compile.tiers import DEFAULT_TIERS, record_words
from tests.models import gpt_fast
from tests.models.bounds import relative_rms
from tests.models.tiny_llama import tiny_llama

RDR = {"policy": "rdr", "budget": 0.125, "sink": 2, "recent": 4, "rebudget_every": 8, "page_size": 8}


@pytest.fixture(autouse=True)
def quick_inner_compiler(monkeypatch):
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")


def _gpt_fast(max_seq=256, seed=0):
    torch.manual_seed(seed)
    m = gpt_fast.GPTFast(gpt_fast.Config(max_seq=max_seq)).eval()
    m.setup_caches(1)
    return m, torch.randint(0, m.cfg.vocab, (1, 48))


def _stores(model):
    return [store_of(b.attn.kv_cache.k_cache) for b in model.blocks]


def _held_bytes(store) -> int:
    """Every tensor the store keeps (pools, utility, page tables, counts, free stacks, cursor,
    meter), recounted from the tensors themselves."""
    return sum(t.numel() * t.element_size() for t in store.tensors())


@pytest.mark.parametrize("policy, update", [("uniform", "update_cache"), ("rdr", "update_cache_rdr")])
@torch.no_grad()
def test_budgeting_node_follows_each_cache_update(policy, update):
    model, prompt = _gpt_fast()
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(sphkv_backend(gm, example_inputs, options={**RDR, "policy": policy, "budget": 0.5}))
        return compiled[-1]

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(prompt, torch.arange(prompt.shape[1]))
    nodes = list(compiled[0].gm.graph.nodes)
    names = [str(n.target) for n in nodes]
    budget_nodes = [i for i, n in enumerate(names) if n == "sphkv.kv_budget.default"]
    updates = [i for i, n in enumerate(names) if n == f"sphkv.{update}.default"]
    assert len(budget_nodes) == len(updates) == model.cfg.layers
    for u, b in zip(updates, budget_nodes):
        assert u < b and nodes[b].args[0] == nodes[u].args[0]  # after the update, on the same store
        assert nodes[b].args[9] == policy and nodes[b].args[10] == 0.5  # policy, budget travel as constants
    attends = [n for n in nodes if str(n.target) == "sphkv.attend.default"]
    assert [n.args[-1] for n in attends] == [policy == "rdr"] * model.cfg.layers  # accumulate decode utility


@torch.no_grad()
def test_compiled_rdr_stays_within_budget_every_step_and_near_dense():
    """A 150-step decode at budget 1/8 of a 256-token cache: the budget holds about 32 exact
    tokens per KV head, so RDR re-budgets throughout. Checked after every step, from the page
    tables (not only the meter): token bytes <= budget, pages in use <= budget + page slack."""
    steps = 150
    model, prompt = _gpt_fast()
    ref_tokens, ref_logits = gpt_fast.generate(model, prompt, steps)
    model.setup_caches(1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options=RDR)
    counters.clear()
    graphs, reports = [], []

    def step(*args):
        out = compiled(*args)
        graphs.append(counters["stats"]["unique_graphs"])
        reports.append([(s.budget_report(), _held_bytes(s)) for s in _stores(model)])
        return out

    tokens, logits = gpt_fast.generate(model, prompt, steps, step, forced=ref_tokens)
    cfg = model.cfg
    budget = rdr.layer_budget_bytes(0.125, cfg.max_seq, cfg.kv_heads, cfg.head_dim)
    allowance = metadata_allowance_bytes(tuple(DEFAULT_TIERS), 1, cfg.kv_heads, cfg.head_dim, RDR["page_size"], budget,
                                         seed=0, kv_dtype=torch.float32)
    for i, per_layer in enumerate(reports):
        for r, held in per_layer:
            assert r["budget_bytes"] == budget
            assert r["token_bytes"] <= budget, (i, r)
            assert r["page_bytes_in_use"] <= budget + r["page_slack_bytes"], (i, r)
            assert r["entered"] == [prompt.shape[1] + i]
            assert held <= budget + allowance, (i, held, budget, allowance)  # memory, not only the meter
    most = max(held for per_layer in reports for _, held in per_layer)
    print(f"compiled rdr: most held by a layer at any step {most} bytes; budget {budget} + allowance {allowance}")
    last = reports[-1][0][0]
    assert last["max_excess"] <= 0 and last["calls"] == steps + 1
    assert last["rebudgets"] >= steps // RDR["rebudget_every"] - 1  # once per rebudget_every steps
    assert sum(last["tokens"].values()) < model.cfg.kv_heads * (prompt.shape[1] + steps)  # some were dropped
    assert graphs[-1] == graphs[2], graphs  # no recompiles after warm-up
    # against dense logits (all tokens, full precision) while RDR holds 1/8 of the bytes: 0.15 is a
    # regression guard, not a derived bound (measured 0.097 here in session 8)
    print(f"compiled rdr: logits relative rms vs dense {relative_rms(logits, ref_logits):.4f}")
    assert relative_rms(logits, ref_logits) < 0.15


@pytest.mark.parametrize("distortion", ["unit", "logit"])
@torch.no_grad()
def test_compiled_rdr_distortion_option_feeds_the_key_gain_of_the_queries(distortion):
    """distortion='logit': the update op receives the queries and the meter keeps a running key
    gain per KV head (s²·E‖q‖²/d, positive and finite); 'unit' passes none. Both stay in budget."""
    model, prompt = _gpt_fast()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={**RDR, "distortion": distortion})
    gpt_fast.generate(model, prompt, 24, compiled)
    cfg = model.cfg
    budget = rdr.layer_budget_bytes(RDR["budget"], cfg.max_seq, cfg.kv_heads, cfg.head_dim)
    allowance = metadata_allowance_bytes(tuple(DEFAULT_TIERS), 1, cfg.kv_heads, cfg.head_dim, RDR["page_size"], budget,
                                         seed=0, kv_dtype=torch.float32)
    for s in _stores(model):
        r = s.budget_report()
        assert r["max_excess"] <= 0 and r["rebudgets"] >= 2
        assert _held_bytes(s) <= budget + allowance  # the 'logit' prior sizes the pools differently
        if distortion == "unit":
            assert r["key_gain"] is None
        else:
            gain = torch.tensor(r["key_gain"])
            assert gain.shape == (1, model.cfg.kv_heads) and torch.isfinite(gain).all() and (gain > 0).all()


@torch.no_grad()
def test_compiled_rdr_with_room_for_everything_is_dense_attention():
    model, prompt = _gpt_fast(max_seq=128)
    ref_tokens, ref_logits = gpt_fast.generate(model, prompt, 8)
    model.setup_caches(1)
    torch._dynamo.reset()
    # the cache is float32: an exact token costs 256 + 2 (utility) bytes per KV head against 128
    # in the 16-bit reference the budget is a fraction of: 2.0 (a dense 32-bit cache) holds the
    # 110 tokens per row this test writes at the exact tier, 1.0 does not
    compiled = torch.compile(model, backend="sphkv", options={**RDR, "budget": 2.0})
    _, logits = gpt_fast.generate(model, prompt, 8, compiled, forced=ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4
    everything = {"exact": 2 * (48 + 8), "high": 0, "mid": 0, "low": 0}  # 2 KV heads x (prompt + 8 steps)
    assert [r.budget_report()["tokens"] for r in _stores(model)] == [everything] * model.cfg.layers


@torch.no_grad()
def test_compiled_uniform_policy_accounts_bytes_and_refuses_a_budget_it_cannot_keep():
    model, prompt = _gpt_fast(max_seq=128)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={"budget": 0.5, "sink": 2, "recent": 4})
    gpt_fast.generate(model, prompt, 4, compiled)
    for s in _stores(model):
        r = s.budget_report()
        assert r["calls"] == 5 and r["rebudgets"] == 0
        assert 0 < r["token_bytes"] <= r["budget_bytes"] == rdr.layer_budget_bytes(0.5, 128, 2, 32)
    model.setup_caches(1)
    torch._dynamo.reset()
    too_small = torch.compile(model, backend="sphkv", options={"budget": 0.05, "sink": 2, "recent": 4})
    with pytest.raises(Exception, match="Fix: raise the budget"):
        too_small(prompt, torch.arange(prompt.shape[1]))


# ---- the transformers cache ------------------------------------------------------------------
def _llama():
    return tiny_llama(max_positions=512)


@pytest.mark.parametrize("static", [True, False])
@torch.no_grad()
def test_generate_with_rdr_stays_within_budget(static):
    prompt, new = 96, 100
    model = api.optimize(_llama(), **{**RDR, "recent": 8})
    ids = torch.randint(3, 128, (1, prompt))
    cache = api.new_cache(model, max_cache_len=prompt + new if static else None)
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         **{api.cache_keyword(model): cache})
    assert out.shape[1] == prompt + new
    for layer in cache.compressed_layers():
        r = layer.budget_report()
        tokens = prompt + new - 1
        expect = rdr.budget_bytes(layer.options, tokens, 2, 32, torch.bfloat16, prompt + new if static else None)
        assert r["budget_bytes"] == expect
        assert r["max_excess"] <= 0 and r["token_bytes"] <= expect  # at every update (meter) and at the end
        assert r["page_bytes_in_use"] <= expect + r["page_slack_bytes"]
        assert r["rebudgets"] >= new // RDR["rebudget_every"] - 1
        assert r["entered"] == [tokens] and sum(r["tokens"].values()) < 2 * tokens  # 2 KV heads; some dropped
    # the same cache reused: reset() starts the meter again
    cache.reset()
    assert all(budget_meter.read(layer.meter)["calls"] == 0 for layer in cache.compressed_layers())


def test_rdr_without_budget_is_refused_up_front():
    with pytest.raises(rdr.SphkvBudgetError, match="needs a byte budget"):
        api.new_cache(api.optimize(_llama(), policy="rdr"))


# ---- the ops themselves --------------------------------------------------------------------
def test_budget_ops_pass_opcheck():
    D, KV = 32, torch.bfloat16
    specs = DEFAULT_TIERS
    budget = rdr.check_budget(_opts(), 2, D, KV, 256)  # a 256-token static cache
    sizes = rdr.pool_pages(specs, budget, 1, 2, D, 8, seed=0, kv_dtype=KV)
    states = [TierState.allocate(1, 2, n, 8, sum(record_words(s, D, 0, KV)), mp, "cpu")
              for s, (n, mp) in zip(specs, sizes)]
    flat = [t for s in states for t in s.tensors()]
    meter = budget_meter.new_meter(1)
    tokens = torch.tensor([40])
    k, v = torch.randn(1, 2, 40, D), torch.randn(1, 2, 40, D)
    tiers = tiers_string(specs)
    torch.library.opcheck(torch.ops.sphkv.update_cache_rdr.default,
                          (flat, meter, tokens, k, v, None, torch.rand(1, 2, 40), tiers, 0, "bfloat16", 2, 4, 0.125,
                           256, 8), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.sphkv.kv_budget.default,
                          (flat, meter, tokens, tiers, 0, "bfloat16", D, 2, 4, "rdr", 0.125, 256, 8),
                          test_utils=("test_schema", "test_faketensor"))


def _opts():
    from sphkv_compile.options import SphkvOptions
    return SphkvOptions(policy="rdr", budget=0.125, sink=2, recent=4, rebudget_every=8)


def _rdr_generate(model, ids, new, cache, processors=None):
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          logits_processor=processors, **{api.cache_keyword(model): cache})


def _layer_snapshot(cache):
    from sphkv_compile.store import gather_tokens

    out = []
    for layer in cache.compressed_layers():
        tiers = []
        for st in layer.store.states:
            rec, util, ok = gather_tokens(st)
            tiers.append((st.count.clone(), rec[ok].clone(), util[ok].clone()))
        out.append((budget_meter.read(layer.meter), tiers))
    return out


@torch.no_grad()
def test_rdr_decode_steps_as_captured_with_rebudgets_between_steps_equal_eager(monkeypatch):
    """generate() replaying RDR's decode step from CUDA graphs, simulated on the CPU: every decode
    update taken as captured (the token joins the exact tier on the device, nothing decided on
    the host) and the re-budget check run between steps by the logits processor optimize()'s
    generate() adds. Same greedy tokens, the same tiers (records, utility, order) and the same
    meter as the eager path, which re-budgets inside each step; re-budgets did happen. (The worst
    excess differs: see below.)"""
    from sphkv_compile.rdr import node
    from transformers import LogitsProcessor, LogitsProcessorList

    prompt, new = 96, 64
    model = api.optimize(_llama(), **RDR)
    ids = torch.randint(3, 128, (2, prompt))
    cache = api.new_cache(model, max_cache_len=prompt + new)
    eager = _rdr_generate(model, ids, new, cache)
    want = _layer_snapshot(cache)
    assert all(m["rebudgets"] >= 3 for m, _ in want)

    decoding = [False]

    class AfterPrefill(LogitsProcessor):  # runs after every forward: the next updates are decode steps
        def __call__(self, input_ids, scores):
            decoding[0] = True
            return scores

    rebudgets_between = []
    original_due = type(cache).rebudget_due
    monkeypatch.setattr(type(cache), "rebudget_due", lambda self: rebudgets_between.append(original_due(self)) or 0)
    monkeypatch.setattr(node, "capturing", lambda: decoding[0])
    monkeypatch.setattr(api, "_decode_step_mode", lambda kwargs, model, cache: (True, "simulated CUDA graphs"))
    cache.reset()
    replayed = _rdr_generate(model, ids, new, cache, LogitsProcessorList([AfterPrefill()]))
    assert torch.equal(replayed, eager)
    assert len(rebudgets_between) == new and sum(rebudgets_between) > 0  # after every forward; some re-budgeted
    got = _layer_snapshot(cache)
    for (m_got, tiers_got), (m_want, tiers_want) in zip(got, want):
        # the replayed step measures before the re-budget that follows it, the eager one after:
        # both within the budget, the replay's worst closer to it
        assert m_got.pop("max_excess") <= 0 and m_want.pop("max_excess") <= 0
        assert m_got == m_want and m_got["lost_tokens"] == 0
        for a, b in zip(tiers_got, tiers_want):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def test_rdr_decode_steps_as_captured_without_rebudgets_are_refused_after_generate(monkeypatch):
    """Decode steps replayed from graphs with no re-budget between them (a decode loop that does
    not call SphkvCache.rebudget_due) overrun the budget or the exact tier: generate() raises,
    naming the cause, rather than return what a full tier silently dropped."""
    from sphkv_compile.rdr import node

    prompt, new = 96, 64
    model = api.optimize(_llama(), **RDR)
    ids = torch.randint(3, 128, (1, prompt))
    cache = api.new_cache(model, max_cache_len=prompt + new)
    calls = [0]

    def capturing():  # every update after the prefill's
        calls[0] += 1
        return calls[0] > 2 * len(cache.compressed_layers())

    monkeypatch.setattr(node, "capturing", capturing)
    with pytest.raises(rdr.SphkvBudgetError, match="over its budget|could not store"):
        _rdr_generate(model, ids, new, cache)
