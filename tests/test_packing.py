"""Split-width packing: exact round trip, dense size, no element straddles a word."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

from sphkv_compile.packing import RecordLayout, split_widths

fields = st.lists(st.tuples(st.integers(0, 70), st.integers(0, 16)), min_size=1, max_size=8)


@given(fields=fields, seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5))
def test_round_trip_and_density(fields, seed, rows):
    layout = RecordLayout(tuple(fields))
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, 1 << b, (rows, n), generator=g) if b else torch.zeros(rows, n, dtype=torch.int64)
             for n, b in fields]
    words = layout.pack(codes)
    assert words.dtype == torch.int32 and words.shape == (rows, layout.words)
    assert layout.words == max(1, -(-sum(n * b for n, b in fields) // 32))
    for got, want in zip(layout.unpack(words), codes):
        assert torch.equal(got, want)


@given(fields=fields)
def test_no_element_straddles_a_word(fields):
    for c in RecordLayout(tuple(fields)).components:
        assert c.offset % c.width == 0
        start = c.positions()
        assert torch.equal(start // 32, (start + c.width - 1) // 32)


@given(bits=st.integers(1, 32))
def test_split_widths_sum_to_bits(bits):
    parts = split_widths(bits)
    assert sum(w for w, _ in parts) == bits
    assert sum(((1 << w) - 1) << s for w, s in parts) == (1 << bits) - 1


@given(counts=st.lists(st.integers(0, 7), min_size=1, max_size=9), bits=st.lists(st.integers(0, 16), min_size=9,
                                                                                  max_size=9))
def test_power_of_two_runs_start_at_a_multiple_of_their_size(counts, bits):
    """Power-of-two fields (a polar tree over a power-of-two head dim) lay out every run at a
    multiple of its size, so any aligned 1/2^k of a run keeps the same offsets relative to its
    start (the fragment kernels decode one subtree per lane)."""
    layout = RecordLayout(tuple((1 << c, b) for c, b in zip(counts, bits)))
    assert layout.subtree_aligned
    for c in layout.components:
        size = c.count * c.width
        assert c.offset % size == 0
    assert layout.components == tuple(sorted(layout.components, key=lambda c: -c.count * c.width))
