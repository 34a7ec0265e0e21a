"""Property-based fuzzing of the pass: hypothesis draws attention modules from the
detection space; each, compiled with backend="sphkv", must either be rewritten and match
dense within the codec bound, or stay dense with a reason and match dense exactly."""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sphkv_compile
from tests.models.attention_zoo import Attention, Spec, run
from tests.models.bounds import relative_rms, relative_rms_bound

OPTIONS = {"sink": 1, "recent": 2}  # tiny exact windows: most past tokens are really encoded
EXAMPLES = int(os.environ.get("SPHKV_FUZZ_EXAMPLES", "50"))


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
    return spec, [prefill] + decode, pad


def check_case(spec: Spec, lengths, pad: int, seed: int = 0) -> None:
    torch._dynamo.reset()
    ref = run(Attention(spec), Attention(spec), spec, lengths, pad, seed)
    module = Attention(spec)
    compiled = torch.compile(module, backend="sphkv", options=OPTIONS)
    outcomes = []

    def step(*args):
        out = compiled(*args)
        outcomes.append(sphkv_compile.report()["sites"])
        return out

    got = run(module, step, spec, lengths, pad, seed)
    bound = relative_rms_bound(OPTIONS, spec.head_dim)
    for i, ((out, real), (expected, _), sites) in enumerate(zip(got, ref, outcomes)):
        assert len(sites) == 1, (spec, sites)
        site = sites[0]
        if site["rewritten"]:
            rows = real[:, None, :, None].expand_as(out)  # padded queries are unspecified
            err = relative_rms(out[rows], expected[rows])
            assert err <= bound, (spec, lengths, pad, i, err, bound)
        else:
            assert site["reason"], (spec, site)
            assert torch.equal(out, expected), (spec, lengths, pad, i, site["reason"])


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
@example((Spec(attn="sdpa", mask="is_causal", cache="cat"), [5], 0))  # prefill-only causal SDPA
@example((Spec(attn="bmm", layout="BTHd", cache="slice_assign", heads=4, kv_heads=1, batch=2), [6, 1, 1], 2))
@example((Spec(attn="manual", mask="none", cache="cat"), [4, 1, 1], 0))  # non-causal prefill, decode after
def test_pass_rewrites_or_stays_dense_exactly(case):
    spec, lengths, pad = case
    check_case(spec, lengths, pad)
