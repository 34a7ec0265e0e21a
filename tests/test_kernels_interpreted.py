"""The Triton kernels under the interpreter (CPU), against the float64 reference.

triton.jit (and Triton's own standard library) decide at import time whether kernels are
interpreted, so these run in a child process that has TRITON_INTERPRET=1 from the start:
tests/test_kernels.py launches it. Collected anywhere else, this module skips itself.
"""
from __future__ import annotations

import math
import os

import pytest

if os.environ.get("SPHKV_KERNEL_TESTS_CHILD") != "1" or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_kernels.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import nan_filled_empty, record_launch_args, record_launches

from sphkv_compile.kernels import attend as kernel_attend
from sphkv_compile.kernels import compaction, encode as kernel_encode
from sphkv_compile.kernels.layout import Unsupported, tier_info
from sphkv_compile.store import TierState, append_records, attend as reference_attend, encode_records, gather_tokens
from sphkv_compile.tiers import DEFAULT_TIERS, TierSpec, record_words, tier_codecs

SCALAR_TIER = TierSpec("scalar3", 3.5, "scalar", 3)
ALL_TIERS = DEFAULT_TIERS + (SCALAR_TIER,)
KV_DTYPE = torch.bfloat16
FP32_TOL = 1e-4  # float32 arithmetic against float64 (the interpreter runs tl.dot in float32)
SETTINGS = dict(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The decoding logic is checked in float32 here (FP32_TOL): under the interpreter compressed
# tiles enter tl.dot in float32 (kernels.attend._bf16_tiles). The GPU default rounds them to
# bfloat16; that path runs in tests/test_kernels_gpu.py.


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# "wide" magnitudes: queries 2^20 times larger and keys 2^20 times smaller (logits stay in a
# range any float32 softmax resolves), key norms over 9 octaves, value norms over 80, and some
# zero keys and values. The kernels decode unit-radius tiles and apply the radii afterwards
# (kernels.attention_kernels); this holds that bookkeeping to the float64 reference.
WIDE_Q = 2.0**20


def token_scales(gen, shape, wide: bool, octaves: tuple[float, float], zero_share: float = 0.1):
    """[*shape, 1] per-token factors: 1 unless wide, else 2^U(octaves) with some exact zeros."""
    if not wide:
        return torch.ones(*shape, 1)
    lo, hi = octaves
    scale = torch.exp2(lo + (hi - lo) * torch.rand(*shape, 1, generator=gen))
    return torch.where(torch.rand(*shape, 1, generator=gen) < zero_share, 0.0, scale)


def wide_kv(gen, k, v, wide: bool):
    """k and v at the test's magnitudes (as they are unless wide)."""
    if not wide:
        return k, v
    shape = k.shape[:-1]
    return (k / WIDE_Q * token_scales(gen, shape, True, (-8.0, 1.0)),
            v * token_scales(gen, shape, True, (-40.0, 40.0)))


def fill_store(gen, B, H, d, specs, counts, page_size, seed=0, wide=False):
    """Tier states with counts[t] [B, H] tokens (ragged), plus random utility."""
    states = []
    for spec, cnt in zip(specs, counts):
        kw, vw = record_words(spec, d, seed, KV_DTYPE)
        n = int(cnt.max()) if cnt.numel() else 0
        max_pages = max(1, math.ceil(n / page_size))
        st = TierState.allocate(B, H, B * H * max_pages + 1, page_size, kw + vw, max_pages, "cpu")
        if n:
            k = torch.randn(B, H, n, d, generator=gen) * (0.5 + torch.rand(B, H, n, 1, generator=gen))
            v = torch.randn(B, H, n, d, generator=gen)
            k, v = wide_kv(gen, k, v, wide)
            valid = torch.arange(n)[None, None, :] < cnt[..., None]
            util = torch.rand(B, H, n, generator=gen)
            append_records(st, encode_records(spec, k, v, seed, KV_DTYPE), util, valid, spec.name)
        states.append(st)
    return states


def clone_states(states):
    return [TierState(*[t.clone() for t in s.tensors()]) for s in states]


@st.composite
def attention_case(draw, prefill: bool):
    d = draw(st.sampled_from([16, 32, 64]))
    hkv = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3, 4, 8]))
    b = draw(st.integers(1, 2))
    names = draw(st.lists(st.sampled_from([t.name for t in ALL_TIERS]), min_size=1, max_size=3, unique=True))
    if "exact" not in names:
        names = ["exact"] + names
    specs = [t for t in ALL_TIERS if t.name in names]
    tq = draw(st.integers(2, 5)) if prefill else 1
    n_new = draw(st.integers(tq, tq + 3)) if prefill else draw(st.integers(0, 2))
    return dict(d=d, hkv=hkv, g=g, b=b, specs=specs, tq=tq, n_new=n_new,
                page_size=draw(st.sampled_from([8, 16])), seed=draw(st.integers(0, 2**31 - 1)),
                max_count=draw(st.sampled_from([0, 5, 40])), obs=draw(st.integers(0, 3)),
                pad=draw(st.booleans()), accumulate=draw(st.booleans()),
                sinks=draw(st.sampled_from([None, "random", "extreme"])), wide=draw(st.booleans()))


def sink_logits(kind, heads: int, gen) -> torch.Tensor | None:
    """gpt-oss-style sink logits per query head: none, random, or extreme (one head's sink
    dwarfs its logits, one head has none: -inf)."""
    if kind is None:
        return None
    sinks = 3 * torch.randn(heads, generator=gen)
    if kind == "extreme":
        sinks[0] = 40.0
        sinks[-1] = float("-inf")
    return sinks


def run_case(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, d, G, Tq, N = c["b"], c["hkv"], c["d"], c["g"], c["tq"], c["n_new"]
    counts = [torch.randint(0, c["max_count"] + 1, (B, H), generator=gen) for _ in c["specs"]]
    if N == 0 and all(int(x.sum()) == 0 for x in counts):
        counts[0][0, 0] = 1  # something to attend to
    wide = c.get("wide", False)
    states = fill_store(gen, B, H, d, c["specs"], counts, c["page_size"], wide=wide)
    q = torch.randn(B, H * G, Tq, d, generator=gen) * (WIDE_Q if wide else 1.0)
    if c.get("transposed_q"):  # [B, Tq, H, d] viewed as [B, H, Tq, d], as models hand it over
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    kn = torch.randn(B, H, N, d, generator=gen) if N else None
    vn = torch.randn(B, H, N, d, generator=gen) if N else None
    if N:
        kn, vn = wide_kv(gen, kn, vn, wide)
    valid = None
    if N and c["pad"]:
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[0, : int(torch.randint(0, N, (1,), generator=gen))] = False  # left padding in row 0
    ref_states, ker_states = clone_states(states), clone_states(states)
    kw = dict(seed=0, kv_dtype=KV_DTYPE, valid_new=valid, obs_window=c["obs"], accumulate=c["accumulate"],
              sinks=sink_logits(c.get("sinks"), H * G, gen))
    ref, ref_mass = reference_attend(q.double(), ref_states, c["specs"], k_new=None if kn is None else kn.double(),
                                     v_new=None if vn is None else vn.double(), **kw)
    out, mass = kernel_attend.attend(q, ker_states, c["specs"], k_new=kn, v_new=vn, **kw)
    assert out.shape == ref.shape and mass.shape == ref_mass.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < FP32_TOL
    if N and c["obs"]:
        assert rel_err(mass, ref_mass) < FP32_TOL
    else:
        assert mass.numel() == 0 or float(mass.abs().max()) == 0.0
    for rs, ks in zip(ref_states, ker_states):  # accumulate: utility updated alike (fp16 storage)
        assert torch.allclose(ks.utility.float(), rs.utility.float(), rtol=2e-3, atol=1e-3)


@settings(**SETTINGS)
@given(attention_case(prefill=False))
def test_decode_matches_reference(case):
    run_case(case)


# found by CI (session 14): a padding query that sees no token, in a head whose sink is -inf,
# came out nan (lse - s = -inf + inf in store.sink_factor)
PADDED_QUERY_WITHOUT_A_SINK = {"d": 16, "hkv": 1, "g": 1, "b": 1, "specs": [TierSpec("exact")], "tq": 2, "n_new": 2,
                               "page_size": 8, "seed": 0, "max_count": 0, "obs": 0, "pad": True, "accumulate": False,
                               "sinks": "extreme"}


@settings(**SETTINGS)
@given(attention_case(prefill=True))
@example(case=PADDED_QUERY_WITHOUT_A_SINK)
def test_prefill_matches_reference(case):
    run_case(case)


def test_decode_head_dim_128_all_tiers():
    run_case(dict(d=128, hkv=2, g=4, b=2, specs=list(ALL_TIERS), tq=1, n_new=1, page_size=16, seed=7,
                  max_count=70, obs=1, pad=False, accumulate=True))


def test_decode_head_dim_256_all_tiers():
    """The widest head dim the kernels take (Gemma's 256): halves of 128, without the register cap."""
    run_case(dict(d=256, hkv=1, g=2, b=1, specs=list(ALL_TIERS), tq=1, n_new=1, page_size=16, seed=9,
                  max_count=40, obs=1, pad=False, accumulate=True))


@pytest.mark.parametrize("d,tq,n_new", [(64, 1, 1), (128, 3, 4)])
def test_extreme_magnitudes_all_tiers(d, tq, n_new):
    """Every tier at once with "wide" magnitudes (WIDE_Q above: queries at 2^20, value norms over
    80 octaves, zero keys and values), decode and chunked prefill, every time CI runs (the
    property tests draw them only sometimes)."""
    run_case(dict(d=d, hkv=2, g=4, b=2, specs=list(ALL_TIERS), tq=tq, n_new=n_new, page_size=16, seed=11 + d,
                  max_count=70, obs=1, pad=True, accumulate=True, wide=True))


@pytest.mark.parametrize("g,tq", [(3, 1), (4, 1), (8, 3)])
def test_combine_row_blocks_match_reference(g, tq):
    """The combine's two rotations: under 16 rows (3 and 4 query heads of a decode step: float32
    FMAs over 4 rows, one of them padding) and over (8 heads x 3 queries = 24 rows: two 16-row
    blocks through tl.dot), every tier, wide magnitudes."""
    run_case(dict(d=64, hkv=2, g=g, b=1, specs=list(ALL_TIERS), tq=tq, n_new=tq, page_size=16, seed=20 + g,
                  max_count=70, obs=1, pad=False, accumulate=False, wide=True))


@pytest.mark.parametrize("g,tq,sinks,transposed_q", [(4, 1, "extreme", False), (8, 3, "random", True)])
def test_column_programs_match_reference(g, tq, sinks, transposed_q, monkeypatch):
    """combine_kernel and prepare_queries_kernel with every block of output columns its own
    program (a decode step at small batch on a GPU, kernels.attend._column_programs; the
    interpreter's 2 "SMs" rarely ask for it): the rotated splits re-merged by each program,
    the row statistics written once, sinks in the normaliser, every tier, wide magnitudes;
    queries read through a model's [B, T, H, d] strides. The queries' own launch, not the exact
    tier's (PLAIN['queries_with_exact'], tested below), so its column programs run."""
    monkeypatch.setitem(kernel_attend.PLAIN, "queries_with_exact", False)
    monkeypatch.setattr(kernel_attend, "_column_programs", lambda programs, D, block_c, sms: D // block_c)
    run_case(dict(d=64, hkv=2, g=g, b=1, specs=list(ALL_TIERS), tq=tq, n_new=tq, page_size=16, seed=30 + g,
                  max_count=70, obs=1, pad=False, accumulate=False, wide=True, sinks=sinks, transposed_q=transposed_q))


@pytest.mark.parametrize("min_tiles", [1, 2])
def test_several_splits_per_tier_match_reference(min_tiles, monkeypatch):
    """Up to 600 tokens per compressed tier: several 128-token tiles, so each tier runs in
    several splits (4 programs wanted under the interpreter) that combine_kernel merges, in
    groups of COMBINE['splits'] with the rotated ones apart; min_tiles_per_split=2 makes the
    splits longer and fewer."""
    monkeypatch.setitem(kernel_attend.CODED, "min_tiles_per_split", min_tiles)
    launched = record_launch_args(monkeypatch, kernel_attend, "combine_kernel", lambda a: (a["S_total"], a["S_rot"]))
    # d=64: two 32-column rotation blocks
    run_case(dict(d=64, hkv=1, g=2, b=1, specs=list(ALL_TIERS[:3]), tq=1, n_new=2, page_size=16, seed=11,
                  max_count=600, obs=1, pad=False, accumulate=False))
    (s_total, s_rot), = launched
    assert s_rot > 2 and s_total - s_rot > 2, launched  # several splits per compressed tier, and plain ones


@pytest.mark.parametrize("merged", [True, False], ids=["one-launch", "two-launches"])
@pytest.mark.parametrize("tq,pad", [(1, False), (20, True)])
def test_exact_tier_and_chunk_launches_match_reference(merged, tq, pad, monkeypatch):
    """The exact tier's splits and the chunk's in one launch (exact_and_chunk_partials_kernel, the
    default: PLAIN['exact_with_chunk']) or in two (paged_partials_kernel, chunk_partials_kernel),
    the 150 new tokens in several splits, a decode step and a padded prefill chunk, against the
    reference."""
    monkeypatch.setitem(kernel_attend.PLAIN, "exact_with_chunk", merged)
    # kernel name -> the chunk's split count at each launch (0: a launch without the chunk)
    launched = {name: record_launch_args(monkeypatch, kernel_attend, name, lambda a, key=key: a[key] if key else 0)
                for name, key in (("exact_and_chunk_partials_kernel", "S_chunk"), ("chunk_partials_kernel", "S"),
                                  ("paged_partials_kernel", None))}
    run_case(dict(d=32, hkv=1, g=2, b=1, specs=list(ALL_TIERS[:2]), tq=tq, n_new=150, page_size=16, seed=50 + tq,
                  max_count=300, obs=1, pad=pad, accumulate=False))
    ran = sorted(name for name, calls in launched.items() if calls)
    if merged:
        assert ran == ["exact_and_chunk_partials_kernel"], launched
    else:
        assert ran == ["chunk_partials_kernel", "paged_partials_kernel"], launched
    (chunk_splits,) = launched["exact_and_chunk_partials_kernel" if merged else "chunk_partials_kernel"]
    assert chunk_splits >= 2, launched


@pytest.mark.parametrize("case", [
    dict(d=32, hkv=2, g=3, b=2, specs=list(ALL_TIERS[:3]) + [ALL_TIERS[0]], tq=1, n_new=1, pad=False, obs=0),
    dict(d=64, hkv=1, g=4, b=1, specs=list(ALL_TIERS), tq=1, n_new=70, pad=True, obs=1, transposed_q=True),
    dict(d=16, hkv=2, g=2, b=1, specs=[ALL_TIERS[0]], tq=9, n_new=12, pad=True, obs=0),  # no compressed tier
    dict(d=32, hkv=1, g=2, b=1, specs=list(ALL_TIERS[:2]), tq=7, n_new=9, pad=True, obs=2, chunks=True),
], ids=["decode-gqa3", "decode-every-tier-strided-q", "prefill-exact-only", "query-chunks"])
def test_queries_prepared_in_the_exact_launch_match_reference(case, monkeypatch):
    """PLAIN['queries_with_exact']: the exact tier's and the chunk's launch also prepares the
    queries (no prepare_queries_kernel launch) and runs before the compressed tiers, whose
    kernels read its rotated rows. Against the float64 reference, and bit for bit against the
    separate query launch; every float tensor attend allocates starts NaN-filled, so a query row
    or mass entry the fused launch failed to write shows. 'query-chunks': 7 queries in 4 chunks
    (PARTIAL_BYTES cut), each chunk its own fused launch at its own first query."""
    case = dict(case)
    if case.pop("chunks", False):
        d, g, b, hkv = case["d"], case["g"], case["b"], case["hkv"]
        monkeypatch.setattr(kernel_attend, "PARTIAL_BYTES", 2 * (len(case["specs"]) + 1) * 4 * d * 4 * b * hkv * g)
    case = dict(case, page_size=16, seed=70 + case["d"] + case["tq"], max_count=90, accumulate=False)
    nan_filled_empty(monkeypatch)
    separate = record_launches(monkeypatch, kernel_attend, "prepare_queries_kernel")
    fused = record_launch_args(monkeypatch, kernel_attend, "exact_and_chunk_partials_kernel", lambda a: a["QUERIES"])
    outputs = {}
    for on in (True, False):
        monkeypatch.setitem(kernel_attend.PLAIN, "queries_with_exact", on)
        spy = capture_attend(monkeypatch)
        run_case(case)
        outputs[on] = spy()
    assert fused and fused[:len(fused) // 2] == [True] * (len(fused) // 2), fused  # the fused run first
    assert not any(fused[len(fused) // 2:]) and len(separate) == len(fused) // 2, (fused, separate)
    (out_on, mass_on), (out_off, mass_off) = outputs[True], outputs[False]
    assert torch.equal(out_on, out_off) and torch.equal(mass_on, mass_off)


def capture_attend(monkeypatch):
    """Spy on kernel_attend.attend for one run_case: returns a function giving its (out, mass)."""
    seen, attend = [], kernel_attend.attend

    def spy(*args, **kwargs):
        seen.append(attend(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(kernel_attend, "attend", spy)
    return lambda: seen[-1]


@pytest.mark.parametrize("obs", [0, 2])
def test_query_chunks_match_reference(obs, monkeypatch):
    """A call whose split partials would pass PARTIAL_BYTES runs its queries in chunks (here of
    2 rows: 7 queries in 4 chunks), each with its own query, partials and combine launches over
    the exact tier and the new tokens; the mass zeros (obs 0) are written once, by the first.
    Every float tensor attend allocates starts out NaN-filled, so a slot no kernel wrote shows."""
    d, hkv, g, b, specs = 32, 2, 2, 1, list(ALL_TIERS[:3])
    per_row = (len(specs) + 1) * 4 * d * 4 * b * hkv  # kernels.attend's bytes per query row
    monkeypatch.setattr(kernel_attend, "PARTIAL_BYTES", 2 * per_row * g)
    launches = record_launches(monkeypatch, kernel_attend, "combine_kernel")
    nan_filled_empty(monkeypatch)
    run_case(dict(d=d, hkv=hkv, g=g, b=b, specs=specs, tq=7, n_new=9, page_size=16, seed=60 + obs,
                  max_count=100, obs=obs, pad=True, accumulate=False))
    assert len(launches) == 4, launches


@settings(**{**SETTINGS, "max_examples": 6})
@given(attention_case(prefill=False))
def test_decode_of_whole_tiles_matches_reference(case):
    """CODED['halves'] off: keys and values decoded as whole D-wide tiles (paged_coded_kernel,
    the default before session 8 and still a setting); the other tests run the halves kernel."""
    before = kernel_attend.CODED["halves"]
    kernel_attend.CODED["halves"] = False
    try:
        run_case(case)
    finally:
        kernel_attend.CODED["halves"] = before


def test_decode_of_whole_tiles_head_dim_128_all_tiers(monkeypatch):
    monkeypatch.setitem(kernel_attend.CODED, "halves", False)
    run_case(dict(d=128, hkv=2, g=4, b=2, specs=list(ALL_TIERS), tq=1, n_new=1, page_size=16, seed=5,
                  max_count=200, obs=1, pad=True, accumulate=True))


@pytest.mark.parametrize("d", [128, 256])
def test_decode_in_quarters_matches_reference(d, monkeypatch):
    """CODED['quarters'] on (paged_coded_quarters_kernel, keys and values decoded in four
    quarters of D, a setting the sweep times): every tier, ragged rows, against float64."""
    monkeypatch.setitem(kernel_attend.CODED, "quarters", True)
    launched = record_launches(monkeypatch, kernel_attend, "paged_coded_quarters_kernel")
    run_case(dict(d=d, hkv=2, g=4, b=2, specs=list(ALL_TIERS), tq=1, n_new=1, page_size=16, seed=13,
                  max_count=70, obs=1, pad=True, accumulate=True))
    assert launched


@pytest.mark.parametrize("d,quarters", [(64, False), (128, True)])
def test_decode_of_two_tokens_per_thread_matches_reference(d, quarters, monkeypatch):
    """CODED['tokens_per_thread'] = 2: with four warps, tiles of 256 tokens (the interpreter
    ignores warps, so two warps' 128-token tiles would be the default's here; what two warps
    change, the GPU layout, only a GPU run shows). Rows shorter and longer than a tile, every
    tier, ragged, against float64."""
    monkeypatch.setitem(kernel_attend.CODED, "tokens_per_thread", 2)
    monkeypatch.setitem(kernel_attend.CODED, "warps", 4)
    monkeypatch.setitem(kernel_attend.CODED, "many_rows", None)
    monkeypatch.setitem(kernel_attend.CODED, "quarters", quarters)
    name = "paged_coded_quarters_kernel" if quarters else "paged_coded_halves_kernel"
    launched = record_launches(monkeypatch, kernel_attend, name)
    run_case(dict(d=d, hkv=2, g=4, b=2, specs=list(ALL_TIERS), tq=1, n_new=1, page_size=16, seed=17,
                  max_count=600, obs=1, pad=True, accumulate=True))
    assert launched
    assert kernel_attend._coded_block_t(d) == 256


@pytest.mark.parametrize("d,halves", [(16, False), (32, False), (64, True), (128, True)])
def test_halves_kernel_runs_from_head_dim_64(d, halves, monkeypatch):
    """The halves kernel only where it pays and compiles (CODED['halves_min_d']): at d=16 a half
    is no tl.dot operand on the GPU (under 16 columns), at d=32 it needs more registers than
    whole tiles. The interpreter runs either, so which one ran is checked here."""
    launched = record_launches(monkeypatch, kernel_attend, "paged_coded_halves_kernel", "halves")
    record_launches(monkeypatch, kernel_attend, "paged_coded_kernel", "whole", into=launched)
    run_case(dict(d=d, hkv=1, g=2, b=1, specs=[ALL_TIERS[1]], tq=1, n_new=1, page_size=16, seed=3,
                  max_count=20, obs=1, pad=False, accumulate=False))
    assert launched and set(launched) == {"halves" if halves else "whole"}, launched


def test_queries_without_visible_tokens_give_zero():
    """Left-padded rows whose query sees nothing: output 0, like the reference."""
    gen = torch.Generator().manual_seed(3)
    B, H, d, N = 2, 1, 32, 3
    states = fill_store(gen, B, H, d, [DEFAULT_TIERS[0]], [torch.zeros(B, H, dtype=torch.int64)], 8)
    q = torch.randn(B, H, 1, d, generator=gen)
    kn, vn = torch.randn(B, H, N, d, generator=gen), torch.randn(B, H, N, d, generator=gen)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0] = False
    out, _ = kernel_attend.attend(q, states, [DEFAULT_TIERS[0]], seed=0, kv_dtype=KV_DTYPE, k_new=kn, v_new=vn,
                             valid_new=valid)
    ref, _ = reference_attend(q.double(), states, [DEFAULT_TIERS[0]], seed=0, kv_dtype=KV_DTYPE,
                              k_new=kn.double(), v_new=vn.double(), valid_new=valid)
    assert float(out[0].abs().max()) == 0.0
    assert rel_err(out, ref) < FP32_TOL


def _check_codes_close(spec, d, got, want):
    """Same records except where float32 and float64 land on different sides of a decision
    threshold: those codes differ by one step, and they are rare."""
    kc, vc = tier_codecs(spec, d, 0)
    for codec, g, w in ((kc, got[..., :kc.words], want[..., :kc.words]),
                        (vc, got[..., kc.words:], want[..., kc.words:])):
        for f, (a, b) in enumerate(zip(codec.layout.unpack(g), codec.layout.unpack(w))):
            diff = (a - b).abs()
            if f == 1 and hasattr(codec, "tree"):  # level-1 angles wrap around the circle
                diff = torch.minimum(diff, (1 << codec.level_bits[0]) - diff)
            assert diff.numel() == 0 or int(diff.max()) <= 1, (codec, f)
            assert int((diff > 0).sum()) <= max(1, 0.02 * diff.numel()), (codec, f)


# (key dtype, value dtype): 16-bit pairs of one dtype take the sign-matrix rotation, others
# the float32 one
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
               (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@settings(**SETTINGS)
@given(st.sampled_from(ALL_TIERS[1:]), st.sampled_from([16, 64, 128]), st.integers(1, 2), st.integers(1, 3),
       st.integers(1, 40), st.sampled_from(DTYPE_PAIRS), st.integers(0, 2**31 - 1))
def test_encode_matches_reference(spec, d, B, H, N, dtypes, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(4 * torch.randn(B, H, N, 1, generator=gen))  # radii over many octaves
    k = (torch.randn(B, H, N, d, generator=gen) * scale).to(dtypes[0])
    v = torch.randn(B, H, N, d, generator=gen).to(dtypes[1])
    k[0, 0, 0] = 0.0  # zero key: radius code 0, every angle code 0
    got = kernel_encode.encode_records(spec, k, v, 0, KV_DTYPE)
    want = encode_records(spec, k.double(), v.double(), 0, KV_DTYPE)
    assert got.shape == want.shape
    assert torch.equal(got[0, 0, 0, : tier_codecs(spec, d, 0)[0].words], want[0, 0, 0, : tier_codecs(spec, d, 0)[0].words])
    _check_codes_close(spec, d, got, want)


@pytest.mark.parametrize("split_kv", [False, True])
@pytest.mark.parametrize("spec", ALL_TIERS[1:], ids=lambda s: s.name)
def test_decode_step_encoder_settings_match_reference(monkeypatch, spec, split_kv):
    """The decode-step launch settings of the encoder (encode.ENCODE_DECODE_STEP), keys and values
    in one program or in two (SPLIT_KV), give the reference's codes, forced on launches of one
    token per row and of 40 (three tiles). Zero and non-finite keys included."""
    monkeypatch.setitem(kernel_encode.ENCODE_DECODE_STEP, "max_tiles_per_row", 10**6)
    monkeypatch.setitem(kernel_encode.ENCODE_DECODE_STEP, "split_kv", split_kv)
    gen = torch.Generator().manual_seed(11)
    launches = record_launch_args(monkeypatch, kernel_encode, "encode_kv_kernel", lambda a: a["SPLIT_KV"])
    for d, n in ((128, 1), (64, 40)):
        k = torch.randn(2, 3, n, d, generator=gen) * torch.exp(4 * torch.randn(2, 3, n, 1, generator=gen))
        v = torch.randn(2, 3, n, d, generator=gen)
        k[0, 0, 0] = 0.0
        k[1, 2, 0, 3] = float("inf")
        k, v = k.to(KV_DTYPE), v.to(KV_DTYPE)
        got = kernel_encode.encode_records(spec, k, v, 0, KV_DTYPE)
        want = encode_records(spec, k.double(), v.double(), 0, KV_DTYPE)
        kw = tier_codecs(spec, d, 0)[0].words
        assert torch.equal(got[0, 0, 0, :kw], want[0, 0, 0, :kw]) and torch.equal(got[1, 2, 0, :kw], want[1, 2, 0, :kw])
        _check_codes_close(spec, d, got, want)
        if split_kv:  # the same records as one program for both, bit for bit
            with pytest.MonkeyPatch.context() as one_program:
                one_program.setitem(kernel_encode.ENCODE_DECODE_STEP, "split_kv", False)
                assert torch.equal(got, kernel_encode.encode_records(spec, k, v, 0, KV_DTYPE))
    assert launches == ([split_kv] + [False] * split_kv) * 2


@settings(**SETTINGS)
@given(st.sampled_from(ALL_TIERS[1:]), st.sampled_from([16, 64, 128]), st.integers(0, 300), st.integers(0, 2**31 - 1))
def test_record_decoder_matches_the_codecs(spec, d, n, seed):
    """kernels.record_decode (RDR's demotions on a GPU) gives K and V as the codecs decode them,
    un-rotated (rdr.convert.decode_kv), at float32 accuracy: zero keys, radii over many octaves,
    no tokens, and more tokens than one program holds."""
    from sphkv_compile.kernels.record_decode import decode_records
    from sphkv_compile.rdr.convert import decode_kv

    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, d, generator=gen) * torch.exp(4 * torch.randn(n, 1, generator=gen))
    v = torch.randn(n, d, generator=gen)
    if n:
        k[0] = 0.0
    records = encode_records(spec, k[None], v[None], 0, KV_DTYPE)  # [1, n, W]
    got_k, got_v = decode_records(spec, records, d, 0, KV_DTYPE)
    want_k, want_v = decode_kv(spec, records, d, 0, KV_DTYPE, rotated=False)
    assert got_k.shape == want_k.shape == (1, n, d) and got_v.shape == want_v.shape
    if n:
        assert torch.equal(got_k[0, 0], torch.zeros(d))
        # per token: float32 decoding and rotation against the codecs' own float32 decode
        for got, want in ((got_k, want_k), (got_v, want_v)):
            err = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)
            assert float(err.max()) < FP32_TOL, float(err.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # tf32x3 rotation, and 16-bit sign matrix
def test_encode_non_finite_key_is_marked(dtype):
    spec = DEFAULT_TIERS[2]
    k = torch.randn(1, 1, 3, 64).to(dtype)
    k[0, 0, 1, 5] = float("nan")
    k[0, 0, 2, 0] = float("inf")
    v = torch.randn(1, 1, 3, 64).to(dtype)
    got = kernel_encode.encode_records(spec, k, v, 0, KV_DTYPE)
    want = encode_records(spec, k.double(), v.double(), 0, KV_DTYPE)
    kw = tier_codecs(spec, 64, 0)[0].words
    assert torch.equal(got[0, 0, 1:, :kw], want[0, 0, 1:, :kw])


@settings(**SETTINGS)
@given(st.sampled_from(ALL_TIERS), st.integers(1, 2), st.integers(1, 3), st.integers(0, 50),
       st.sampled_from([4, 16]), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_compaction_keeps_selected_tokens(spec, B, H, max_count, page_size, p_keep, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_count + 1, (B, H), generator=gen)
    (state,) = fill_store(gen, B, H, 32, [spec], [counts], page_size)
    rec, util, valid = gather_tokens(state)
    keep = (torch.rand(valid.shape, generator=gen) < p_keep) & valid
    pages_before = int(state.free_top[0]) + int((state.pages >= 0).sum())
    compaction.compact(state, keep)
    rec2, util2, valid2 = gather_tokens(state)
    assert torch.equal(state.count, keep.sum(-1).to(torch.int32))
    for b in range(B):
        for h in range(H):
            assert torch.equal(rec2[b, h][valid2[b, h]], rec[b, h][keep[b, h]])
            assert torch.equal(util2[b, h][valid2[b, h]], util[b, h][keep[b, h]])
    # every page is either in use or free, once
    in_use = state.pages[state.pages >= 0]
    free = state.free[: int(state.free_top[0])]
    assert int(state.free_top[0]) + in_use.numel() == pages_before
    assert torch.unique(torch.cat([in_use, free])).numel() == pages_before


@pytest.mark.parametrize("spec,d,why", [
    (TierSpec("r32", 3.5, "polar", 3.5, radius_bits=32), 64, "radius_bits=32"),
    (TierSpec("mid", 3.5, "polar", 3.5), 96, "head_dim=96"),
])
def test_unsupported_configurations_say_why(spec, d, why):
    with pytest.raises(Unsupported, match=why):
        tier_info(spec, d, 0, KV_DTYPE)


@settings(**SETTINGS)
@given(st.sampled_from(ALL_TIERS[1:]), st.sampled_from([16, 64]), st.integers(1, 2), st.integers(1, 3),
       st.integers(0, 4), st.integers(0, 6), st.sampled_from([2, 4, 8]), st.integers(0, 12), st.integers(1, 14),
       st.booleans(), st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_device_decode_update_equals_graduate(spec, d, B, H, sink, recent, page_size, prompt, steps, pad, kv_dtype,
                                              with_utility, seed):
    """Decode steps through the device-side update (kernels/decode_update.py) leave every tier
    holding the same tokens, in the same order, with the same utility as placement.graduate,
    from any exact-tier fill (empty, part-full, full), with padded rows, every window size,
    cache dtype, and with or without a utility. The update reads the graduating token in place
    and writes the new one from k, v (float32, sliced from a wider tensor so not contiguous,
    cast to the cache dtype); graduate gathers, casts and encodes with the same Triton encoder
    and launch settings, so the records must be equal bit for bit."""
    from unittest import mock

    from sphkv_compile.kernels import cuda_ops
    from sphkv_compile.kernels.decode_update import decode_update
    from sphkv_compile.placement import graduate

    gen = torch.Generator().manual_seed(seed)
    specs = [ALL_TIERS[0], spec]
    max_tokens = prompt + steps
    states = []
    for s, cap in zip(specs, (min(max_tokens, sink + recent), max_tokens)):
        kw, vw = record_words(s, d, 0, kv_dtype)
        per_head = max(1, math.ceil(cap / page_size))
        states.append(TierState.allocate(B, H, B * H * per_head, page_size, kw + vw, per_head, "cpu"))
    kw = dict(seed=0, kv_dtype=kv_dtype, sink=sink, recent=recent, target=1)
    if prompt:
        graduate(states, specs, torch.randn(B, H, prompt, d, generator=gen), torch.randn(B, H, prompt, d, generator=gen),
                 None, torch.rand(B, H, prompt, generator=gen), **kw)
    ref, ker = clone_states(states), clone_states(states)
    for _ in range(steps):
        k = (torch.randn(B, H, 1, 2 * d, generator=gen) * 3)[..., ::2]
        v = torch.randn(B, H, 1, d, generator=gen)
        util = torch.rand(B, H, 1, generator=gen) if with_utility else None
        valid = (torch.rand(B, 1, generator=gen) < 0.7) if pad else None
        with mock.patch.dict(kernel_encode.ENCODE_DECODE_STEP, max_tiles_per_row=10**6):
            graduate(ref, specs, k, v, valid, util, encode=cuda_ops.encode_records, **kw)
            decode_update(ker, specs, k, v, valid, util, **kw)
    for r, g in zip(ref, ker):
        assert torch.equal(r.count, g.count)
        (rr, ru, rv), (gr, gu, gv) = gather_tokens(r), gather_tokens(g)
        assert torch.equal(rv, gv)
        assert torch.equal(rr[rv], gr[gv]) and torch.equal(ru[rv], gu[gv])
        # pages: each either held by one row or on the free stack, once
        in_use = g.pages[g.pages >= 0]
        free = g.free[: int(g.free_top[0])]
        assert torch.unique(torch.cat([in_use, free])).numel() == g.pool.shape[0] == in_use.numel() + free.numel()


@settings(**SETTINGS)
@given(st.sampled_from([16, 64]), st.integers(1, 3), st.integers(1, 3), st.sampled_from([2, 4, 8]),
       st.integers(0, 20), st.integers(1, 12), st.integers(1, 5), st.booleans(), st.integers(0, 2**31 - 1))
def test_device_append_equals_append_records_and_counts_what_finds_no_room(d, B, H, page_size, prompt, steps,
                                                                           pages_per_head, pad, seed):
    """RDR's decode step inside a CUDA graph (kernels/decode_update.append_token) appends one token
    per (row, KV head) to the exact tier as store.append_records does; where the page table or
    the pool is full the row keeps its tier and the token is counted as lost, never written."""
    check_device_append(d, B, H, page_size, prompt, steps, pages_per_head, pad, seed)


def test_device_append_counts_the_tokens_that_find_no_room():
    """One row, one head, a one-page pool of 2 tokens, 5 decode steps: 3 tokens are lost."""
    assert check_device_append(16, 1, 1, 2, 0, 5, 1, False, 0) == 3


def check_device_append(d, B, H, page_size, prompt, steps, pages_per_head, pad, seed) -> int:
    """The kernel against the reference over `steps` decode steps; returns the tokens lost."""
    from sphkv_compile.kernels.decode_update import append_token
    from sphkv_compile.store import StoreCapacityError, append_records, encode_records as reference_records

    gen = torch.Generator().manual_seed(seed)
    spec = ALL_TIERS[0]
    kw, vw = record_words(spec, d, 0, KV_DTYPE)
    # a pool a little smaller than the page tables allow: both limits are reached
    def empty_state():
        return TierState.allocate(B, H, max(1, B * H * pages_per_head - 1), page_size, kw + vw, pages_per_head, "cpu")

    state = empty_state()
    cap = pages_per_head * page_size
    start = torch.randint(0, min(prompt, cap) + 1, (B, H), generator=gen)
    k0 = torch.randn(B, H, max(1, int(start.max())), d, generator=gen)
    ok0 = torch.arange(k0.shape[2])[None, None, :] < start[..., None]
    try:
        append_records(state, reference_records(spec, k0, k0, 0, KV_DTYPE), None, ok0)
    except StoreCapacityError:  # the starting fill itself does not fit this pool: start empty
        state = empty_state()
    ker, lost = clone_states([state])[0], torch.zeros(1, dtype=torch.int64)
    ref, ref_lost = clone_states([state])[0], 0
    for _ in range(steps):
        k = torch.randn(B, H, 1, d, generator=gen)
        v = torch.randn(B, H, 1, d, generator=gen)
        util = torch.rand(B, H, 1, generator=gen)
        valid = (torch.rand(B, 1, generator=gen) < 0.7) if pad else None
        append_token(ker, spec, k, v, valid, util, lost, seed=0, kv_dtype=KV_DTYPE)
        rec = reference_records(spec, k, v, 0, KV_DTYPE)
        for b in range(B):  # the reference, row by row, in the kernel's program order
            for h in range(H):
                if valid is not None and not bool(valid[b, 0]):
                    continue
                one = torch.zeros(B, H, 1, dtype=torch.bool)
                one[b, h] = True
                try:
                    append_records(ref, rec, util, one)
                except StoreCapacityError:
                    ref_lost += 1
    assert int(lost) == ref_lost
    assert torch.equal(ref.count, ker.count)
    (rr, ru, rv), (gr, gu, gv) = gather_tokens(ref), gather_tokens(ker)
    assert torch.equal(rv, gv) and torch.equal(rr[rv], gr[gv]) and torch.equal(ru[rv], gu[gv])
    return ref_lost


def test_encode_wrapper_takes_flat_tokens_in_chunks(monkeypatch):
    """cuda_ops.encode_records: placement.graduate hands over the graduating tokens as [M, d];
    they are encoded in launches of at most _ENCODE_TOKENS_PER_LAUNCH tokens (grid axis 1 has a
    65,535 limit) and come back exactly as one 4-D launch encodes them."""
    from sphkv_compile.kernels import cuda_ops

    monkeypatch.setattr(cuda_ops, "_ENCODE_TOKENS_PER_LAUNCH", 7)
    gen = torch.Generator().manual_seed(5)
    spec = DEFAULT_TIERS[2]
    k = torch.randn(23, 64, generator=gen).to(KV_DTYPE)
    v = torch.randn(23, 64, generator=gen).to(KV_DTYPE)
    flat = cuda_ops.encode_records(spec, k, v, 0, KV_DTYPE)
    whole = kernel_encode.encode_records(spec, k[None, None], v[None, None], 0, KV_DTYPE)[0, 0]
    assert flat.shape == whole.shape and torch.equal(flat, whole)
    empty = cuda_ops.encode_records(spec, k[:0], v[:0], 0, KV_DTYPE)
    assert empty.shape == (0, whole.shape[-1])


def test_encode_wrapper_falls_back_to_the_reference_with_the_callers_shape(monkeypatch):
    """A codec the kernels refuse is encoded by the reference, in the shape the caller passed."""
    from sphkv_compile.kernels import cuda_ops

    def refuse(*args, **kwargs):
        raise Unsupported("a configuration the kernels refuse")

    monkeypatch.setattr(cuda_ops.kernel_encode, "encode_records", refuse)
    spec = DEFAULT_TIERS[2]
    k = torch.randn(5, 64).to(KV_DTYPE)
    got = cuda_ops.encode_records(spec, k, k, 0, KV_DTYPE)
    assert torch.equal(got, encode_records(spec, k, k, 0, KV_DTYPE))


@pytest.mark.parametrize("d", [16, 64, 128, 256, 96])
def test_rotation_signs_reproduce_the_forward_rotation(d):
    """The encoder's 16-bit rotation: forward = c·S with S in {-1, +1} and c = d^-1/2 for
    power-of-two head dims, exactly (S in bf16 and fp16). Another head dim gets either None
    (the float32 path) or a sign matrix that reproduces its transform exactly (the kernels
    refuse such head dims before the encoder anyway). And which path each dtype pair takes."""
    from sphkv_compile.kernels.layout import rotation_matrices, rotation_signs

    kc, _ = tier_codecs(DEFAULT_TIERS[2], d, 0)
    fwd = kc.hadamard.forward(torch.eye(d, dtype=torch.float64))
    for dtype in (torch.bfloat16, torch.float16):
        signs = rotation_signs(kc.hadamard, dtype)
        if d & (d - 1):
            assert signs is None or torch.equal(signs[0].double() * signs[1], fwd)
            continue
        S, c = signs
        assert S.dtype == dtype and set(S.unique().tolist()) == {-1.0, 1.0}
        assert c == pytest.approx(d ** -0.5, rel=1e-12)
        assert torch.equal(S.double() * c, fwd)
        assert torch.allclose(rotation_matrices(kc.hadamard)[0].double(), fwd, atol=1e-7)
    vc = tier_codecs(DEFAULT_TIERS[2], d, 0)[1]
    for (kd, vd) in DTYPE_PAIRS:
        signs, kf, vf, ks, vs = kernel_encode._rotations(kc, vc, kd, vd)
        assert signs == (kd == vd and kd != torch.float32 and not d & (d - 1))
        assert kf.dtype == vf.dtype == (kd if signs else torch.float32)
        want_scale = d ** -0.5 if signs else 1.0
        assert ks == pytest.approx(want_scale, rel=1e-12) and vs == pytest.approx(want_scale, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 9)), min_size=1, max_size=4),
       st.sampled_from([torch.int32, torch.float16]), st.booleans(), st.integers(0, 2**31 - 1))
def test_copy_pages_equals_indexing_each_pool(pools_spec, dtype, tight, seed):
    """kernels.page_copy (beam search's reorder, all layers' pools in a few launches) against
    pool[dst] = pool[src] per pool, with sources that are also destinations (beams that swap),
    pools of different widths, owners with no copies, and (tight) a staging buffer so small that
    every owner gets its own launch pair."""
    from sphkv_compile.kernels import page_copy

    gen = torch.Generator().manual_seed(seed)
    pools, dst, src, owner, per_owner = [], [], [], [], []
    for i, (pages, width) in enumerate(pools_spec):
        pool = torch.randint(-2**15, 2**15, (pages, 4, width), generator=gen).to(dtype)
        n = int(torch.randint(0, pages + 1, (1,), generator=gen))
        dst.append(torch.randperm(pages, generator=gen)[:n])
        src.append(torch.randint(0, pages, (n,), generator=gen))
        owner.append(torch.full((n,), i))
        per_owner.append(n)
        pools.append(pool)
    want = [p.clone() for p in pools]
    for p, d, s in zip(want, dst, src):
        p[d] = p[s]
    before = page_copy.STAGING_BYTES
    page_copy.STAGING_BYTES = 1 if tight else before
    try:
        page_copy.copy_pages(pools, torch.cat(dst), torch.cat(src), torch.cat(owner), per_owner)
    finally:
        page_copy.STAGING_BYTES = before
    for got, w in zip(pools, want):
        assert torch.equal(got, w)


def test_beam_reorder_with_the_page_copier_equals_the_torch_copies():
    """store.select_rows_of with kernels.page_copy registered (as on CUDA) leaves every layer as
    the per-pool torch copies do: two beams swap, one is duplicated."""
    from sphkv_compile import store as store_mod
    from sphkv_compile.kernels import page_copy
    from sphkv_compile.store import LayerStore, select_rows_of

    def filled():
        out = []
        for layer in range(3):
            gen = torch.Generator().manual_seed(layer)
            s = LayerStore(4, 2, 32, (DEFAULT_TIERS[0], TierSpec("mid", 3.0, "polar", 3.0)), kv_dtype=torch.float32,
                           page_size=8)
            s.update(torch.randn(4, 2, 37, 32, generator=gen), torch.randn(4, 2, 37, 32, generator=gen),
                     torch.ones(4, 37, dtype=torch.bool), torch.rand(4, 2, 37, generator=gen), sink=2, recent=5,
                     target="mid")
            out.append(s)
        return out

    rows = torch.tensor([1, 0, 0, 3])
    with_kernel, with_torch = filled(), filled()
    store_mod._DEVICE_PAGE_COPIERS["cpu"] = page_copy.copy_pages
    try:
        select_rows_of(with_kernel, rows)
    finally:
        del store_mod._DEVICE_PAGE_COPIERS["cpu"]
    select_rows_of(with_torch, rows)
    for a_store, b_store in zip(with_kernel, with_torch):
        for a, b in zip(a_store.states, b_store.states):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
            assert a.count.sum() > 0
