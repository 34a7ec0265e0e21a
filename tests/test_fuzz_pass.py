"""Property-based fuzzing of the pass: hypothesis draws attention modules from the
detection space; each, compiled with backend="sphkv", must either be rewritten and match
dense within the codec bound, or stay dense with a reason and match dense exactly."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sphkv_compile
from tests.models.attention_zoo import Attention, Spec, run
from tests.models.bounds import attention_rms_bound, rms_error_in_value_units

# tiny exact windows: most past tokens are really encoded. At 12 bits the bound is tight
# (~7e-4), so a structural mistake (a wrong head, a masked token seen) cannot hide in it.
OPTIONS = {"sink": 1, "recent": 2}
BITS = [3.5, 12]
EXAMPLES = int(os.environ.get("SPHKV_FUZZ_EXAMPLES", "50"))


@pytest.fixture(autouse=True, scope="module")
def quick_inner_compiler():
    """The rewritten graph goes through AOT without Inductor codegen: same graph, CI-fast."""
    old = os.environ.get("SPHKV_INNER_COMPILER")
    os.environ["SPHKV_INNER_COMPILER"] = "aot_eager"
    yield
    if old is None:
        del os.environ["SPHKV_INNER_COMPILER"]
    else:
        os.environ["SPHKV_INNER_COMPILER"] = old


@st.composite
def cases(draw):
    attn = draw(st.sampled_from(["manual", "bmm", "sdpa"]))
    mask = draw(st.sampled_from(["additive", "masked_fill", "where", "none", "is_causal"] if attn != "sdpa"
                                else ["additive", "bool", "none", "is_causal"]))
    if attn != "sdpa" and mask == "is_causal":
        mask = "masked_fill"
    heads, kv_heads = draw(st.sampled_from([(4, 4), (4, 2), (4, 1)]))
    gqa = draw(st.sampled_from(["repeat_kv", "repeat_interleave"] + (["enable_gqa"] if attn == "sdpa" else [])))
    spec = Spec(attn=attn, layout=draw(st.sampled_from(["BHTd", "BTHd"])),
                scale=draw(st.sampled_from(["mul", "div"] if attn != "sdpa" else ["mul", "sdpa_default"])),
                mask=mask, softmax=draw(st.sampled_from(["plain", "fp32_cast", "dtype_kwarg"])),
                heads=heads, kv_heads=kv_heads, gqa=gqa,
                cache=draw(st.sampled_from(["cat", "index_copy", "slice_assign"])),
                batch=draw(st.sampled_from([1, 2])))
    prefill = draw(st.integers(1, 10))
    decode = [] if mask == "is_causal" else [1] * draw(st.integers(0, 3))
    pad = draw(st.integers(0, min(3, prefill - 1))) if spec.batch == 2 and mask not in ("none", "is_causal") else 0
    return spec, [prefill] + decode, pad, draw(st.sampled_from(BITS))


def check_case(spec: Spec, lengths, pad: int, bits: float = 3.5, seed: int = 0) -> None:
    options = {**OPTIONS, "bits": bits}
    torch._dynamo.reset()
    ref = run(Attention(spec), Attention(spec), spec, lengths, pad, seed)
    module = Attention(spec)
    compiled = torch.compile(module, backend="sphkv", options=options)
    outcomes = []

    def step(*args):
        out = compiled(*args)
        outcomes.append(sphkv_compile.report()["sites"])
        return out

    got = run(module, step, spec, lengths, pad, seed)
    keys, values = [], []
    for i, ((out, real, q, k, v), (expected, *_), sites) in enumerate(zip(got, ref, outcomes)):
        keys.append(k)
        values.append(v)
        assert len(sites) == 1, (spec, sites)
        site = sites[0]
        if site["rewritten"]:
            seen_k, seen_v = torch.cat([x.flatten(0, -2) for x in keys]), torch.cat([x.flatten(0, -2) for x in values])
            bound = attention_rms_bound(options, q, seen_k, spec.head_dim ** -0.5)
            rows = real[:, None, :].expand(out.shape[:3])  # padded queries are unspecified
            err = rms_error_in_value_units(out[rows], expected[rows], seen_v)
            assert err <= bound, (spec, lengths, pad, bits, i, err, bound)
        else:
            assert site["reason"], (spec, site)
            assert torch.equal(out, expected), (spec, lengths, pad, i, site["reason"])
    return [sites[0]["rewritten"] for sites in outcomes]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
@example((Spec(attn="sdpa", mask="is_causal", cache="cat"), [5], 0, 12))  # prefill-only causal SDPA
@example((Spec(attn="bmm", layout="BTHd", cache="slice_assign", heads=4, kv_heads=1, batch=2), [6, 1, 1], 2, 12))
@example((Spec(attn="manual", mask="none", cache="cat"), [4, 1, 1], 0, 3.5))  # non-causal prefill (dense), then decode
def test_pass_rewrites_or_stays_dense_exactly(case):
    check_case(*case)


REWRITTEN = [(Spec(attn="sdpa", mask="is_causal", cache="cat"), [5], 0, 12),  # prefill only: is_causal with a past is not causal over the cache
             (Spec(attn="bmm", layout="BTHd", cache="slice_assign", heads=4, kv_heads=1, batch=2), [6, 1, 1], 2, 12)]


@pytest.mark.parametrize("case", REWRITTEN, ids=["sdpa_causal_cat", "bmm_slice_assign"])
def test_supported_patterns_are_rewritten(case):
    """The fuzz test accepts a site that stays dense with a reason; these two patterns must not:
    a pass that stopped rewriting would otherwise still pass it."""
    assert all(check_case(*case)), case
