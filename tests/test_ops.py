"""The custom ops: schema/fake checks (opcheck), tracing under torch.compile, and equality
with the codec computed by hand."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from helpers import rel_err
from sphkv_compile import ops
from sphkv_compile.store import LayerStore, gather_tokens
from sphkv_compile.tiers import DEFAULT_TIERS, tier_codecs

TIERS = ops.tiers_string(DEFAULT_TIERS)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sized_store(B, H, d, tokens):
    store = LayerStore(B, H, d, DEFAULT_TIERS, kv_dtype=torch.float32, page_size=16)
    for t in range(len(DEFAULT_TIERS)):
        store._reserve(t, torch.full((B, H), tokens))
    return store


def flat(store):
    return [t for s in store.states for t in s.tensors()]


def test_opcheck_attend_and_update():
    B, H, d = 1, 2, 32
    store = sized_store(B, H, d, 64)
    store.update(randn(B, H, 20, d, seed=0), randn(B, H, 20, d, seed=1), sink=2, recent=4, target="mid")
    k, v, q = randn(B, H, 3, d, seed=2), randn(B, H, 3, d, seed=3), randn(B, 2 * H, 3, d, seed=4)
    torch.library.opcheck(torch.ops.sphkv.attend.default,
                          (q, flat(store), k, v, None, TIERS, 0, "float32", 0.2, 2, False))
    torch.library.opcheck(torch.ops.sphkv.update_cache.default,
                          (flat(store), k, v, None, None, TIERS, 0, "float32", 2, 4, 2))
    torch.library.opcheck(torch.ops.sphkv.encode_append.default,
                          (flat(store), k, v, None, None, 3, TIERS, 0, "float32"))


@given(seed=st.integers(0, 10_000), group=st.sampled_from([1, 2, 4]), steps=st.integers(1, 4))
@settings(max_examples=5)
def test_compiled_graph_equals_eager(seed, group, steps):
    B, H, d = 2, 2, 32
    eager, compiled = sized_store(B, H, d, 128), sized_store(B, H, d, 128)
    prompt = randn(B, H, 30, d, seed=seed), randn(B, H, 30, d, seed=seed + 1)
    for s in (eager, compiled):
        s.update(*prompt, sink=2, recent=8, target="mid")

    def step(state, q, k, v):
        out, _ = torch.ops.sphkv.attend(q, state, k, v, None, TIERS, 0, "float32", d ** -0.5, 0, True)
        torch.ops.sphkv.update_cache(state, k, v, None, None, TIERS, 0, "float32", 2, 8, 2)
        return out

    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    for i in range(steps):
        q, k, v = randn(B, H * group, 1, d, seed=seed + 10 + i), randn(B, H, 1, d, seed=seed + 20 + i), randn(B, H, 1, d, seed=seed + 30 + i)
        want = step(flat(eager), q, k, v)
        got = fn(flat(compiled), q, k, v)
        assert torch.equal(got, want)
    for a, b in zip(flat(eager), flat(compiled)):
        assert torch.equal(a, b)


@given(seed=st.integers(0, 10_000), d=st.sampled_from([32, 64, 96]), group=st.sampled_from([1, 3]))
@settings(max_examples=8)
def test_attend_op_equals_codec_by_hand(seed, d, group):
    """sphkv::attend == softmax over [codec.logits on each tier's codes, exact q·k] with values
    decoded by each tier's value codec."""
    B, H = 1, 2
    store = sized_store(B, H, d, 200)
    for i, tier in enumerate(("exact", "high", "mid", "low")):
        store.append(randn(B, H, 7 + 5 * i, d, seed=seed + i), randn(B, H, 7 + 5 * i, d, seed=seed + 50 + i), tier=tier)
    q = randn(B, H * group, 1, d, seed=seed + 99)
    got, _ = torch.ops.sphkv.attend(q, flat(store), None, None, None, TIERS, 0, "float32", d ** -0.5, 0, False)
    logits, values = [], []
    qg = q.double().reshape(B, H, group, d)
    for spec, state in zip(DEFAULT_TIERS, store.states):
        rec, _, valid = gather_tokens(state)
        assert valid.all()
        if spec.exact:
            k = rec[..., : d].contiguous().view(torch.float32).double()
            v = rec[..., d:].contiguous().view(torch.float32).double()
            logits.append(qg @ k.transpose(-1, -2))
        else:
            kc, vc = tier_codecs(spec, d, 0)
            logits.append(kc.logits(qg.float(), rec[..., : kc.words]).double())
            v = vc.decode(rec[..., kc.words:]).double()
        values.append(v)
    p = torch.softmax(torch.cat(logits, -1) / math.sqrt(d), -1)
    want = p @ torch.cat(values, 2)
    assert rel_err(got.reshape(B, H, group, d), want) < 1e-5
