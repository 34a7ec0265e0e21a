"""The paged store against float64 dense attention: GQA, T from 1 to 4096, dtypes, causal
chunks with padding, compaction, tier homogeneity and exact byte accounting."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import DTYPES, HEAD_DIMS, dense_attention, rel_err
from sphkv_compile.rdr.convert import decode_kv
from sphkv_compile.store import LayerStore, StoreCapacityError, TierState, gather_tokens
from sphkv_compile.tiers import DEFAULT_TIERS, TierSpec

EXACT = TierSpec("exact")
HIGH = TierSpec("hi", 14.0, "polar", 14.0, 32)


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


lengths = st.one_of(st.integers(1, 64), st.integers(65, 600), st.sampled_from([1024, 4096]))


@given(d=st.sampled_from(HEAD_DIMS), group=st.sampled_from([1, 2, 4, 8]), T=lengths,
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2))
@settings(max_examples=20)
def test_decode_from_codes_matches_dense(d, group, T, dtype, seed, batch):
    """High-precision tier: decode attention over codes equals dense within 1e-3 (float32 math)."""
    if T * d > 1024 * 128:  # keep CI time bounded: long T with the largest dims is sampled less
        T = 1024
    hkv = 2
    k, v = randn(batch, hkv, T, d, seed=seed, dtype=dtype), randn(batch, hkv, T, d, seed=seed + 1, dtype=dtype)
    q = randn(batch, hkv * group, 1, d, seed=seed + 2, dtype=dtype)
    store = LayerStore(batch, hkv, d, (EXACT, HIGH), kv_dtype=dtype)
    store.append(k, v, tier="hi")
    out, _ = store.attend(q)
    assert out.dtype == dtype
    ref = dense_attention(q, k, v)
    # bf16/fp16 outputs carry their own rounding (2^-8 / 2^-11 relative)
    tol = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(out, ref) < tol


@given(d=st.sampled_from([32, 64, 80]), group=st.sampled_from([1, 3, 4]), past=st.integers(0, 40),
       chunk=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), pad=st.integers(0, 5))
@settings(max_examples=20)
def test_prefill_chunk_is_causal_with_padding(d, group, past, chunk, seed, pad):
    """Stored past tokens (exact tier) + a dense chunk attended causally; left padding of row 1
    is masked out. Equals float64 dense attention exactly (float32 math)."""
    B, hkv = 2, 2
    T = past + chunk
    k, v = randn(B, hkv, T, d, seed=seed), randn(B, hkv, T, d, seed=seed + 1)
    q = randn(B, hkv * group, chunk, d, seed=seed + 2)
    pad = min(pad, chunk)
    valid = torch.ones(B, chunk, dtype=torch.bool)
    valid[1, :pad] = False
    store = LayerStore(B, hkv, d, (EXACT,), kv_dtype=torch.float32)
    if past:
        store.append(k[:, :, :past], v[:, :, :past])
    out, mass = store.attend(q, k[:, :, past:], v[:, :, past:], valid_new=valid, obs_window=chunk)
    key_valid = torch.cat((torch.ones(B, past, dtype=torch.bool), valid), 1)
    ref = dense_attention(q, k, v, causal_offset=past, key_valid=key_valid)
    rows = valid[:, None, :, None].expand_as(ref)  # padded query rows are not compared
    assert rel_err(out.double()[rows], ref[rows]) < 1e-5
    # observation-window mass: each real query spreads exactly one unit over visible tokens
    real_queries = valid.sum(-1).double() * group
    assert torch.all(mass.double().sum(-1) <= real_queries[:, None] + 1e-4)
    if past == 0:  # nothing stored: all of the mass lands on the chunk
        assert torch.allclose(mass.double().sum(-1), real_queries[:, None].expand(B, hkv), rtol=1e-5)


def test_exact_tier_round_trips_bits():
    k, v = randn(1, 2, 10, 64, seed=1, dtype=torch.bfloat16), randn(1, 2, 10, 64, seed=2, dtype=torch.bfloat16)
    store = LayerStore(1, 2, 64, (EXACT,), kv_dtype=torch.bfloat16)
    store.append(k, v)
    rec, _, valid = gather_tokens(store.states[0])
    assert valid.all()
    assert torch.equal(rec[..., :32].contiguous().view(torch.bfloat16), k)
    assert torch.equal(rec[..., 32:].contiguous().view(torch.bfloat16), v)


def _state_bytes(st: TierState) -> int:
    return sum(t.numel() * t.element_size() for t in st.tensors())


@given(appends=st.lists(st.tuples(st.integers(1, 70), st.sampled_from(["exact", "high", "mid", "low"])),
                        min_size=1, max_size=6), seed=st.integers(0, 1000))
@settings(max_examples=15)
def test_pages_stay_tier_homogeneous_and_bytes_are_exact(appends, seed):
    store = LayerStore(2, 3, 64, DEFAULT_TIERS, kv_dtype=torch.bfloat16, page_size=16)
    for i, (n, tier) in enumerate(appends):
        store.append(randn(2, 3, n, 64, seed=seed + i), randn(2, 3, n, 64, seed=seed + 100 + i), tier=tier)
    assert store.resident_bytes() == sum(_state_bytes(s) for s in store.states)
    used_pages = []
    for st in store.states:
        pages = st.pages[st.pages >= 0]
        used_pages.append(set(pages.tolist()))
        # every listed page is out of the free stack, and every token fits its tier's pages
        free = set(st.free[: int(st.free_top[0])].tolist())
        assert not (free & used_pages[-1])
        assert int(((st.count + 15) // 16).sum()) == pages.numel()
    expected = {}
    for n, tier in appends:
        expected[tier] = expected.get(tier, 0) + n * 6
    assert store.token_counts() == {t.name: expected.get(t.name, 0) for t in DEFAULT_TIERS}


@given(seed=st.integers(0, 1000), n=st.integers(5, 120))
@settings(max_examples=10)
def test_retier_compacts_and_drops(seed, n):
    d = 64
    store = LayerStore(1, 2, d, DEFAULT_TIERS, kv_dtype=torch.float32, page_size=8)
    k, v = randn(1, 2, n, d, seed=seed), randn(1, 2, n, d, seed=seed + 1)
    store.append(k, v)
    g = torch.Generator().manual_seed(seed)
    dest = torch.randint(-1, 4, (1, 2, n), generator=g)
    store.retier([dest, None, None, None])
    counts = store.token_counts()
    for t, spec in enumerate(DEFAULT_TIERS):
        assert counts[spec.name] == int((dest == t).sum())
    # the kept exact tokens are the same vectors, in arrival order
    rec, _, valid = gather_tokens(store.states[0])
    for h in range(2):
        kept = k[0, h][dest[0, h] == 0]
        got = rec[0, h][valid[0, h]][:, :d].contiguous().view(torch.float32)
        assert torch.equal(got, kept)
    # attention over the survivors equals float64 attention over the same tokens decoded
    if (dest >= 0).any(-1).all():
        q = randn(1, 4, 1, d, seed=seed + 2)
        out, _ = store.attend(q)
        for h in range(2):  # per KV head: its survivors, decoded, in any order
            kh, vh = [], []
            for spec, state in zip(DEFAULT_TIERS, store.states):
                rec, _, valid = gather_tokens(state)
                kk, vv = decode_kv(spec, rec, d, store.seed, torch.float32, rotated=False)
                kh.append(kk[0, h][valid[0, h]])
                vh.append(vv[0, h][valid[0, h]])
            ref = dense_attention(q[:, 2 * h:2 * h + 2], torch.cat(kh)[None, None], torch.cat(vh)[None, None])
            # float32 against float64 over the same decoded values: rounding only
            torch.testing.assert_close(out[:, 2 * h:2 * h + 2].double(), ref, rtol=1e-4, atol=1e-5)


def test_update_keeps_sinks_and_recent_exact():
    store = LayerStore(1, 1, 32, (EXACT, TierSpec("mid", 3.0, "polar", 3.0)), kv_dtype=torch.float32)
    ks, vs = [], []
    for step in range(30):
        n = 20 if step == 0 else 1
        k, v = randn(1, 1, n, 32, seed=step), randn(1, 1, n, 32, seed=100 + step)
        store.update(k, v, sink=2, recent=5, target="mid")
        ks.append(k)
        vs.append(v)
    allk = torch.cat(ks, 2)
    rec, _, _ = gather_tokens(store.states[0])
    exact_k = rec[0, 0, :, :32].contiguous().view(torch.float32)
    assert torch.equal(exact_k, torch.cat((allk[0, 0, :2], allk[0, 0, -5:])))
    assert store.token_counts() == {"exact": 7, "mid": allk.shape[2] - 7}


def test_capacity_errors_name_the_fix():
    from sphkv_compile.store import append_records

    st = TierState.allocate(1, 1, num_pages=1, page_size=4, words=2, max_pages=1, device="cpu")
    with pytest.raises(StoreCapacityError, match="raise max_tokens"):
        append_records(st, torch.zeros(1, 1, 5, 2, dtype=torch.int32), None, None, "t")


def test_gqa_mismatch_is_a_clear_error():
    store = LayerStore(1, 3, 32, (EXACT,), kv_dtype=torch.float32)
    store.append(randn(1, 3, 4, 32, seed=0), randn(1, 3, 4, 32, seed=1))
    with pytest.raises(ValueError, match="cannot be grouped"):
        store.attend(randn(1, 4, 1, 32, seed=2))


def _beam_store(batch, d, prompt_kv, valid, steps_kv, utilities):
    store = LayerStore(batch, 2, d, (EXACT, TierSpec("mid", 3.0, "polar", 3.0)), kv_dtype=torch.float32)
    for (k, v), ok, u in zip([prompt_kv] + steps_kv, [valid] + [None] * len(steps_kv), utilities):
        store.update(k, v, ok, u, sink=2, recent=5, target="mid")
    return store


@given(d=st.sampled_from([32, 64, 80]), batch=st.integers(1, 4), prompt=st.integers(1, 150), steps=st.integers(0, 6),
       seed=st.integers(0, 2**31 - 1), data=st.data())
@settings(max_examples=20, deadline=None)
def test_select_rows_equals_a_store_fed_the_reordered_rows(d, batch, prompt, steps, seed, data):
    """Beam search's reorder (rows may repeat or vanish), then one more decode step: the store
    holds exactly what a store fed row rows[i]'s tokens as row i from the start holds (records,
    utilities, counts, every tier, in order), and attends as it does. Ragged rows (left padding:
    tiers rebuilt) or equal ones (pages copied in place); utilities are random, so they must move too."""
    H = 2
    valid = torch.ones(batch, prompt, dtype=torch.bool)
    if data.draw(st.booleans(), label="ragged"):
        for b in range(batch):
            valid[b, :data.draw(st.integers(0, prompt - 1), label=f"pad{b}")] = False
    kv = [(randn(batch, H, n, d, seed=seed + 2 * i), randn(batch, H, n, d, seed=seed + 2 * i + 1))
          for i, n in enumerate([prompt] + [1] * (steps + 1))]
    util = [randn(batch, H, k.shape[2], seed=seed + 100 + i).abs() for i, (k, _) in enumerate(kv)]
    rows = torch.tensor(data.draw(st.lists(st.integers(0, batch - 1), min_size=batch, max_size=batch), label="rows"))
    store = _beam_store(batch, d, kv[0], valid, kv[1:-1], util[:-1])
    store.select_rows(rows)
    (k_last, v_last), u_last = kv[-1], util[-1]
    store.update(k_last, v_last, None, u_last, sink=2, recent=5, target="mid")
    fed = _beam_store(batch, d, tuple(x[rows] for x in kv[0]), valid[rows],
                      [tuple(x[rows] for x in pair) for pair in kv[1:-1]] + [(k_last, v_last)],
                      [u[rows] for u in util[:-1]] + [u_last])
    for a, b in zip(store.states, fed.states):
        (ra, ua, oa), (rb, ub, ob) = gather_tokens(a), gather_tokens(b)
        assert torch.equal(a.count, b.count)
        assert torch.equal(oa, ob) and torch.equal(ra[oa], rb[ob]) and torch.equal(ua[oa], ub[ob])
    q = randn(batch, 2 * H, 1, d, seed=seed + 40)
    torch.testing.assert_close(store.attend(q)[0], fed.attend(q)[0])


def test_select_rows_grows_a_dynamic_pool_and_refuses_a_fixed_one():
    store = LayerStore(2, 1, 32, (EXACT,), kv_dtype=torch.float32, page_size=4)
    store.states = [store._new_state(EXACT, num_pages=3, max_pages=2)]  # exactly what the tokens below fill
    k = randn(2, 1, 8, 32, seed=0)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :6] = False  # row 0 holds 8 tokens (2 pages), row 1 holds 2 (1 page); two copies of row 0 need 4
    store.append(k, k, valid=valid)
    assert store.states[0].pool.shape[0] == 3
    fixed = LayerStore(2, 1, 32, (EXACT,), kv_dtype=torch.float32, page_size=4, states=list(store.states))
    with pytest.raises(StoreCapacityError, match="dynamic cache"):
        fixed.select_rows(torch.tensor([0, 0]), can_grow=False)
    assert torch.equal(fixed.states[0].count, torch.tensor([[8], [2]], dtype=torch.int32))  # untouched
    store.select_rows(torch.tensor([0, 0]))
    assert torch.equal(store.states[0].count, torch.tensor([[8], [8]], dtype=torch.int32))
    with pytest.raises(ValueError, match="row indices"):
        store.select_rows(torch.tensor([0, 2]))


def test_equal_counts_copy_pages_in_place_like_a_rebuild(monkeypatch):
    """Rows that keep their token counts take the page-by-page copy (no page changes hands) and
    end up holding what the gather-and-rebuild path gives."""
    import sphkv_compile.store as store_module

    def filled():
        store = LayerStore(3, 2, 32, (EXACT, TierSpec("mid", 3.0, "polar", 3.0)), kv_dtype=torch.float32)
        store.update(randn(3, 2, 150, 32, seed=1), randn(3, 2, 150, 32, seed=2), sink=2, recent=5, target="mid")
        return store

    rows = torch.tensor([2, 2, 0])
    fast, slow = filled(), filled()
    pages_before = [st.pages.clone() for st in fast.states]
    calls = []
    original = store_module.copy_rows_pagewise
    monkeypatch.setattr(store_module, "copy_rows_pagewise", lambda states, r: (calls.append(len(states)),
                                                                                original(states, r)))
    fast.select_rows(rows)
    assert calls == [2]  # both tiers, in one call
    assert all(torch.equal(st.pages, p) for st, p in zip(fast.states, pages_before))
    for st in slow.states:  # the general path, by hand
        rec, util, ok = (x[rows] for x in gather_tokens(st))
        store_module.rebuild(st, rec, util, ok)
    for a, b in zip(fast.states, slow.states):
        (ra, ua, oa), (rb, ub, ob) = gather_tokens(a), gather_tokens(b)
        assert torch.equal(oa, ob) and torch.equal(ra[oa], rb[ob]) and torch.equal(ua[oa], ub[ob])


@given(layers=st.integers(1, 4), batch=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), data=st.data())
@settings(max_examples=15, deadline=None)
def test_select_rows_of_many_layers_equals_each_layer_alone(layers, batch, seed, data):
    """Beam search reorders every layer with the same rows: doing all layers at once
    (select_rows_of) leaves each layer as reordering it alone does, and the page copies of all
    layers share one nonzero per page-table shape (not one per tier and layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sphkv_compile.store import select_rows_of

    class CountNonzero(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("nonzero"):
                CountNonzero.calls += 1
            return func(*args, **(kwargs or {}))

    ragged = data.draw(st.booleans(), label="ragged")  # left padding: counts differ, tiers are rebuilt
    valid = torch.ones(batch, 37, dtype=torch.bool)
    if ragged:
        for b in range(batch):
            valid[b, :data.draw(st.integers(0, 20), label=f"pad{b}")] = False

    def filled():
        out = []
        for layer in range(layers):
            store = LayerStore(batch, 2, 32, (EXACT, TierSpec("mid", 3.0, "polar", 3.0)), kv_dtype=torch.float32,
                               page_size=8)
            n = 37  # one length: the layers' page tables share their shapes, as a model's do
            store.update(randn(batch, 2, n, 32, seed=seed + layer), randn(batch, 2, n, 32, seed=seed + 50 + layer),
                         valid, randn(batch, 2, n, seed=seed + 90 + layer).abs(), sink=2, recent=5, target="mid")
            out.append(store)
        return out

    rows = torch.tensor(data.draw(st.lists(st.integers(0, batch - 1), min_size=batch, max_size=batch), label="rows"))
    together, alone = filled(), filled()
    with CountNonzero():
        select_rows_of(together, rows)
    shapes = {tuple(st.pages.shape) for store in together for st in store.states}
    if not ragged:  # the rebuilds of ragged rows append with boolean masks (nonzero) of their own
        assert len(shapes) <= 2 and CountNonzero.calls <= len(shapes)
    for store in alone:
        store.select_rows(rows)
    for a_store, b_store in zip(together, alone):
        for a, b in zip(a_store.states, b_store.states):
            assert torch.equal(a.count, b.count)
            (ra, ua, oa), (rb, ub, ob) = gather_tokens(a), gather_tokens(b)
            assert torch.equal(oa, ob) and torch.equal(ra[oa], rb[ob]) and torch.equal(ua[oa], ub[ob])


def test_select_rows_of_refuses_before_changing_any_layer():
    """All layers or none: a fixed pool too small for one layer's reordered rows raises before
    any layer's tiers change, the layers that would fit included."""
    from sphkv_compile.store import select_rows_of

    def store_with(num_pages):
        store = LayerStore(2, 1, 32, (EXACT,), kv_dtype=torch.float32, page_size=4)
        store.states = [store._new_state(EXACT, num_pages=num_pages, max_pages=2)]
        valid = torch.ones(2, 8, dtype=torch.bool)
        valid[1, :6] = False  # row 0: 8 tokens (2 pages), row 1: 2 (1 page); two copies of row 0 need 4
        store.append(randn(2, 1, 8, 32, seed=num_pages), randn(2, 1, 8, 32, seed=num_pages + 1), valid=valid)
        return store

    roomy, tight = store_with(4), store_with(3)
    before = [[t.clone() for t in s.states[0].tensors()] for s in (roomy, tight)]
    with pytest.raises(StoreCapacityError, match="fixed pool"):
        select_rows_of([roomy, tight], torch.tensor([0, 0]), can_grow=False)
    for store, saved in zip((roomy, tight), before):
        assert all(torch.equal(t, u) for t, u in zip(store.states[0].tensors(), saved))
    select_rows_of([roomy], torch.tensor([0, 0]), can_grow=False)
    assert torch.equal(roomy.states[0].count, torch.tensor([[8], [8]], dtype=torch.int32))


@given(layers=st.integers(1, 4), batch=st.integers(1, 3), page_size=st.sampled_from([1, 4, 16]),
       extra=st.integers(0, 40), seed=st.integers(0, 2**31 - 1), per_head=st.booleans())
@settings(max_examples=25, deadline=None)
def test_reserve_tiers_computes_each_demand_as_alone(layers, batch, page_size, extra, seed, per_head):
    """reserve_tiers stacks alike requests (int extras, a tier's counts on top, [B, H] extras)
    and reads their demands together: the same [needed, widest, free, most] per request as
    page_demand_tensors on that request alone (ragged counts, pages of 1 to 16 tokens), and
    afterwards every tier takes its tokens."""
    from sphkv_compile.store import _stacked_demand, fits, page_demand_tensors, reserve_tiers

    gen = torch.Generator().manual_seed(seed)
    stores = []
    for _ in range(layers):
        store = LayerStore(batch, 2, 16, (EXACT, HIGH), kv_dtype=torch.float32, page_size=page_size)
        for t in range(2):  # ragged counts per head, as a store holds after some steps
            n = int(torch.randint(1, 50, (), generator=gen))
            store.append(randn(batch, 2, n, 16, seed=seed + t), randn(batch, 2, n, 16, seed=seed + 7 + t),
                         tier=store.tiers[t].name,
                         valid=torch.rand(batch, n, generator=gen) < 0.8)
        stores.append(store)
    more = torch.randint(0, 40, (batch, 2), generator=gen) if per_head else extra
    requests = [(s, 0, more) for s in stores] + [(s, 1, more, 0) for s in stores]
    for items in ([(s, 0, more, None) for s in stores], [(s, 1, more, 0) for s in stores]):
        together = _stacked_demand(items, page_size)
        for i, (s, t, x, top) in enumerate(items):
            new = s.states[t].count.to(torch.int64) + x + (s.states[top].count if top is not None else 0)
            assert together[i].tolist() == page_demand_tensors(s.states[t], new)[2].tolist()
    wanted = [s.states[t].count.to(torch.int64) + x + (s.states[r[0]].count if r else 0)
              for s, t, x, *r in requests]
    reserve_tiers(requests)
    for (s, t, *_), new in zip(requests, wanted):
        assert fits(s.states[t], new - s.states[t].count), (t, new)
