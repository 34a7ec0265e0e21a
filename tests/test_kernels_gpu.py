"""The Triton kernels on a CUDA GPU against the float64 reference (run on the device machine).

Fresh random inputs per case; ragged counts per (batch row, KV head) and tier; every tier of
the default ladder plus a scalar-value tier. The kernels' tl.dot runs with tf32 operands on
the exact tier and the chunk, and with bf16 operands on the decoded tiles of compressed tiers
(like dense bf16 attention: q·k and p·v with bf16 inputs, float32 accumulation). Outputs are
compared at TF32_TOL plus the bf16 output's own rounding.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from sphkv_compile.kernels import attend as kernel_attend  # noqa: E402
from sphkv_compile.kernels import compaction, encode as kernel_encode, fragment_launch  # noqa: E402
from sphkv_compile.report import report as sphkv_report  # noqa: E402
from sphkv_compile.store import TierState, append_records, attend as reference_attend, encode_records, gather_tokens  # noqa: E402
from sphkv_compile.tiers import DEFAULT_TIERS, TierSpec, record_words, tier_codecs  # noqa: E402
from helpers import nan_filled_empty, record_launch_args, record_launches  # noqa: E402

DEV = torch.device("cuda")
KV_DTYPE = torch.bfloat16
SCALAR_TIER = TierSpec("scalar3", 3.5, "scalar", 3)
ALL_TIERS = DEFAULT_TIERS + (SCALAR_TIER,)
TF32_TOL = 2e-3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles as a new process would. torch.compile keeps at most
    torch._dynamo.config.recompile_limit (8) versions of one function per process, and every
    optimized model's forward is the same function (api.sphkv_forward): a worker that had run
    five generate() tests ran the sixth eagerly (session 10, test order under xdist)."""
    torch._dynamo.reset()
    yield


def triton_kernels_only(monkeypatch):
    """For the tests of the Triton kernels' settings (CODED): the Gluon fragment kernel, which
    serves polar tiers by default, off."""
    monkeypatch.setitem(fragment_launch.FRAGMENT, "enabled", False)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# "wide" magnitudes (as tests/test_kernels_interpreted.py): queries 2^20 times larger and keys
# 2^20 times smaller, key norms over 9 octaves, value norms over 80, some zero keys and values.
WIDE_Q = 2.0**20


def wide_kv(gen, k, v, wide: bool):
    """k and v at the test's magnitudes (as they are unless wide), in their dtype."""
    if not wide:
        return k, v
    shape = (*k.shape[:-1], 1)

    def scales(lo, hi):
        x = torch.exp2(lo + (hi - lo) * torch.rand(shape, generator=gen, device=DEV))
        return torch.where(torch.rand(shape, generator=gen, device=DEV) < 0.1, 0.0, x)

    return ((k.float() / WIDE_Q * scales(-8.0, 1.0)).to(k.dtype), (v.float() * scales(-40.0, 40.0)).to(v.dtype))


def fill_store(gen, B, H, d, specs, counts, page_size=64, seed=0, wide=False):
    states = []
    for spec, cnt in zip(specs, counts):
        kw, vw = record_words(spec, d, seed, KV_DTYPE)
        n = int(cnt.max())
        max_pages = max(1, math.ceil(n / page_size))
        st = TierState.allocate(B, H, B * H * max_pages + 1, page_size, kw + vw, max_pages, DEV)
        if n:
            k = torch.randn(B, H, n, d, generator=gen, device=DEV, dtype=KV_DTYPE)
            v = torch.randn(B, H, n, d, generator=gen, device=DEV, dtype=KV_DTYPE)
            k, v = wide_kv(gen, k, v, wide)
            valid = torch.arange(n, device=DEV)[None, None, :] < cnt[..., None]
            util = torch.rand(B, H, n, generator=gen, device=DEV)
            append_records(st, kernel_encode.encode_records(spec, k, v, seed, KV_DTYPE), util, valid, spec.name)
        states.append(st)
    return states


def ragged_counts(gen, B, H, T, specs):
    """Per tier [B, H] counts; row (0, 0) holds T tokens in total, the others fewer."""
    out = []
    for i, _ in enumerate(specs):
        share = T // len(specs) + (T % len(specs) if i == 0 else 0)
        c = torch.randint(0, share + 1, (B, H), generator=gen, device=DEV)
        c[0, 0] = share
        out.append(c)
    return out


CASES = [  # (d, Hkv, G, B, T, Tq, tiers); "all": every tier (each compiles its own kernels)
    (64, 3, 3, 64, 777, 1, "all"),
    (128, 8, 4, 8, 4096, 1, "all"),
    (128, 8, 4, 1, 131072, 1, "default"),
    (64, 3, 3, 1, 131072, 1, "default"),
    (128, 2, 1, 5, 2000, 1, "default"),
    (128, 1, 8, 3, 3000, 1, "default"),
    (64, 4, 2, 2, 1500, 1, "default"),
    (64, 2, 2, 1, 1, 1, "default"),
    (128, 2, 4, 2, 3000, 33, "default"),  # chunked prefill over codes + chunk
    (64, 3, 3, 1, 500, 200, "default"),
    (256, 2, 4, 2, 3000, 1, "default"),  # Gemma's head dim: halves without the register cap (added session 8, not yet run)
]


@pytest.mark.parametrize("d,H,G,B,T,Tq,tiers", CASES)
def test_attend_matches_float64_reference(d, H, G, B, T, Tq, tiers):
    check_attend(d, H, G, B, T, Tq, tiers)


@pytest.mark.parametrize("d,G,Tq", [(128, 4, 1), (64, 8, 1), (128, 2, 33)])
def test_attend_with_sink_logits_matches_float64_reference(d, G, Tq):
    """gpt-oss's sink logits: the combine's row statistics rescale the output (kernels.attend)."""
    check_attend(d, 4, G, 4, 3000, Tq, "default", sinks=True)


@pytest.mark.parametrize("d,Tq,packed", [(128, 1, True), (64, 1, True), (128, 33, True), (128, 1, False)])
def test_attend_with_extreme_magnitudes_matches_float64_reference(d, Tq, packed, monkeypatch):
    """Queries at 2^20 (past float16's range: the packed kernels divide each row by its largest
    entry), key norms over 9 octaves, value norms over 80 (the value radius scales p, normalised
    by each row's largest p·r), zero keys and values; every tier, ragged, decode and chunked
    prefill, with the float16 (packed) and the bfloat16 tiles (added session 16, not yet run)."""
    monkeypatch.setitem(kernel_attend.CODED, "packed", packed)
    if not packed:  # the Triton kernels' bfloat16 tiles; packed, the polar tiers run the fragment kernel
        triton_kernels_only(monkeypatch)
    check_attend(d, 4, 4, 4, 3000, Tq, "all", wide=True)


@pytest.mark.parametrize("d,programs_per_sm", [(128, 2), (64, 2), (128, 4)])
def test_attend_in_whole_tiles_matches_float64_reference(d, programs_per_sm, monkeypatch):
    """CODED['halves'] off (keys and values decoded as whole D-wide tiles, uncapped registers):
    the setting sweep_coded.py times against the default halves kernel."""
    triton_kernels_only(monkeypatch)
    monkeypatch.setitem(kernel_attend.CODED, "halves", False)
    monkeypatch.setitem(kernel_attend.CODED, "maxnreg", None)
    monkeypatch.setitem(kernel_attend.CODED, "programs_per_sm", programs_per_sm)
    monkeypatch.setitem(kernel_attend.CODED, "many_rows", None)  # the setting above at every row count
    check_attend(d, 4, 4, 8, 5000, 1, "default")


@pytest.mark.parametrize("maxnreg,programs_per_sm,tiers", [(128, 4, "all"), (96, 5, "default")])
def test_attend_in_quarters_matches_float64_reference(maxnreg, programs_per_sm, tiers, monkeypatch):
    """CODED['quarters'] on (keys and values decoded in four quarters of D): the settings
    sweep_coded.py times against the default halves kernel (added session 11, not yet run)."""
    triton_kernels_only(monkeypatch)
    monkeypatch.setitem(kernel_attend.CODED, "quarters", True)
    monkeypatch.setitem(kernel_attend.CODED, "maxnreg", maxnreg)
    monkeypatch.setitem(kernel_attend.CODED, "programs_per_sm", programs_per_sm)
    monkeypatch.setitem(kernel_attend.CODED, "many_rows", None)  # the setting above at every row count
    launched = record_launches(monkeypatch, kernel_attend, "paged_coded_quarters_kernel")
    check_attend(128, 8, 4, 8, 5000, 1, tiers)
    assert launched


@pytest.mark.parametrize("d,halves,tiers", [(128, True, "all"), (64, True, "all"), (128, False, "default")])
def test_attend_with_staged_tables_matches_float64_reference(d, halves, tiers, monkeypatch):
    """CODED['shared_tables'] on: the decoders read their tables from shared memory (inline
    PTX, which the interpreter cannot run, so only here). Every tier whose tables fit is staged."""
    triton_kernels_only(monkeypatch)
    monkeypatch.setitem(kernel_attend.CODED, "shared_tables", True)
    monkeypatch.setitem(kernel_attend.CODED, "halves", halves)
    if not halves:  # whole 256-token tiles need 77 KB of shared memory at d=128: no room for tables
        monkeypatch.setitem(kernel_attend.CODED, "tokens_per_thread", 1)
    staged = []
    stager = kernel_attend.stager
    monkeypatch.setattr(kernel_attend, "stager", lambda k, v, packed: staged.append(k) or stager(k, v, packed))
    check_attend(d, 8, 4, 8, 5000, 1, tiers)
    # "all": mid, low and scalar3 (tables of 0.4-1.8 KB); high's (7 KB as float16 pairs) stay in global memory
    assert len(set(staged)) == (3 if tiers == "all" else 1), staged


@pytest.mark.parametrize("d,setting", [
    (128, dict(warps=2, quarters=True, maxnreg=168, programs_per_sm=6)),
    (128, dict(warps=4, quarters=True, maxnreg=0, programs_per_sm=2)),
    (64, dict(warps=2, maxnreg=0, programs_per_sm=4)),
], ids=["quarters-2warps", "quarters-4warps", "halves-2warps-d64"])
def test_attend_with_two_tokens_per_thread_matches_float64_reference(d, setting, monkeypatch):
    """CODED['tokens_per_thread'] = 2 (the default since session 17) at the other settings
    sweep_coded.py timed (tiles written to shared memory in 16-byte vectors): every tier, ragged."""
    triton_kernels_only(monkeypatch)
    monkeypatch.setitem(kernel_attend.CODED, "tokens_per_thread", 2)
    monkeypatch.setitem(kernel_attend.CODED, "many_rows", None)  # the setting below at every row count
    for key, value in setting.items():
        monkeypatch.setitem(kernel_attend.CODED, key, value)
    name = "paged_coded_quarters_kernel" if setting.get("quarters") else "paged_coded_halves_kernel"
    launched = record_launches(monkeypatch, kernel_attend, name)
    check_attend(d, 8, 4, 8, 5000, 1, "all")
    assert launched


@pytest.mark.parametrize("B,tiers,shapes", [(8, "all", {(2, 128), (4, 256)}), (1, "all", {(4, 256)}),
                                             (8, "default", {(2, 128)})])
def test_attend_launch_follows_the_rows(B, tiers, shapes, monkeypatch):
    """CODED['many_rows'] at d=128 (the default since session 22): a batch whose rows fill four
    programs per SM (8 sequences x 8 KV heads) runs its polar-value tiers in 2-warp programs of
    128-token tiles and its scalar-value tier in 4-warp ones of 256; a single sequence runs all in
    4-warp programs. Every tier against the float64 reference, ragged."""
    triton_kernels_only(monkeypatch)
    seen = []
    kernel = kernel_attend.paged_coded_halves_kernel

    class Spy:
        def __getitem__(self, grid):
            run = kernel[grid]

            def launch(*args, **kwargs):
                seen.append((kwargs["num_warps"], kwargs["BLOCK_T"]))
                return run(*args, **kwargs)
            return launch

    monkeypatch.setattr(kernel_attend, "paged_coded_halves_kernel", Spy())
    check_attend(128, 8, 4, B, 5000, 1, tiers)
    assert set(seen) == shapes, seen


@pytest.mark.parametrize("d", [128, 64])
def test_attend_with_one_token_per_thread_matches_float64_reference(d, monkeypatch):
    """The default launch until session 16 (one token per thread, halves capped at 128
    registers, four programs per SM), still what head dims other than 128 get."""
    triton_kernels_only(monkeypatch)
    for key, value in dict(tokens_per_thread=1, maxnreg=128, programs_per_sm=4, many_rows=None).items():
        monkeypatch.setitem(kernel_attend.CODED, key, value)
    assert kernel_attend._coded_block_t(d) == 32 * kernel_attend.CODED["warps"]
    check_attend(d, 8, 4, 8, 5000, 1, "all")


FRAGMENT_CASES = [  # (d, Hkv, G, B, T, Tq, tiers)
    (128, 8, 4, 8, 5000, 1, "all"),
    (64, 3, 3, 4, 3000, 1, "all"),
    (32, 2, 8, 2, 2000, 1, "default"),
    (128, 1, 1, 3, 1, 1, "default"),
    (128, 2, 5, 1, 131072, 1, "default"),
    (128, 4, 2, 2, 3000, 40, "default"),  # chunked prefill: 80 rows, five row blocks
    (64, 2, 6, 64, 700, 1, "default"),
]


@pytest.mark.parametrize("d,H,G,B,T,Tq,tiers", FRAGMENT_CASES)
def test_fragment_kernel_matches_float64_reference(d, H, G, B, T, Tq, tiers, monkeypatch):
    """The Gluon fragment kernel (keys and values decoded per lane into the mma operands) serves
    every polar tier here, ragged, GQA 1-8, lengths 1 to 128k, head dims 32-128."""
    from sphkv_compile.kernels import fragment_decode_kernel, fragment_kernels

    launched = record_launches(monkeypatch, fragment_kernels, "paged_fragment_kernel", "16 rows")
    record_launches(monkeypatch, fragment_decode_kernel, "paged_fragment_decode_kernel", "decode", launched)
    check_attend(d, H, G, B, T, Tq, tiers)
    assert set(launched) == {"decode" if G * Tq <= 8 else "16 rows"}, launched


@pytest.mark.parametrize("d,wide", [(128, False), (64, True)])
def test_fragment_kernel_agrees_with_the_triton_kernels(d, wide, monkeypatch):
    """Both kernels on the same store: the same attention up to their 16-bit operands' rounding."""
    seed = random.randrange(2**31)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    states = fill_store(gen, 4, 4, d, specs, ragged_counts(gen, 4, 4, 6000, specs), wide=wide)
    q = torch.randn(4, 16, 1, d, generator=gen, device=DEV, dtype=torch.bfloat16) * (WIDE_Q if wide else 1.0)
    kw = dict(seed=0, kv_dtype=KV_DTYPE)
    fragment, _ = kernel_attend.attend(q, states, specs, **kw)
    assert sphkv_report()["decode_kernels"][f"uniform d={d}"] == {"kernel": "fragment", "why_not_fragment": None}
    triton_kernels_only(monkeypatch)
    triton_out, _ = kernel_attend.attend(q, states, specs, **kw)
    assert sphkv_report()["decode_kernels"][f"uniform d={d}"]["kernel"] == "triton"
    assert rel_err(fragment, triton_out) < 2.0**-7, seed


@pytest.mark.parametrize("d,wide", [(128, True), (64, False), (32, False)])
def test_fragment_decode_kernel_agrees_with_the_16_row_kernel(d, wide, monkeypatch):
    """The decode kernel (queries as the mma's columns) and paged_fragment_kernel (queries as its
    rows) on the same store and queries: the same codes and the same 16-bit operands, so they
    agree to float16 rounding (the order of the sums differs)."""
    seed = random.randrange(2**31)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    states = fill_store(gen, 3, 2, d, specs, ragged_counts(gen, 3, 2, 5000, specs), wide=wide)
    # float32 queries, so float32 outputs: no bfloat16 rounding of two nearly equal results
    q = torch.randn(3, 14, 1, d, generator=gen, device=DEV, dtype=torch.float32) * (WIDE_Q if wide else 1.0)
    kw = dict(seed=0, kv_dtype=KV_DTYPE)
    decode, _ = kernel_attend.attend(q, states, specs, **kw)
    monkeypatch.setitem(fragment_launch.FRAGMENT, "decode_kernel", False)
    rows, _ = kernel_attend.attend(q, states, specs, **kw)
    assert rel_err(decode, rows) < 2.0**-9, seed


@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "16-rows"])
def test_fragment_splits_assume_the_programs_an_sm_holds(d, decode, monkeypatch):
    """The split count assumes as many fragment programs per SM as the driver's occupancy query
    gives for the compiled kernel; that number also follows from the kernel's registers and
    shared memory and the device's limits, worked out here by hand."""
    from sphkv_compile.kernels.fragment_codegen import FRAGMENT_TABLE_BYTES
    from sphkv_compile.kernels.layout import tier_info

    gen = torch.Generator(device=DEV).manual_seed(random.randrange(2**31))
    specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    states = fill_store(gen, 2, 2, d, specs, ragged_counts(gen, 2, 2, 3000, specs))
    info = tier_info(specs[1], d, 0, KV_DTYPE)
    q_rot = torch.randn(2 * 2, 4, d, device=DEV)
    monkeypatch.setitem(fragment_launch.FRAGMENT, "programs_per_sm", None)
    monkeypatch.setitem(fragment_launch.FRAGMENT, "decode_kernel", decode)
    held = fragment_launch.programs_per_sm(info, q_rot, states[1], 4)
    kernel = fragment_launch.compiled_stand_in(info, q_rot, states[1], 4)
    props = torch.cuda.get_device_properties(DEV)
    warps, tokens = fragment_launch.FRAGMENT["warps"], fragment_launch.FRAGMENT["tokens_per_warp"]
    per_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers are handed out per warp, 256 at a time
    by_registers = props.regs_per_multiprocessor // (per_warp * warps)
    # static: the tables and two tiles of staged records; dynamic: Triton's; 1 KiB per program for the system
    static = FRAGMENT_TABLE_BYTES + 2 * warps * tokens * states[1].pool.shape[-1] * 4
    by_shared = props.shared_memory_per_multiprocessor // (static + kernel.metadata.shared + 1024)
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    assert held == min(by_registers, by_shared, by_threads) >= 1, (held, kernel.n_regs, by_registers, by_shared)


@pytest.mark.parametrize("Tq,N", [(1, 1), (33, 300)])
def test_attend_without_a_window_returns_zero_mass(Tq, N, monkeypatch):
    """obs_window 0 (the uniform policy): new_mass is all zeros, which the query kernel writes
    (kernels/query_kernels.py), not whatever its memory held: every float tensor attend
    allocates starts out NaN-filled here."""
    seed = random.randrange(2**31)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    B, H, G, d = 3, 2, 4, 128
    specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    states = fill_store(gen, B, H, d, specs, ragged_counts(gen, B, H, 2000, specs))
    q = torch.randn(B, H * G, Tq, d, generator=gen, device=DEV, dtype=torch.bfloat16)
    kn = torch.randn(B, H, N, d, generator=gen, device=DEV, dtype=torch.bfloat16)
    nan_filled_empty(monkeypatch)
    assert torch.isnan(torch.empty(1, device=DEV)).all()
    out, mass = kernel_attend.attend(q, states, specs, seed=0, kv_dtype=KV_DTYPE, k_new=kn, v_new=kn)
    assert mass.shape == (B, H, N) and torch.equal(mass, torch.zeros_like(mass)), seed
    assert torch.isfinite(out).all(), seed


@pytest.mark.parametrize("d,H,G,B,fragments", [(128, 2, 4, 1, True), (64, 3, 3, 8, True), (128, 2, 4, 2, False)],
                         ids=["llama-like-B1", "smollm-like-B8", "triton-kernels"])
def test_dependent_launch_changes_no_output(d, H, G, B, fragments, monkeypatch):
    """Launched with programmatic dependent launch, a decode step's kernels (queries, fragment,
    exact tier and new token, combine) compute the same outputs, bit for bit, as
    launched plainly: eagerly, and replayed from a CUDA graph with the queries and the new token
    alternating between two sets, so a kernel that read an earlier kernel's buffer before its
    wait would read the other set's values."""
    from sphkv_compile.kernels import dependent_launch, fragment_decode_kernel

    if torch.cuda.get_device_capability(DEV) < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    if not fragments:
        triton_kernels_only(monkeypatch)
    seed = random.randrange(2**31)
    call, sets = decode_step_on_two_input_sets(seed, B, H, G, d, 5000)
    seen = []
    for module, name in ((kernel_attend, "prepare_queries_kernel"), (kernel_attend, "exact_and_chunk_partials_kernel"),
                         (kernel_attend, "combine_kernel"), (fragment_decode_kernel, "paged_fragment_decode_kernel")):
        record_launch_args(monkeypatch, module, name, lambda a, name=name: (name, a.get("launch_pdl", False)), seen)
    plain = [call(*inputs) for inputs in sets]
    assert not torch.equal(plain[0], plain[1])  # so the two sets tell a stale read apart
    assert seen and not any(pdl for _, pdl in seen), seen
    monkeypatch.setitem(dependent_launch.DEPENDENT_LAUNCH, "enabled", True)
    assert dependent_launch.enabled(DEV)
    seen.clear()
    eager = [call(*inputs) for inputs in sets]
    kernels = {"exact_and_chunk_partials_kernel", "combine_kernel"}
    if not kernel_attend.PLAIN["queries_with_exact"]:  # else the exact launch prepares the queries
        kernels.add("prepare_queries_kernel")
    if fragments:
        kernels.add("paged_fragment_decode_kernel")
    assert set(seen) == {(name, True) for name in kernels}, seen
    for got, want in zip(eager, plain):
        assert torch.equal(got, want), seed
    assert_graph_replays_give(call, sets, plain, seed)


def decode_step_on_two_input_sets(seed, B, H, G, d, T):
    """A decode step of the default ladder over a ragged store of up to T tokens: call(q, k_new,
    v_new) -> its output, and two sets of those inputs (different, so a stale read shows)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    states = fill_store(gen, B, H, d, specs, ragged_counts(gen, B, H, T, specs))
    sets = [(torch.randn(B, H * G, 1, d, generator=gen, device=DEV, dtype=torch.bfloat16),
             torch.randn(B, H, 1, d, generator=gen, device=DEV, dtype=torch.bfloat16),
             torch.randn(B, H, 1, d, generator=gen, device=DEV, dtype=torch.bfloat16)) for _ in range(2)]

    def call(q, k_new, v_new):
        return kernel_attend.attend(q, states, specs, seed=0, kv_dtype=KV_DTYPE, k_new=k_new, v_new=v_new)[0]

    return call, sets


def assert_graph_replays_give(call, sets, want, seed):
    """call captured in a CUDA graph, replayed 8 times with its inputs alternating between the
    two sets: each replay's output equals want[set] bit for bit."""
    static = [x.clone() for x in sets[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(*static)
    for i in range(8):
        for x, y in zip(static, sets[i % 2]):
            x.copy_(y)
        graph.replay()
        assert torch.equal(out, want[i % 2]), (seed, i)


@pytest.mark.parametrize("d,H,G,B,T,Tq,tiers", [(128, 8, 4, 1, 4096, 1, "default"), (64, 3, 3, 8, 20000, 1, "default"),
                                                 (128, 2, 4, 2, 3000, 1, "all"), (64, 4, 2, 2, 3000, 5, "all")],
                         ids=["llama-B1-4k", "smollm-B8", "every-tier", "prefill-chunk"])
def test_queries_with_exact_launch_matches_reference(d, H, G, B, T, Tq, tiers, monkeypatch):
    """PLAIN['queries_with_exact'] (the default since session 36): the exact tier's and the new
    tokens' launch prepares the queries too and runs before the fragment/coded kernels, which
    read its rotated rows. Against the float64 reference (check_attend: ragged rows, padding,
    the observation window's mass)."""
    monkeypatch.setitem(kernel_attend.PLAIN, "queries_with_exact", True)
    separate = record_launches(monkeypatch, kernel_attend, "prepare_queries_kernel")
    check_attend(d, H, G, B, T, Tq, tiers)
    assert not separate, separate


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_queries_with_exact_launch_changes_no_output(pdl, monkeypatch):
    """The fused query launch gives the separate launch's outputs bit for bit, eagerly and
    replayed from a CUDA graph with the queries and the new token alternating between two sets
    (a kernel that read the rotated queries before the fused launch wrote them would read the
    other set's), with and without programmatic dependent launch."""
    from sphkv_compile.kernels import dependent_launch

    if pdl and torch.cuda.get_device_capability(DEV) < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    monkeypatch.setitem(dependent_launch.DEPENDENT_LAUNCH, "enabled", pdl)
    seed = random.randrange(2**31)
    call, sets = decode_step_on_two_input_sets(seed, 1, 8, 4, 128, 4096)
    monkeypatch.setitem(kernel_attend.PLAIN, "queries_with_exact", False)
    separate = [call(*inputs) for inputs in sets]
    assert not torch.equal(separate[0], separate[1])
    monkeypatch.setitem(kernel_attend.PLAIN, "queries_with_exact", True)
    fused = record_launch_args(monkeypatch, kernel_attend, "exact_and_chunk_partials_kernel", lambda a: a["QUERIES"])
    for got, want in zip([call(*inputs) for inputs in sets], separate):
        assert torch.equal(got, want), seed
    assert fused and all(fused), fused
    assert_graph_replays_give(call, sets, separate, seed)


def check_attend(d, H, G, B, T, Tq, tiers, sinks=False, wide=False):
    """sinks: gpt-oss-style sink logits per query head (random, one huge, one -inf). wide: the
    magnitudes of WIDE_Q above."""
    seed = random.randrange(2**31)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    if tiers == "default":  # the uniform policy: exact sinks/recent + one compressed tier
        specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    else:
        specs = list(ALL_TIERS)
    states = fill_store(gen, B, H, d, specs, ragged_counts(gen, B, H, T, specs), wide=wide)
    N = Tq + 2
    q = torch.randn(B, H * G, Tq, d, generator=gen, device=DEV, dtype=torch.bfloat16) * (WIDE_Q if wide else 1.0)
    kn = torch.randn(B, H, N, d, generator=gen, device=DEV, dtype=torch.bfloat16)
    vn = torch.randn(B, H, N, d, generator=gen, device=DEV, dtype=torch.bfloat16)
    kn, vn = wide_kv(gen, kn, vn, wide)
    valid = torch.ones(B, N, dtype=torch.bool, device=DEV)
    valid[-1, :1] = False
    ref_states = [TierState(*[t.clone() for t in s.tensors()]) for s in states]
    kw = dict(seed=0, kv_dtype=KV_DTYPE, valid_new=valid, obs_window=min(4, Tq), accumulate=True)
    if sinks:
        kw["sinks"] = 3 * torch.randn(H * G, generator=gen, device=DEV)
        kw["sinks"][0], kw["sinks"][-1] = 40.0, float("-inf")
    out, mass = kernel_attend.attend(q, states, specs, k_new=kn, v_new=vn, **kw)
    ref, ref_mass = reference_attend(q.double(), ref_states, specs, k_new=kn.double(), v_new=vn.double(), **kw)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    # the output is bf16 like q: its own rounding (2^-9) adds to the tf32 error
    assert err < TF32_TOL + 2.0**-8, (seed, err)
    assert rel_err(mass, ref_mass) < TF32_TOL, seed
    for s, r in zip(states, ref_states):
        assert torch.allclose(s.utility.float(), r.utility.float(), rtol=5e-3, atol=2e-3), seed


@pytest.mark.parametrize("spec,d", [(t, 128) for t in ALL_TIERS[1:]] + [(DEFAULT_TIERS[2], 64)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_encode_matches_float64_reference(spec, d):
    gen = torch.Generator(device=DEV).manual_seed(random.randrange(2**31))
    k = (torch.randn(4, 8, 1000, d, generator=gen, device=DEV)
         * torch.exp(3 * torch.randn(4, 8, 1000, 1, generator=gen, device=DEV))).to(KV_DTYPE)
    v = torch.randn(4, 8, 1000, d, generator=gen, device=DEV, dtype=KV_DTYPE)
    got = kernel_encode.encode_records(spec, k, v, 0, KV_DTYPE)
    want = encode_records(spec, k.double(), v.double(), 0, KV_DTYPE)
    kc, vc = tier_codecs(spec, d, 0)
    for codec, g, w in ((kc, got[..., :kc.words], want[..., :kc.words]),
                        (vc, got[..., kc.words:], want[..., kc.words:])):
        for f, (a, b) in enumerate(zip(codec.layout.unpack(g), codec.layout.unpack(w))):
            diff = (a - b).abs()
            if f == 1 and hasattr(codec, "tree"):
                diff = torch.minimum(diff, (1 << codec.level_bits[0]) - diff)
            assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, 0.02 * diff.numel()), (codec, f)


@pytest.mark.parametrize("spec,d", [(t, 128) for t in ALL_TIERS[1:]] + [(DEFAULT_TIERS[2], 64)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_record_decoder_matches_the_codecs_on_gpu(spec, d):
    """kernels.record_decode (RDR's demotions on a GPU) against the codecs' decode of the same
    records, un-rotated, per token at float32 accuracy (added session 9, not yet run)."""
    from sphkv_compile.kernels.record_decode import decode_records
    from sphkv_compile.rdr.convert import decode_kv

    gen = torch.Generator().manual_seed(d)
    k = torch.randn(1000, d, generator=gen) * torch.exp(4 * torch.randn(1000, 1, generator=gen))
    v = torch.randn(1000, d, generator=gen)
    records = encode_records(spec, k, v, 0, KV_DTYPE)
    got = decode_records(spec, records.to(DEV), d, 0, KV_DTYPE)
    want = decode_kv(spec, records, d, 0, KV_DTYPE, rotated=False)
    for g, w in zip(got, want):
        err = (g.cpu() - w).norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30)
        assert float(err.max()) < 1e-4, float(err.max())


def test_capped_allocation_on_the_gpu_matches_the_cpu():
    """RDR allocates large layers on the model's device (rdr.update.allocation_device): there it
    must reach the CPU's optimum (the same Σ D up to float64 summation order) within the
    capacities. 50,000 items per row, the size where the GPU path is taken."""
    from sphkv_compile.rdr.allocate import allocate_capped, counts, total_distortion
    from sphkv_compile.rdr.update import ALLOCATE_ON_DEVICE_MIN_ITEMS
    from test_rdr_allocate import random_instance

    items = 50_000
    assert items >= ALLOCATE_ON_DEVICE_MIN_ITEMS
    D, cost = random_instance(7, 2, items, protected_frac=0.05)
    cap = torch.tensor([[5000.0, 3000.0, 10000.0, 20000.0, float("inf")]] * 2, dtype=torch.float64)
    budget = (cap[:, :4] * cost[:4]).sum(-1)
    on_cpu = allocate_capped(D, cost, budget, cap)
    on_gpu = allocate_capped(D.to(DEV), cost.to(DEV), budget.to(DEV), cap.to(DEV))
    assert on_gpu.device.type == "cuda"
    assert (counts(on_gpu.cpu(), 5) <= cap).all()
    torch.testing.assert_close(total_distortion(D, on_gpu.cpu()), total_distortion(D, on_cpu), rtol=1e-12, atol=0)


def test_compaction_on_gpu():
    gen = torch.Generator(device=DEV).manual_seed(random.randrange(2**31))
    spec = DEFAULT_TIERS[2]
    counts = torch.randint(0, 3000, (3, 4), generator=gen, device=DEV)
    (state,) = fill_store(gen, 3, 4, 128, [spec], [counts])
    rec, util, valid = gather_tokens(state)
    keep = (torch.rand(valid.shape, generator=gen, device=DEV) < 0.6) & valid
    compaction.compact(state, keep)
    rec2, util2, valid2 = gather_tokens(state)
    for b in range(3):
        for h in range(4):
            assert torch.equal(rec2[b, h][valid2[b, h]], rec[b, h][keep[b, h]])
            assert torch.equal(util2[b, h][valid2[b, h]], util[b, h][keep[b, h]])


def test_op_and_compiled_op_run_the_kernels():
    """torch.ops.sphkv.attend on CUDA reaches the kernels, eagerly and inside torch.compile."""
    from sphkv_compile.inductor_passes import lowering
    from sphkv_compile.ops import tiers_string

    assert lowering.install()
    gen = torch.Generator(device=DEV).manual_seed(random.randrange(2**31))
    specs = [DEFAULT_TIERS[0], TierSpec("uniform", 3.5, "polar", 3.5)]
    states = fill_store(gen, 2, 2, 64, specs, [torch.full((2, 2), 5, device=DEV), torch.full((2, 2), 300, device=DEV)])
    flat = [t for s in states for t in s.tensors()]
    q = torch.randn(2, 4, 1, 64, generator=gen, device=DEV, dtype=torch.bfloat16)
    kn = torch.randn(2, 2, 1, 64, generator=gen, device=DEV, dtype=torch.bfloat16)
    vn = torch.randn_like(kn)
    tiers = tiers_string(specs)

    def step(q, kn, vn):
        return torch.ops.sphkv.attend(q, flat, kn, vn, None, tiers, 0, "bfloat16", 0.125, 0, False)

    eager, _ = step(q, kn, vn)
    compiled, _ = torch.compile(step, fullgraph=True)(q, kn, vn)
    ref, _ = reference_attend(q.double(), states, specs, seed=0, kv_dtype=KV_DTYPE, k_new=kn.double(),
                              v_new=vn.double(), scale=0.125)
    assert rel_err(eager, ref) < TF32_TOL + 2.0**-8
    assert rel_err(compiled, ref) < TF32_TOL + 2.0**-8


@pytest.mark.parametrize("d,B,H,sink,recent,ps", [(128, 4, 8, 4, 64, 64), (64, 3, 3, 0, 5, 8), (64, 2, 2, 2, 0, 16)])
def test_device_decode_update_equals_graduate_on_gpu(monkeypatch, d, B, H, sink, recent, ps):
    """sphkv::update_cache on CUDA (one token: kernels/decode_update.py) against
    placement.graduate with the same (Triton) encoder: identical tiers after every step. Both
    take the decode-step launch settings (encode.ENCODE_DECODE_STEP; graduate's launches of
    several tiles per row would otherwise take the prefill ones)."""
    from sphkv_compile.kernels import cuda_ops, encode as kernel_encode
    from sphkv_compile.ops import tiers_string
    from sphkv_compile.placement import graduate

    monkeypatch.setitem(kernel_encode.ENCODE_DECODE_STEP, "max_tiles_per_row", 10**6)
    cuda_ops.register()
    gen = torch.Generator(device=DEV).manual_seed(random.randrange(2**31))
    specs = [DEFAULT_TIERS[0], DEFAULT_TIERS[2]]
    prompt, steps = 100, 80
    states = []
    for s, cap in zip(specs, (min(prompt + steps, sink + recent), prompt + steps)):
        kw, vw = record_words(s, d, 0, KV_DTYPE)
        per_head = max(1, math.ceil(cap / ps))
        states.append(TierState.allocate(B, H, B * H * per_head, ps, kw + vw, per_head, DEV))
    kw = dict(seed=0, kv_dtype=KV_DTYPE, sink=sink, recent=recent, target=1, encode=cuda_ops.encode_records)
    graduate(states, specs, torch.randn(B, H, prompt, d, generator=gen, device=DEV),
             torch.randn(B, H, prompt, d, generator=gen, device=DEV), None, None, **kw)
    ref = [TierState(*[t.clone() for t in s.tensors()]) for s in states]
    flat = [t for s in states for t in s.tensors()]
    for i in range(steps):
        k = torch.randn(B, H, 1, d, generator=gen, device=DEV, dtype=KV_DTYPE)
        v = torch.randn(B, H, 1, d, generator=gen, device=DEV, dtype=KV_DTYPE)
        util = torch.rand(B, H, 1, generator=gen, device=DEV)
        valid = torch.rand(B, 1, generator=gen, device=DEV) < 0.8
        graduate(ref, specs, k, v, valid, util, **kw)
        torch.ops.sphkv.update_cache(flat, k, v, valid, util, tiers_string(specs), 0, "bfloat16", sink, recent, 1)
    for r, g in zip(ref, states):
        assert torch.equal(r.count, g.count)
        (rr, ru, rv), (gr, gu, gv) = gather_tokens(r), gather_tokens(g)
        assert torch.equal(rv, gv) and torch.equal(rr[rv], gr[gv]) and torch.equal(ru[rv], gu[gv])


def count_graph_captures(monkeypatch) -> list:
    """A list that grows by one at every CUDA graph capture from now on (cudagraph trees record
    through torch.cuda.CUDAGraph.capture_begin)."""
    captures = []
    original = torch.cuda.CUDAGraph.capture_begin

    def counting(self, *args, **kwargs):
        captures.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counting)
    return captures


def greedy_with_and_without_graphs(model, ids, mask, cache, monkeypatch) -> tuple[dict, dict]:
    """The zoo's greedy generate() on a static cache, with CUDA graphs (mode 'reduce-overhead')
    and without (mode 'default'); graphs must have been captured, none skipped. Returns the
    tokens per mode and report()["decode_step"] of the graphed run."""
    import transformers as tf
    from torch._dynamo.utils import counters

    import sphkv_compile.api as sphkv
    from tests import test_zoo as zoo

    counters.clear()
    captures = count_graph_captures(monkeypatch)
    runs, graphed_step = {}, None
    for mode in ("reduce-overhead", "default"):
        cache.reset()
        runs[mode] = zoo.greedy(model, ids, mask, compile_config=tf.CompileConfig(mode=mode),
                                **{sphkv.cache_keyword(model): cache})
        if mode == "reduce-overhead":
            assert captures and counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
            graphed_step = sphkv.report()["decode_step"]
    return runs, graphed_step


@pytest.mark.parametrize("budget", [None, 0.5])
def test_generate_with_cuda_graphs_equals_generate_without(budget, monkeypatch):
    """optimize() keeps generate()'s CUDA graphs (mode 'reduce-overhead') for the uniform policy:
    the decode step, replayed from graphs, produces the same greedy tokens as without them, and
    over more steps than the recent window (so tokens graduate to the compressed tier inside
    the graphs). With a byte budget, the budgeting node checks it on the device inside the
    graphs (raised after generate() if exceeded)."""
    import transformers as tf
    from torch._dynamo.utils import counters

    import sphkv_compile
    import sphkv_compile.api as sphkv

    torch.manual_seed(random.randrange(2**31))
    config = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    options = dict(bits=3.5, recent=8) | ({} if budget is None else {"budget": budget})
    model = sphkv.optimize(tf.LlamaForCausalLM(config).eval().to(DEV, torch.bfloat16), **options)
    ids = torch.randint(3, 512, (3, 40), device=DEV)
    cache = sphkv.new_cache(model, max_cache_len=40 + 24)
    key = sphkv.cache_keyword(model)
    counters.clear()
    captures = count_graph_captures(monkeypatch)
    runs = {}
    for mode in ("reduce-overhead", "default"):
        cache.reset()
        with torch.no_grad():
            runs[mode] = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                        compile_config=tf.CompileConfig(mode=mode), **{key: cache})
        if mode == "reduce-overhead":  # graphs were recorded, and nothing was left out of them
            assert captures and counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
            assert sphkv_compile.report()["decode_step"]["cuda_graphs"] is True
            recorded = len(captures)
    assert len(captures) == recorded  # mode 'default' records none
    assert runs["reduce-overhead"].shape == (3, 64)
    assert torch.equal(runs["reduce-overhead"], runs["default"])


def test_beam_search_replays_from_cuda_graphs_and_reorders_in_place(monkeypatch):
    """Beam search on the GPU: transformers leaves its decode step uncompiled, sphkv compiles it
    (beam_decode.py) and it replays from CUDA graphs with nothing skipped, while the cache's
    rows are reordered in place between replays (every state tensor keeps its address). The
    beams equal those of the same compiled step without graphs (mode 'default'), and those of
    a run whose reorders are done on CPU copies of the store."""
    import transformers as tf
    from torch._dynamo.utils import counters

    import sphkv_compile
    import sphkv_compile.api as sphkv
    import sphkv_compile.hf_cache as hf_cache

    torch.manual_seed(random.randrange(2**31))
    config = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = sphkv.optimize(tf.LlamaForCausalLM(config).eval().to(DEV, torch.bfloat16), bits=3.5, recent=8)
    ids = torch.randint(3, 512, (2, 40), device=DEV)
    cache = sphkv.new_cache(model, max_cache_len=40 + 24)
    key = sphkv.cache_keyword(model)

    def beams(mode):
        cache.reset()
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, num_beams=3,
                                  num_return_sequences=3, compile_config=tf.CompileConfig(mode=mode),
                                  **{key: cache})

    counters.clear()
    captures = count_graph_captures(monkeypatch)
    with_graphs = beams("reduce-overhead")
    step = sphkv_compile.report()["decode_step"]
    assert step["cuda_graphs"] and "compiled by sphkv" in step["reason"], step
    assert captures and counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    addresses = [[t.data_ptr() for t in layer.state] for layer in cache.compressed_layers()]
    assert torch.equal(beams("reduce-overhead"), with_graphs)
    assert [[t.data_ptr() for t in layer.state] for layer in cache.compressed_layers()] == addresses
    assert with_graphs.shape == (6, 64)
    assert torch.equal(beams("default"), with_graphs)
    select_rows_of = hf_cache.select_rows_of

    def on_cpu_copies(stores, rows, **kw):
        gpu_states = [store.states for store in stores]
        for store in stores:
            store.states = [type(st)(*(t.cpu() for t in st.tensors())) for st in store.states]
        select_rows_of(stores, rows.cpu(), **kw)
        for store, states in zip(stores, gpu_states):
            for st, moved in zip(states, store.states):
                for t, m in zip(st.tensors(), moved.tensors()):
                    t.copy_(m)
            store.states = states

    monkeypatch.setattr(hf_cache, "select_rows_of", on_cpu_copies)
    assert torch.equal(beams("reduce-overhead"), with_graphs)


def test_prompt_lookup_on_a_static_cache_compiles_without_graphs_and_crops_in_place(monkeypatch):
    """Prompt-lookup decoding on the GPU: drafts are verified in chunks of several tokens, whose
    cache update decides on the host, so generate() compiles the steps without CUDA graphs (and
    says why; a compile config asking for graphs is refused, naming the cause). Rejected tokens
    leave the cache in place (cache_crop.drop, while codes are held), the pools keep their
    addresses, and two runs give the same tokens."""
    import transformers as tf

    import sphkv_compile
    import sphkv_compile.api as sphkv
    from sphkv_compile import cache_crop

    torch.manual_seed(random.randrange(2**31))
    config = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = sphkv.optimize(tf.LlamaForCausalLM(config).eval().to(DEV, torch.bfloat16), bits=3.5, recent=16)
    half = torch.randint(3, 512, (1, 40), device=DEV)
    ids = torch.cat([half, half[:, :30]], 1)  # repeats: prompt lookup finds drafts
    cache = sphkv.new_cache(model, max_cache_len=ids.shape[1] + 48)
    key = sphkv.cache_keyword(model)
    drops, drop = [], cache_crop.drop

    def spy(layer, n):
        coded = sum(int(st.count.sum()) for t, st in enumerate(layer.store.states)
                    if t != layer.store.tier_index("exact"))
        drops.append((n, coded))
        return drop(layer, n)

    monkeypatch.setattr(cache_crop, "drop", spy)
    addresses, runs = None, []
    for _ in range(2):
        cache.reset()
        with torch.no_grad():
            runs.append(model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                       prompt_lookup_num_tokens=4, **{key: cache}))
        step = sphkv_compile.report()["decode_step"]
        assert step["cuda_graphs"] is False and "assisted decoding" in step["reason"], step
        now = [[t.data_ptr() for t in layer.state] for layer in cache.compressed_layers()]
        assert addresses in (None, now)
        addresses = now
    assert torch.equal(runs[0], runs[1])
    assert drops and all(n > 0 and coded > 0 for n, coded in drops)
    cache.reset()
    with pytest.raises(ValueError, match="assisted decoding"), torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=4,
                       compile_config=tf.CompileConfig(mode="reduce-overhead"), **{key: cache})


@pytest.mark.parametrize("name", ["falcon", "gemma2", "gpt_bigcode", "qwen3", "gpt_oss"])
def test_zoo_generate_with_cuda_graphs_equals_generate_without(name, monkeypatch):
    """Architectures other than Llama through generate()'s CUDA graphs: Falcon (its own SDPA calls
    routed to the store), Gemma2 (sliding-window layers kept dense beside compressed ones),
    GPTBigCode (multi-query), Qwen3 (q/k norms) and gpt-oss (sink logits); bf16, default bits,
    left-padded prompts."""
    import sphkv_compile.api as sphkv
    from tests import test_zoo as zoo

    seed = zoo.SEED_ORDER.index(name)
    model = sphkv.optimize(zoo.build(zoo.ZOO[name], seed).to(DEV, torch.bfloat16), **zoo.DEFAULT_BITS)
    ids, mask = (t.to(DEV) for t in zoo.prompts(seed))
    assert sphkv.graph_blocker(model) is None, sphkv.graph_blocker(model)
    cache = sphkv.new_cache(model, max_cache_len=zoo.PROMPT + zoo.NEW)
    runs, _ = greedy_with_and_without_graphs(model, ids, mask, cache, monkeypatch)
    assert torch.equal(runs["reduce-overhead"], runs["default"]), name


@pytest.mark.parametrize("head_dim", [80, 96])
def test_odd_head_dims_are_padded_onto_the_kernels_under_cuda_graphs(head_dim, monkeypatch):
    """Head dims the kernels cannot take (Phi-2's 80, Phi-3's 96) are stored zero-padded to 128 by
    default on CUDA (head_pad.py): the kernels serve them, generate() replays CUDA graphs, the
    tokens equal generate() without graphs."""
    import transformers as tf

    import sphkv_compile.api as sphkv
    from tests import test_zoo as zoo

    torch.manual_seed(head_dim)
    config = tf.LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=4 * head_dim, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, pad_token_id=0)
    model = sphkv.optimize(tf.LlamaForCausalLM(config).eval().to(DEV, torch.bfloat16), **zoo.DEFAULT_BITS)
    assert sphkv.graph_blocker(model) is None, sphkv.graph_blocker(model)
    ids, mask = (t.to(DEV) for t in zoo.prompts(head_dim))
    cache = sphkv.new_cache(model, max_cache_len=zoo.PROMPT + zoo.NEW)
    runs, graphed_step = greedy_with_and_without_graphs(model, ids, mask, cache, monkeypatch)
    assert graphed_step["cuda_graphs"], graphed_step
    assert torch.equal(runs["reduce-overhead"], runs["default"])
    layer = cache.layers[0]
    assert (layer.head_dim, layer.store.head_dim) == (head_dim, 128)


def test_rdr_generate_with_cuda_graphs_equals_generate_without(monkeypatch):
    """Policy 'rdr' through generate()'s CUDA graphs: the replayed decode step appends on the
    device and the re-budgets run between steps (rdr/node.py); same greedy tokens as without
    graphs, graphs recorded with nothing skipped, re-budgets during decoding, no token lost."""
    import transformers as tf
    from torch._dynamo.utils import counters

    import sphkv_compile.api as sphkv
    from sphkv_compile.rdr import meter as budget_meter

    torch.manual_seed(random.randrange(2**31))
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = sphkv.optimize(tf.LlamaForCausalLM(config).eval().to(DEV, torch.bfloat16), policy="rdr", budget=0.25,
                           sink=2, recent=8, rebudget_every=8)
    ids = torch.randint(3, 512, (2, 200), device=DEV)
    cache = sphkv.new_cache(model, max_cache_len=200 + 48)
    key = sphkv.cache_keyword(model)
    counters.clear()
    captures = count_graph_captures(monkeypatch)
    runs, rebudgets = {}, {}
    for mode in ("reduce-overhead", "default"):
        cache.reset()
        with torch.no_grad():
            runs[mode] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                        min_new_tokens=48, do_sample=False, pad_token_id=0,
                                        compile_config=tf.CompileConfig(mode=mode), **{key: cache})
        meters = [budget_meter.read(layer.meter) for layer in cache.compressed_layers()]
        assert all(m["lost_tokens"] == 0 and m["max_excess"] <= 0 for m in meters), meters
        rebudgets[mode] = [m["rebudgets"] for m in meters]
        if mode == "reduce-overhead":
            assert captures and counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert min(rebudgets["reduce-overhead"]) >= 48 // 8 - 1, rebudgets
    assert rebudgets["reduce-overhead"] == rebudgets["default"]
    assert torch.equal(runs["reduce-overhead"], runs["default"])


def test_page_copier_matches_the_torch_copies_on_gpu(monkeypatch):
    """kernels.page_copy (beam search's page copies of every layer in a few launches; registered
    for CUDA once this passes: page_copy.ON_CUDA) against the per-pool torch copies, on GPU stores
    where beams swap and one is duplicated."""
    from sphkv_compile import store as store_mod
    from sphkv_compile.kernels import page_copy
    from sphkv_compile.store import LayerStore, select_rows_of

    def filled():
        out = []
        for layer in range(3):
            gen = torch.Generator(device=DEV).manual_seed(layer)
            s = LayerStore(4, 2, 64, (DEFAULT_TIERS[0], TierSpec("mid", 3.0, "polar", 3.0)), kv_dtype=KV_DTYPE,
                           page_size=16, device=DEV)
            s.update(torch.randn(4, 2, 300, 64, generator=gen, device=DEV), torch.randn(4, 2, 300, 64, generator=gen,
                     device=DEV), torch.ones(4, 300, dtype=torch.bool, device=DEV),
                     torch.rand(4, 2, 300, generator=gen, device=DEV), sink=2, recent=5, target="mid")
            out.append(s)
        return out

    rows = torch.tensor([1, 0, 0, 3], device=DEV)
    with_kernel, with_torch = filled(), filled()
    monkeypatch.setitem(store_mod._DEVICE_PAGE_COPIERS, "cuda", page_copy.copy_pages)
    select_rows_of(with_kernel, rows)
    monkeypatch.delitem(store_mod._DEVICE_PAGE_COPIERS, "cuda")
    select_rows_of(with_torch, rows)
    for a_store, b_store in zip(with_kernel, with_torch):
        for a, b in zip(a_store.states, b_store.states):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
            assert a.count.sum() > 0


@pytest.mark.parametrize("padded", [False, True])
def test_rdr_eager_decode_token_appends_on_the_device_like_append_records(padded, monkeypatch):
    """An eager RDR decode step that fits its budget appends the token with the device-side append
    (no read back): the same tokens, records and utilities per slot as append_records, and the
    same count, with a padded row skipped."""
    import copy

    from sphkv_compile.kernels import cuda_ops
    from sphkv_compile.rdr import update as rdr_update
    from sphkv_compile.store import LayerStore

    torch.manual_seed(random.randrange(2**31))
    B, H, d = 3, 2, 64
    store = LayerStore(B, H, d, DEFAULT_TIERS, kv_dtype=torch.bfloat16, page_size=16, seed=0, device=DEV)
    for t in range(len(DEFAULT_TIERS)):
        store.grow_tier(t, 64, 8)
    kw = dict(seed=0, kv_dtype=torch.bfloat16, sink=2, recent=8, budget_bytes=10**9, rebudget_every=8)

    def chunk(n):
        return (torch.randn(B, H, n, d, device=DEV, dtype=torch.bfloat16) * 3,
                torch.randn(B, H, n, d, device=DEV, dtype=torch.bfloat16), torch.rand(B, H, n, device=DEV))

    k, v, u = chunk(21)
    assert not rdr_update.rdr_update(store.states, list(DEFAULT_TIERS), k, v, None, u, **kw)
    k, v, u = chunk(1)
    valid = torch.tensor([[True], [False], [True]], device=DEV) if padded else None
    got, want = store.states, copy.deepcopy(store.states)
    cuda_ops.register()
    device_appends, lost = [], torch.zeros(1, dtype=torch.int64, device=DEV)
    real = rdr_update.append_decode_token
    monkeypatch.setattr(rdr_update, "append_decode_token", lambda *a, **kws: device_appends.append(1) or real(*a, **kws))
    assert not rdr_update.rdr_update(got, list(DEFAULT_TIERS), k, v, valid, u, lost=lost, **kw)
    assert device_appends == [1] and lost.item() == 0
    monkeypatch.setattr(rdr_update, "DEVICE_APPEND", False)
    assert not rdr_update.rdr_update(want, list(DEFAULT_TIERS), k, v, valid, u, lost=lost, **kw)
    assert device_appends == [1]
    for g, w in zip(got, want):
        assert torch.equal(g.count, w.count)
        for a, b in zip(gather_tokens(g), gather_tokens(w)):
            assert torch.equal(a, b)
    assert got[0].count.tolist() == ([[22, 22], [21, 21], [22, 22]] if padded else [[22] * H] * B)
