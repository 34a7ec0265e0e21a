"""How the compressed-tier decode is split over the SMs (kernels.attend._balanced_splits)."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv_compile.kernels import attend
from sphkv_compile.kernels.attend import _balanced_splits, _block_columns, _coded_splits, _column_programs, _combine_block


def busiest_load(rows: int, sms: int, S: int) -> Fraction:
    """Rows' worth of work on the busiest SM when each row runs as S programs."""
    return Fraction(-(-rows * S // sms), S)


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 4096), sms=st.integers(1, 200), per_sm=st.integers(1, 8), most=st.integers(1, 300))
def test_no_split_count_leaves_the_busiest_sm_less_work(rows, sms, per_sm, most):
    """Optimal up to the rule's 1% slack."""
    S = _balanced_splits(rows, sms, per_sm, most)
    assert 1 <= S <= most
    least = min(busiest_load(rows, sms, other) for other in range(1, most + 1))
    assert busiest_load(rows, sms, S) <= least * Fraction(101, 100)


@pytest.mark.parametrize("rows,expected", [
    (64, 8),    # Llama-3-8B B=8: 512 programs, one wave of 4 per SM (rounded up: 9 splits, 1.09 waves)
    (128, 4),   # Llama-3-8B B=16 (rounded up: 5)
    (256, 2),   # Llama-3-8B B=32: 512 programs (rounded up: 3 splits, 768)
    (96, 11),   # SmolLM2 B=32: 1,056 programs, 8 per SM (rounded up: 6 splits, 5 per SM)
    (192, 4),   # SmolLM2 B=64 (rounded up: 3)
    (24, 22),   # SmolLM2 B=8: 528 programs already fill four per SM: unchanged
    (16, 16),   # Llama-3-8B B=2, two per SM when rows are few (rounded up: 17)
    (8, 33),    # Llama-3-8B B=1: unchanged
])
def test_split_counts_measured_on_the_h200(rows, expected, monkeypatch):
    """The launch's whole rule at 132 SMs (an H200) and 32k tokens per row; benchmarks/sweep_waves.py
    timed these shapes (docs/PERFORMANCE_HISTORY.md, session 15) at that session's launch settings: four
    programs per SM, 128-token tiles."""
    monkeypatch.setitem(attend.CODED, "programs_per_sm", 4)
    monkeypatch.setitem(attend.CODED, "tokens_per_thread", 1)
    monkeypatch.setitem(attend.CODED, "many_rows", None)
    assert _coded_splits(rows, 32768, 2 * 132, 128) == expected


@pytest.mark.parametrize("d,rows,launch,block_t,expected", [
    (128, 64, (2, 4), 128, 8),   # Llama-3-8B B=8: many rows, 2-warp programs, four per SM
    (128, 8, (4, 2), 256, 33),   # Llama-3-8B B=1: 4-warp programs, two per SM
    (128, 16, (4, 2), 256, 16),  # B=2: 16 rows x 32 splits cannot fill four per SM
    (128, 32, (2, 4), 128, 16),  # B=4: they can
    (64, 64, (4, 4), 128, 8),
    (256, 64, (4, 4), 128, 8),
])
def test_split_counts_at_the_default_settings(d, rows, launch, block_t, expected):
    """Launch shape and splits at each head dim's defaults, 132 SMs, 32k tokens per row. d=128:
    64 rows (B=8) in 2-warp programs, four per SM: 528 programs wanted give session 15's 8 splits
    (the measured test above); 8 rows (B=1) keep 4-warp programs, two per SM. Other head dims,
    one token per thread and four 4-warp programs per SM."""
    assert attend._coded_launch(2 * 132, rows, d) == launch
    assert attend._coded_block_t(d, launch[0]) == block_t
    assert _coded_splits(rows, 32768, 2 * 132, d) == expected


def test_scalar_values_keep_four_warp_programs():
    """The scalar value codec timed slower in 2-warp programs (session 22): its tiers keep the
    4-warp, two-per-SM launch at every row count."""
    assert attend._coded_launch(2 * 132, 64, 128, polar_values=False) == (4, 2)
    assert attend._coded_launch(2 * 132, 64, 128, polar_values=True) == (2, 4)


def test_among_equal_loads_the_fewest_splits_that_fill_an_sm():
    # 64 rows on 132 SMs: 2, 4, 6, 8, 16 splits all leave the busiest SM half a row; 8 is the
    # fewest that gives it four programs, so no SM idles at the end with a short tail
    assert _balanced_splits(64, 132, 4, 16) == 8
    # at most 6 splits: 2, 4 and 6 tie and none gives an SM four programs: the most, 6
    assert _balanced_splits(64, 132, 4, 6) == 6


def test_a_long_prefill_keeps_one_split():
    # 8 KV heads x 1,024 blocks of 16 query rows: two splits would leave the busiest SM 62.5
    # rows instead of 63 (0.8% less) and double the partials the combine merges
    assert _balanced_splits(8 * 1024, 132, 4, 2) == 1


@pytest.mark.parametrize("M,expected", [(1, (1, 64)), (3, (4, 16)), (4, (4, 16)), (9, (16, 4)), (16, (16, 4)),
                                        (40, (16, 4))])
def test_combine_steps_keep_the_tile_size(M, expected, monkeypatch):
    """Fewer rows than the partial kernels' 16 give the combine fewer rows and more splits per
    step, the same (row, split) pairs per step."""
    monkeypatch.setitem(attend.COMBINE, "splits", 4)
    assert _combine_block(M, 16) == expected


@pytest.mark.parametrize("programs,D,expected", [(8, 128, 4), (64, 128, 2), (66, 128, 2), (67, 128, 1), (256, 128, 1),
                                                 (8, 64, 2), (1, 16, 1)])
def test_column_programs_fill_the_sms_once(programs, D, expected):
    """Llama-3-8B at B=1 (8 KV heads) splits the combine's 128 columns 4 ways (32 programs), at
    B=8 2 ways (128 programs on 132 SMs); never past one 32-column block a program."""
    assert _column_programs(programs, D, 32 if D >= 32 else D, 132) == expected


@pytest.mark.parametrize("rows,D,expected", [(4, 128, 32), (8, 128, 16), (16, 128, 32), (1, 256, 32), (4, 256, 16),
                                             (8, 16, 16)])
def test_block_columns_bound_the_fma_tile(rows, D, expected, monkeypatch):
    monkeypatch.setitem(attend.COMBINE, "columns", 32)
    assert _block_columns(rows, D) == expected
