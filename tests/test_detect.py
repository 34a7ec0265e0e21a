"""Detection details: the layout probe and the runtime mask check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sphkv_compile


@pytest.fixture(autouse=True)
def quick_inner_compiler(monkeypatch):
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")


def test_heads_repeated_in_the_wrong_order_stay_dense():
    """k.repeat(1, G, 1, 1) maps query head h to KV head h % Hkv, not h // G: the probe sees it."""
    def f(q, pk, pv, k, v):
        kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        return F.scaled_dot_product_attention(q, kk.repeat(1, 2, 1, 1), vv.repeat(1, 2, 1, 1)), kk, vv

    torch._dynamo.reset()
    args = (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
            torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    out = torch.compile(f, backend="sphkv")(*args)[0]
    assert torch.equal(out, f(*args)[0])
    (site,) = sphkv_compile.report()["sites"]
    assert not site["rewritten"] and "h // G" in site["reason"]


def test_a_mask_input_that_later_becomes_a_bias_raises_instead_of_a_wrong_answer():
    def f(q, pk, pv, k, v, mask):
        kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask), kk, vv

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="sphkv", options={"bits": 12})
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    past = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    causal = torch.zeros(1, 1, 1, 6)
    out, pk, pv = compiled(q, *past, k, v, causal)
    assert sphkv_compile.report()["sites"][0]["rewritten"]
    # 6 tokens sit inside the default sink + recent window, all exact: float32 rounding only
    torch.testing.assert_close(out, f(q, *past, k, v, causal)[0])
    bias = torch.linspace(-1, 0, 7).view(1, 1, 1, 7)
    with pytest.raises(Exception, match="position bias"):
        compiled(q, pk, pv, k, v, bias)


def test_a_past_read_outside_the_cache_update_stays_dense():
    def f(q, pk, pv, k, v):
        kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        return F.scaled_dot_product_attention(q, kk, vv) + pk.mean(), kk, vv

    torch._dynamo.reset()
    args = (torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
            torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    out = torch.compile(f, backend="sphkv")(*args)[0]
    assert torch.equal(out, f(*args)[0])
    (site,) = sphkv_compile.report()["sites"]
    assert not site["rewritten"] and "outside attention" in site["reason"]
