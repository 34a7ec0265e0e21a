"""The Gluon fragment kernel compiles for sm_90 without a GPU (Triton's bundled ptxas).

The kernel asserts that the decoded key and value leaves land in mma_v2's operand fragments
with no data movement (convert_layout(assert_trivial=True)); a decoder whose subtree numbering
missed the fragments would fail to compile here. The numbers themselves are checked on the GPU
(tests/test_kernels_gpu.py: test_fragment_kernel_*)."""
from __future__ import annotations

import pytest
import torch

from sphkv_compile.kernels import fragment_launch
from sphkv_compile.kernels.layout import tier_info
from sphkv_compile.tiers import DEFAULT_TIERS, TierSpec

if not fragment_launch.gluon_available():
    pytest.skip("this Triton has no Gluon", allow_module_level=True)


TIERS = {t.name: t for t in DEFAULT_TIERS}


# uniform (the default policy's tier), low at 128 (levels of 0 bits), high at 64 (7-bit codes),
# mid at 64 and 32
@pytest.mark.parametrize("spec,d", [(TierSpec("uniform", 3.5, "polar", 3.5), 128), (TIERS["low"], 128),
                                    (TIERS["high"], 64), (TIERS["mid"], 64), (TIERS["mid"], 32)],
                         ids=["uniform-128", "low-128", "high-64", "mid-64", "mid-32"])
@pytest.mark.parametrize("decode", [False, True], ids=["16-rows", "decode"])
def test_fragment_kernel_compiles_with_trivial_operand_conversions(spec, d, decode):
    """Both kernels: paged_fragment_kernel (16 query rows per program) and the decode kernel (8
    query columns, where p^T also goes from the accumulator to the operand layout in registers)."""
    info = tier_info(spec, d, 0, torch.bfloat16)
    kernel = fragment_launch.compile_for_target(info, d, decode=decode)
    # shared memory only for the warps' final merge (Triton 3.6 sizes it for every warp's
    # accumulator, 3.9 for less), not for decoded tiles
    rows = 8 if decode else 16
    assert kernel.metadata.shared <= fragment_launch.FRAGMENT["warps"] * rows * d * 4, kernel.metadata.shared


def test_a_tier_whose_staged_records_pass_the_static_shared_limit_is_left_to_the_triton_kernels():
    """The high tier at d=128: 48-word records, 48 KiB of staging against the 40 KiB the tables
    leave of ptxas's 48 KiB static limit."""
    from sphkv_compile.kernels.fragment_codegen import FRAGMENT_RECORD_BYTES_MAX

    info = tier_info(TIERS["high"], 128, 0, torch.bfloat16)
    words = info.key_words + info.value_words
    assert 2 * fragment_launch.FRAGMENT["warps"] * fragment_launch.FRAGMENT["tokens_per_warp"] * words * 4 \
        > FRAGMENT_RECORD_BYTES_MAX
    with pytest.raises(Exception, match="staging"):
        fragment_launch._decoders(info)


def test_permutations_put_the_subtree_index_where_the_fragments_want_it():
    from sphkv_compile.kernels.fragment_codegen import _permutation

    assert _permutation(4, 5) == (0, 1, 3, 4, 5, 6, 2, 7)  # [W, CT, quarter, b4..b0] -> (b4, b3, b2, b1, quarter, b0)
    assert _permutation(8, 4) == (0, 1, 3, 4, 5, 6, 2)  # [W, CT, octant, l3..l0] -> (l3, l2, l1, l0, octant)
    assert _permutation(4, 3) == (0, 1, 3, 4, 2, 5) and _permutation(8, 2) == (0, 1, 3, 4, 2)


def test_rocm_is_left_to_the_triton_kernels(monkeypatch):
    """torch reports ROCm devices as 'cuda'; the fragment kernel is NVIDIA PTX, so it must say no."""
    info = tier_info(TierSpec("uniform", 3.5, "polar", 3.5), 128, 0, torch.bfloat16)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm" in fragment_launch.unsupported_reason(info, 128, torch.device("cuda"), 64)


def test_a_pool_whose_record_width_is_not_the_tiers_is_left_to_the_triton_kernels():
    """The staging copies K + V words per token; a pool of another width would misplace them."""
    info = tier_info(TierSpec("uniform", 3.5, "polar", 3.5), 128, 0, torch.bfloat16)
    words = info.key_words + info.value_words
    assert "words" in fragment_launch.unsupported_reason(info, 128, torch.device("cuda"), 64, 0, words + 1)


@pytest.mark.parametrize("tokens", [64, 8])
def test_tokens_per_warp_outside_16_to_32_are_left_to_the_triton_kernels(tokens, monkeypatch):
    """One lane decodes each token's radii, so a warp takes at most 32 tokens per tile; and the
    tokens are the K of p @ v (v^T @ p^T in the decode kernel), which mma_v2 needs 16 of (at 8
    neither kernel compiles: "K >= 16")."""
    monkeypatch.setitem(fragment_launch.FRAGMENT, "tokens_per_warp", tokens)
    info = tier_info(TierSpec("uniform", 3.5, "polar", 3.5), 128, 0, torch.bfloat16)
    assert "tokens per warp" in fragment_launch.unsupported_reason(info, 128, torch.device("cuda"), 64)


@pytest.mark.parametrize("why", ["turned off", "ROCm"])
def test_the_report_says_which_decode_kernel_a_tier_runs_and_why(why, monkeypatch):
    from sphkv_compile.kernels import attend
    from sphkv_compile.report import begin_compile, report

    spec = TierSpec("uniform", 3.5, "polar", 3.5)
    info = tier_info(spec, 128, 0, torch.bfloat16)
    if why == "ROCm":
        monkeypatch.setattr(torch.version, "hip", "6.2")
    else:
        monkeypatch.setitem(fragment_launch.FRAGMENT, "enabled", False)
    words = info.key_words + info.value_words
    store = type("Store", (), {"page_size": 64, "pool": torch.zeros(4, 64, words, dtype=torch.int32)})()
    begin_compile()
    assert not attend._uses_fragments(info, spec, 128, torch.device("cuda"), store)
    entry = report()["decode_kernels"]["uniform d=128"]
    assert entry["kernel"] == "triton" and why in entry["why_not_fragment"], entry


def test_decode_steps_of_up_to_8_rows_take_the_decode_kernel(monkeypatch):
    """A decode step's G·Tq query rows per KV head: up to 8 run the decode kernel (8 query columns
    per program), more (GQA 16, chunked prefill) the 16-row kernel; FRAGMENT['decode_kernel'] off
    sends every launch to the 16-row kernel."""
    assert [fragment_launch.rows_per_program(M) for M in (1, 4, 8, 9, 16, 80)] == [8, 8, 8, 16, 16, 16]
    monkeypatch.setitem(fragment_launch.FRAGMENT, "decode_kernel", False)
    assert not fragment_launch.decode_rows(4) and fragment_launch.rows_per_program(4) == 16
