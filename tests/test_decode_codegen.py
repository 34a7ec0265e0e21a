"""The generated decoders' code extraction (kernels.decode_codegen), checked in Python: the
generated expressions are plain shifts and masks, so they evaluate on Python ints as the kernel
evaluates them on uint32 words."""
from __future__ import annotations

import random

import pytest
import torch

from sphkv_compile.kernels.decode_codegen import _extract, _Writer, code_parts
from sphkv_compile.kernels.layout import tier_info
from sphkv_compile.tiers import DEFAULT_TIERS, TierSpec

TIERS = DEFAULT_TIERS[1:] + (TierSpec("scalar3", 3.5, "scalar", 3),)


def _evaluate(parts, words: list[int], scale_bits: int) -> int:
    w = _Writer(0, len(words), len(words))
    w.loaded = set(range(len(words)))  # every word is a variable already: no load lines
    name = _extract(w, parts, "x", scale_bits)
    env = {f"w{j}": word for j, word in enumerate(words)}
    exec(w.lines[-1].strip(), {}, env)
    return env[name] & 0xFFFFFFFF


@pytest.mark.parametrize("spec", TIERS, ids=lambda s: s.name)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_scaled_extraction_is_the_code_times_the_entry_size(spec, d):
    """The shared-table lookups read each code pre-multiplied by the entry size (8 bytes for a
    (cos, sin) pair, 4 for a scalar centroid) straight from the record's words: for every field
    of every record layout, on random words, it must be the plain code times that size."""
    info = tier_info(spec, d, 0, torch.bfloat16)
    rng = random.Random(f"{spec.name}-{d}")
    for tables in (info.key, info.value):
        layout = tables.fields.layout
        for key, parts in code_parts(layout).items():
            width = sum(p[2] for p in parts)
            for _ in range(20):
                words = [rng.getrandbits(32) for _ in range(layout.words)]
                code = _evaluate(parts, words, 0)
                assert code < 1 << width, (key, parts)
                for scale_bits in (2, 3):
                    assert _evaluate(parts, words, scale_bits) == code << scale_bits, (key, parts, scale_bits)


@pytest.mark.parametrize("tier,d,parts,bf16,block_t,packed,staged", [
    ("mid", 128, 2, True, 128, True, True),     # the default: 24 KB of tiles + 0.9 KB of float16 pairs
    ("mid", 128, 1, True, 128, False, True),    # whole tiles: 40 KB + 1.8 KB (run on the GPU, session 12)
    ("scalar3", 64, 2, True, 128, True, True),
    ("high", 128, 2, True, 128, True, False),   # 7 KB of float16 pairs (14 KB of float32)
    ("mid", 256, 2, True, 128, True, False),    # past shared_tables_max_d
    ("mid", 128, 2, False, 128, False, False),  # float32 tiles: Triton's own 48 KB leaves no room
    ("mid", 128, 2, True, 256, False, False),   # 44 KB of tiles + 1.8 KB: too close to 48 KB
    ("mid", 128, 2, True, 256, True, True),     # ... but 0.9 KB of float16 pairs fit
    ("mid", 128, 4, True, 256, False, True),    # quarters of 256-token tiles: 28 KB
])
def test_tables_are_staged_only_where_they_fit(tier, d, parts, bf16, block_t, packed, staged, monkeypatch):
    """A launch without opt-in gets 48 KB of shared memory, static (the staged tables) and
    Triton's dynamic allocation together: the tables go to shared memory only where both fit."""
    from sphkv_compile.kernels import attend

    monkeypatch.setitem(attend.CODED, "packed", packed)
    monkeypatch.setitem(attend.CODED, "bf16_tiles", bf16)
    monkeypatch.setitem(attend.CODED, "tokens_per_thread", block_t // (32 * attend.CODED["warps"]))
    assert attend._coded_block_t(d) == block_t
    spec = next(s for s in TIERS if s.name == tier)
    info = tier_info(spec, d, 0, torch.bfloat16)
    assert attend._stage_tables(info, d, parts, 16) == staged


@pytest.mark.parametrize("spec", DEFAULT_TIERS[1:], ids=lambda s: s.name)
def test_float16_pair_tables_hold_each_centroids_cos_and_sin(spec):
    """The packed decoders' tables (PolarTables.half_pairs): entry [level, code] is the float16
    (cos, sin) of that centroid, cos in the low half, each within float16 rounding (2^-12 below
    1) of the float32 table; the constants the generator writes for 0- and 1-bit levels are the
    same pairs."""
    from sphkv_compile.kernels.decode_codegen import _half_pair_constant

    info = tier_info(spec, 128, 0, torch.bfloat16)
    for tables in (info.key, info.value):
        if not hasattr(tables, "half_pairs"):
            continue  # a scalar value codec
        pairs = tables.half_pairs
        assert pairs.dtype == torch.int32 and pairs.shape == (tables.levels, tables.table_size)
        halves = pairs.contiguous().view(torch.float16).view(tables.levels, tables.table_size, 2).double()
        trig = tables.trig.double()
        torch.testing.assert_close(halves[..., 0], trig[:, 0], rtol=0, atol=2.0 ** -12)
        torch.testing.assert_close(halves[..., 1], trig[:, 1], rtol=0, atol=2.0 ** -12)
        for lev in range(tables.levels):
            for code in range(2):
                cos, sin = float(tables.trig[lev, 0, code]), float(tables.trig[lev, 1, code])
                assert _half_pair_constant(cos, sin) == int(pairs[lev, code])


def test_packed_decoders_need_staged_tables():
    """The packed decoders read their float16 pairs through shared-memory PTX only: asking for one
    without a staged table is refused, not silently decoded from the float32 table."""
    from sphkv_compile.kernels.decode_codegen import decoder

    info = tier_info(DEFAULT_TIERS[1], 128, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="staged in shared memory"):
        decoder(info.key, 0, info.key_words + info.value_words, None, 0, packed=True)
