"""Triton helpers that read and write spherical / scalar code records in tiles.

A tile is BLOCK_T tokens; `base` [BLOCK_T] is each token's first word in the pool. A
split-width component of n elements of w bits (both powers of two, so n·w is a power of two)
occupies n·w contiguous bits starting at a multiple of w. It is read as whole words: the
words it spans are loaded as a [T, NW] tile (and the next word), shifted into alignment (a
funnel shift by the component's bit offset), and every word is split into its 32/w elements
with broadcast shifts; a reshape gives [T, n]. No per-element addresses or loads.

Decoding keys/values (the angular recurrence) runs top-down as tiles: level l's node radii
[T, n] become level l-1's [T, 2n] by interleaving parent·cos(psi) and parent·sin(psi), which
is the tree's child order (2j, 2j+1; checked on the host in layout.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _component(pool_ptr, base, valid, comp_ptr, N: tl.constexpr, W: tl.constexpr, LIMIT: tl.constexpr):
    """One split-width component (N elements of W bits) -> its bits, int32 [BLOCK_T, N]."""
    PER_WORD: tl.constexpr = 32 // W if N * W >= 32 else N
    NW: tl.constexpr = N * W // 32 if N * W >= 32 else 1
    off = tl.load(comp_ptr)
    first = off >> 5
    r = off & 31
    j = first + tl.arange(0, NW)
    lo = tl.load(pool_ptr + base[:, None] + j[None, :], mask=valid[:, None], other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(pool_ptr + base[:, None] + j[None, :] + 1, mask=valid[:, None] & ((j + 1) < LIMIT)[None, :],
                 other=0).to(tl.uint32, bitcast=True)
    word = tl.where(r == 0, lo, (lo >> r) | (hi << ((32 - r) & 31)))
    s = (tl.arange(0, PER_WORD) * W).to(tl.uint32)
    parts = (word[:, :, None] >> s[None, None, :]) & ((1 << W) - 1)
    return tl.reshape(parts, (base.shape[0], N)).to(tl.int32)


@triton.jit
def extract_field(pool_ptr, base, valid, comps_ptr, F: tl.constexpr, N: tl.constexpr, COUNTS: tl.constexpr,
                  MAXC: tl.constexpr, WIDTHS: tl.constexpr, LIMIT: tl.constexpr):
    """Codes of field F (N elements) for a tile of records -> int32 [BLOCK_T, N]. LIMIT: words
    readable from `base` (the funnel shift's extra word never crosses it)."""
    code = tl.zeros((base.shape[0], N), tl.int32)
    for c in tl.static_range((COUNTS >> (4 * F)) & 15):
        part = _component(pool_ptr, base, valid, comps_ptr + (F * MAXC + c) * 3, N,
                          1 << ((WIDTHS >> (3 * (F * MAXC + c))) & 7), LIMIT)
        code = code | (part << tl.load(comps_ptr + (F * MAXC + c) * 3 + 2))
    return code


@triton.jit
def decode_radius(code, STEP: tl.constexpr, LOG2_MIN: tl.constexpr):
    """16-bit log-radius code -> float32 (0 -> 0, all ones -> NaN)."""
    r = tl.exp2(LOG2_MIN + (code - 1).to(tl.float32) * STEP)
    r = tl.where(code == 0, 0.0, r)
    return tl.where(code == 65535, float("nan"), r)


@triton.jit
def decode_polar_tile(pool_ptr, base, valid, comps_ptr, trig_ptr, D: tl.constexpr, LEVELS: tl.constexpr,
                      COUNTS: tl.constexpr, MAXC: tl.constexpr, WIDTHS: tl.constexpr, LIMIT: tl.constexpr,
                      TSIZE: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr):
    """Records -> rotated-domain vectors [BLOCK_T, D] (float32), kept in registers."""
    rcode = extract_field(pool_ptr, base, valid, comps_ptr, 0, 1, COUNTS, MAXC, WIDTHS, LIMIT)
    node = decode_radius(rcode, STEP, LOG2_MIN)  # [T, 1]
    for f in tl.static_range(LEVELS, 0, -1):
        code = extract_field(pool_ptr, base, valid, comps_ptr, f, D >> f, COUNTS, MAXC, WIDTHS, LIMIT)
        cos = tl.load(trig_ptr + ((f - 1) * 2) * TSIZE + code)
        sin = tl.load(trig_ptr + ((f - 1) * 2 + 1) * TSIZE + code)
        node = tl.interleave(node * cos, node * sin)
    return node


@triton.jit
def decode_scalar_tile(pool_ptr, base, valid, comps_ptr, cent_ptr, D: tl.constexpr, COUNTS: tl.constexpr,
                       MAXC: tl.constexpr, WIDTHS: tl.constexpr, LIMIT: tl.constexpr, STEP: tl.constexpr,
                       LOG2_MIN: tl.constexpr):
    """Rotated-scalar records -> rotated-domain vectors [BLOCK_T, D]."""
    rcode = extract_field(pool_ptr, base, valid, comps_ptr, 0, 1, COUNTS, MAXC, WIDTHS, LIMIT)
    r = decode_radius(rcode, STEP, LOG2_MIN) * (1.0 / tl.sqrt(D * 1.0))
    code = extract_field(pool_ptr, base, valid, comps_ptr, 1, D, COUNTS, MAXC, WIDTHS, LIMIT)
    return tl.load(cent_ptr + code) * r


# ---- encode ------------------------------------------------------------------------------
@triton.jit
def search_thresholds(a, b, thr_ptr, LEVEL: tl.constexpr, STEPS: tl.constexpr, TSIZE: tl.constexpr):
    """For angles atan2(b, a) with a, b >= 0 (or theta reduced to [0, pi)): the number of the
    level's sorted thresholds t with angle > t, by binary search. angle > t is tested as
    b·cos t - a·sin t > 0, which needs no atan2."""
    code = tl.zeros(a.shape, tl.int32)
    for s in tl.static_range(STEPS - 1, -1, -1):
        cand = code + (1 << s)
        ct = tl.load(thr_ptr + (LEVEL * 2) * TSIZE + cand - 1)
        st = tl.load(thr_ptr + (LEVEL * 2 + 1) * TSIZE + cand - 1)
        code = tl.where(b * ct - a * st > 0, cand, code)
    return code


@triton.jit
def encode_radius(log2_r, zero, finite, STEP: tl.constexpr, ROUND_OFFSET: tl.constexpr):
    """log2 of the norm -> 16-bit log-radius code (int32): zero -> 0, non-finite -> all ones.

    round((log2 r - LOG2_MIN) / STEP) is computed as floor(log2 r / STEP) + ROUND_OFFSET with
    the integer ROUND_OFFSET = -LOG2_MIN / STEP + 1/2: float32 then only carries log2 r / STEP
    (a few hundred) instead of a position near 32k, whose ulp would be 1/256 of a step."""
    x = tl.minimum(tl.maximum(log2_r / STEP, -65536.0), 65536.0)
    pos = tl.floor(x).to(tl.int32) + ROUND_OFFSET
    code = tl.minimum(tl.maximum(pos, 0), 65533) + 1
    code = tl.where(zero, 0, code)
    return tl.where(finite, code, 65535)


@triton.jit
def _pack_component(words, code, comp_ptr, N: tl.constexpr, W: tl.constexpr, WPAD: tl.constexpr):
    """OR one split-width component of codes [T, N] into the record words [T, WPAD]: the
    inverse of _component. Elements are packed into aligned words [T, NW] with broadcast
    shifts, then funnel-shifted to the component's bit offset; only the NW (and NW + 1) words
    it touches are matched against the record's word index."""
    PER_WORD: tl.constexpr = 32 // W if N * W >= 32 else N
    NW: tl.constexpr = N * W // 32 if N * W >= 32 else 1
    T: tl.constexpr = code.shape[0]
    off = tl.load(comp_ptr)
    vshift = tl.load(comp_ptr + 2)
    first = off >> 5
    r = (off & 31).to(tl.uint32)
    bits = ((code >> vshift) & ((1 << W) - 1)).to(tl.uint32)
    s = (tl.arange(0, PER_WORD) * W).to(tl.uint32)
    aligned = tl.sum(tl.reshape(bits, (T, NW, PER_WORD)) << s[None, None, :], 2)  # disjoint bits: sum = OR
    lo = aligned << r
    hi = tl.where(r == 0, 0, aligned >> ((32 - r) & 31))
    j = first + tl.arange(0, NW)
    widx = tl.arange(0, WPAD)
    add = tl.sum(tl.where((j[:, None] == widx[None, :])[None, :, :], lo[:, :, None], 0), 1)
    add += tl.sum(tl.where(((j + 1)[:, None] == widx[None, :])[None, :, :], hi[:, :, None], 0), 1)
    return words | add.to(tl.int32, bitcast=True)


@triton.jit
def pack_field(words, code, comps_ptr, F: tl.constexpr, N: tl.constexpr, COUNTS: tl.constexpr,
               MAXC: tl.constexpr, WIDTHS: tl.constexpr, WPAD: tl.constexpr):
    """OR field F's codes [T, N] into the record words [T, WPAD] (int32)."""
    for c in tl.static_range((COUNTS >> (4 * F)) & 15):
        words = _pack_component(words, code, comps_ptr + (F * MAXC + c) * 3, N,
                                1 << ((WIDTHS >> (3 * (F * MAXC + c))) & 7), WPAD)
    return words
