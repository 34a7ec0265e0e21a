"""Patterns the pass cannot prove equivalent stay dense, say why in report(), and give
exactly the dense output."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sphkv_compile
from tests.models.attention_zoo import Attention, Spec, run

OPTIONS = {"sink": 1, "recent": 2}


@pytest.fixture(autouse=True)
def quick_inner_compiler(monkeypatch):
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")


def _compiled_equals_dense(spec: Spec, lengths, seed_rng=False):
    torch._dynamo.reset()
    eager, module = Attention(spec), Attention(spec)
    if seed_rng:
        eager.train(), module.train()
    compiled = torch.compile(module, backend="sphkv", options=OPTIONS)
    reasons = []

    def seeded(fn, record):
        def step(*args):
            torch.manual_seed(123)
            out = fn(*args)
            if record:
                reasons.extend(s["reason"] for s in sphkv_compile.report()["sites"])
            return out
        return step

    ref = run(None, seeded(eager, False), spec, lengths, 0, 0)
    got = run(None, seeded(compiled, True), spec, lengths, 0, 0)
    for (o, *_), (e, *_) in zip(got, ref):
        assert torch.equal(o, e)
    sites = sphkv_compile.report()["sites"]
    assert sites and not any(s["rewritten"] for s in sites)
    return reasons


@pytest.mark.parametrize("spec, lengths, expected", [
    (Spec(extra="alibi", mask="additive"), [6, 1], "position bias"),
    (Spec(attn="sdpa", extra="alibi", mask="additive"), [6, 1], "position bias"),
    (Spec(extra="softcap"), [6, 1], "soft-capping"),
    (Spec(extra="square_scores"), [6, 1], "custom score function"),
    (Spec(extra="window", cache="cat"), [6, 1, 1], "sliding-window"),
    (Spec(attn="sdpa", mask="bool", extra="window", cache="index_copy"), [6, 1], "sliding-window"),
    (Spec(attn="sdpa", mask="is_causal", cache="index_copy"), [4], "top-left aligned"),
    (Spec(attn="sdpa", mask="none", cache="slice_assign"), [1, 1], "unfilled slots"),
])
def test_unprovable_patterns_stay_dense_with_reason(spec, lengths, expected):
    reasons = _compiled_equals_dense(spec, lengths)
    # the first graph says why; later ones may add that the cache is now dense
    assert reasons and expected in reasons[0] and all(reasons), reasons


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_dropout_in_training_stays_dense(attn):
    reasons = _compiled_equals_dense(Spec(attn=attn, extra="dropout", cache="index_copy"), [5], seed_rng=True)
    assert reasons and all("dropout in training" in r for r in reasons), reasons


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from an encoder memory: no cache update."""

    def forward(self, q, memory_k, memory_v):
        return F.scaled_dot_product_attention(q, memory_k, memory_v)


class ManualCrossAttention(nn.Module):
    def forward(self, q, memory_k, memory_v):
        return torch.softmax(q @ memory_k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ memory_v


@pytest.mark.parametrize("cls", [CrossAttention, ManualCrossAttention])
def test_cross_attention_stays_dense(cls):
    torch._dynamo.reset()
    q, mk, mv = torch.randn(2, 4, 3, 32), torch.randn(2, 4, 7, 32), torch.randn(2, 4, 7, 32)
    out = torch.compile(cls(), backend="sphkv", options=OPTIONS)(q, mk, mv)
    assert torch.equal(out, cls()(q, mk, mv))
    (site,) = sphkv_compile.report()["sites"]
    assert not site["rewritten"] and "cross-attention" in site["reason"]


def test_autograd_recording_stays_dense():
    torch._dynamo.reset()
    lin = nn.Linear(32, 32)

    class WithGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, q, pk, pv, k):
            kk = torch.cat([pk, self.lin(k)], dim=2)
            vv = torch.cat([pv, k], dim=2)
            return F.scaled_dot_product_attention(q, kk, vv)

    q, pk, pv, k = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 1, 32)
    out = torch.compile(WithGrad(), backend="sphkv")(q, pk, pv, k)
    assert torch.equal(out, WithGrad()(q, pk, pv, k))
    (site,) = sphkv_compile.report()["sites"]
    assert not site["rewritten"] and "autograd" in site["reason"]
