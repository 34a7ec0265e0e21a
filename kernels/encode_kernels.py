"""Fused encode: block-Hadamard preconditioning (a [D, D] matmul in registers), the recursive
polar transform, Lloyd-Max quantization and split-width packing of K and V records.

Angles are never formed: a code is the number of decision thresholds t the angle exceeds,
and atan2(b, a) > t is tested as b·cos t - a·sin t > 0 (a, b >= 0, or theta reduced to
[0, pi) by a half turn for level 1), by binary search over the sorted thresholds.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codes import encode_radius, pack_field, search_thresholds


@triton.jit
def _unit_and_radius_code(y, STEP: tl.constexpr, ROUND_OFFSET: tl.constexpr):
    """y [T, D] -> (y scaled by its peak, zero where not finite or zero; radius codes [T])."""
    peak = tl.max(tl.abs(y), 1)
    finite = tl.sum(tl.where(tl.abs(y) < float("inf"), 0, 1), 1) == 0  # NaN fails the test too
    ok = finite & (peak > 0)
    ys = tl.where(ok[:, None], y / tl.where(ok, peak, 1.0)[:, None], 0.0)
    norm = tl.sqrt(tl.sum(ys * ys, 1))
    log2_r = tl.log2(tl.where(ok, peak, 1.0)) + tl.log2(tl.where(ok, norm, 1.0))
    return ys, encode_radius(log2_r, finite & (peak == 0), finite, STEP, ROUND_OFFSET)


@triton.jit
def encode_polar_tile(y, comps_ptr, thr_ptr, D: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr,
                      COUNTS: tl.constexpr, MAXC: tl.constexpr, WIDTHS: tl.constexpr, TSIZE: tl.constexpr,
                      WPAD: tl.constexpr, STEP: tl.constexpr, ROUND_OFFSET: tl.constexpr):
    """Rotated vectors [T, D] -> record words [T, WPAD] (int32)."""
    T: tl.constexpr = y.shape[0]
    P: tl.constexpr = D // 2
    ys, rcode = _unit_and_radius_code(y, STEP, ROUND_OFFSET)
    words = tl.zeros((T, WPAD), tl.int32)
    words = pack_field(words, rcode[:, None], comps_ptr, 0, 1, COUNTS, MAXC, WIDTHS, WPAD)
    a, b = tl.split(tl.reshape(ys, (T, P, 2)))
    # level 1: theta in [pi, 2pi) (lower half-plane, and the negative x axis) adds L/2
    B1: tl.constexpr = BITS & 15
    half = (b < 0) | ((b == 0) & (a < 0))
    ah = tl.where(half, -a, a)
    bh = tl.where(half, -b, b)
    code = search_thresholds(ah, bh, thr_ptr, 0, B1 - 1, TSIZE) + tl.where(half, 1 << (B1 - 1), 0)
    words = pack_field(words, code, comps_ptr, 1, P, COUNTS, MAXC, WIDTHS, WPAD)
    node = tl.sqrt(a * a + b * b)
    for f in tl.static_range(2, LEVELS + 1):
        left, right = tl.split(tl.reshape(node, (T, D >> f, 2)))
        code = search_thresholds(left, right, thr_ptr, f - 1, (BITS >> (4 * (f - 1))) & 15, TSIZE)
        words = pack_field(words, code, comps_ptr, f, D >> f, COUNTS, MAXC, WIDTHS, WPAD)
        node = tl.sqrt(left * left + right * right)
    return words


@triton.jit
def encode_scalar_tile(y, comps_ptr, thr_ptr, D: tl.constexpr, BITS: tl.constexpr, COUNTS: tl.constexpr,
                       MAXC: tl.constexpr, WIDTHS: tl.constexpr, WPAD: tl.constexpr, STEP: tl.constexpr,
                       ROUND_OFFSET: tl.constexpr):
    """Rotated vectors [T, D] -> rotated-scalar record words [T, WPAD]."""
    T: tl.constexpr = y.shape[0]
    ys, rcode = _unit_and_radius_code(y, STEP, ROUND_OFFSET)
    norm = tl.sqrt(tl.sum(ys * ys, 1))
    u = ys / tl.where(norm > 0, norm, 1.0)[:, None] * tl.sqrt(D * 1.0)
    code = tl.zeros((T, D), tl.int32)
    for s in tl.static_range(BITS - 1, -1, -1):
        cand = code + (1 << s)
        code = tl.where(u > tl.load(thr_ptr + cand - 1), cand, code)
    words = tl.zeros((T, WPAD), tl.int32)
    words = pack_field(words, rcode[:, None], comps_ptr, 0, 1, COUNTS, MAXC, WIDTHS, WPAD)
    return pack_field(words, code, comps_ptr, 1, D, COUNTS, MAXC, WIDTHS, WPAD)


@triton.jit
def _rotate(x, fwd_ptr, scale, d, D: tl.constexpr, SIGNS: tl.constexpr, EMULATE_BF16_DOT: tl.constexpr):
    """x [T, D] @ forward rotation -> float32 [T, D]."""
    fwd = tl.load(fwd_ptr + d[:, None] * D + d[None, :])
    if SIGNS:  # exact 16-bit products, float32 sums: float32 accuracy from one MMA
        if EMULATE_BF16_DOT:  # the interpreter's dot mishandles bf16 operands; the same exact products in float32
            y = tl.dot(x.to(tl.float32), fwd.to(tl.float32), input_precision="ieee") * scale
        else:
            y = tl.dot(x, fwd, out_dtype=tl.float32) * scale
    else:
        y = tl.dot(x.to(tl.float32), fwd, input_precision="tf32x3")
    return y


@triton.jit
def _encode_keys(k_ptr, k_row, skn, tok, tmask, d, row, out_ptr, kfwd_ptr, kscale, kcomps_ptr, kthr_ptr,
                 D: tl.constexpr, KW: tl.constexpr, KWPAD: tl.constexpr, K_LEVELS: tl.constexpr, K_BITS: tl.constexpr,
                 K_COUNTS: tl.constexpr, K_MAXC: tl.constexpr, K_WIDTHS: tl.constexpr, K_TSIZE: tl.constexpr,
                 STEP: tl.constexpr, ROUND_OFFSET: tl.constexpr, SIGNS: tl.constexpr, EMULATE_BF16_DOT: tl.constexpr):
    """A tile of keys -> the first KW words of their records."""
    x = tl.load(k_ptr + k_row + tok[:, None] * skn + d[None, :], mask=tmask[:, None], other=0.0)
    y = _rotate(x, kfwd_ptr, kscale, d, D, SIGNS, EMULATE_BF16_DOT)
    words = encode_polar_tile(y, kcomps_ptr, kthr_ptr, D, K_LEVELS, K_BITS, K_COUNTS, K_MAXC, K_WIDTHS, K_TSIZE, KWPAD,
                              STEP, ROUND_OFFSET)
    wk = tl.arange(0, KWPAD)
    tl.store(out_ptr + row[:, None] + wk[None, :], words, mask=tmask[:, None] & (wk < KW)[None, :])


@triton.jit
def _encode_values(v_ptr, v_row, svn, tok, tmask, d, row, out_ptr, vfwd_ptr, vscale, vcomps_ptr, vthr_ptr,
                   D: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr, VWPAD: tl.constexpr, VALUE_SCALAR: tl.constexpr,
                   V_LEVELS: tl.constexpr, V_BITS: tl.constexpr, V_COUNTS: tl.constexpr, V_MAXC: tl.constexpr,
                   V_WIDTHS: tl.constexpr, V_TSIZE: tl.constexpr, STEP: tl.constexpr, ROUND_OFFSET: tl.constexpr,
                   SIGNS: tl.constexpr, EMULATE_BF16_DOT: tl.constexpr):
    """A tile of values -> the VW words after the key's KW in their records."""
    x = tl.load(v_ptr + v_row + tok[:, None] * svn + d[None, :], mask=tmask[:, None], other=0.0)
    y = _rotate(x, vfwd_ptr, vscale, d, D, SIGNS, EMULATE_BF16_DOT)
    if VALUE_SCALAR:
        words = encode_scalar_tile(y, vcomps_ptr, vthr_ptr, D, V_BITS, V_COUNTS, V_MAXC, V_WIDTHS, VWPAD, STEP,
                                   ROUND_OFFSET)
    else:
        words = encode_polar_tile(y, vcomps_ptr, vthr_ptr, D, V_LEVELS, V_BITS, V_COUNTS, V_MAXC, V_WIDTHS, V_TSIZE,
                                  VWPAD, STEP, ROUND_OFFSET)
    wv = tl.arange(0, VWPAD)
    tl.store(out_ptr + row[:, None] + KW + wv[None, :], words, mask=tmask[:, None] & (wv < VW)[None, :])


@triton.jit
def encode_kv_kernel(
        k_ptr, v_ptr, out_ptr, kfwd_ptr, vfwd_ptr, kscale, vscale, kcomps_ptr, kthr_ptr, vcomps_ptr, vthr_ptr,
        N, Hkv, skb, skh, skn, svb, svh, svn, pages_ptr, page_col, slot_in_page, max_pages,
        D: tl.constexpr, BLOCK_T: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr, KWPAD: tl.constexpr,
        VWPAD: tl.constexpr, VALUE_SCALAR: tl.constexpr,
        K_LEVELS: tl.constexpr, K_BITS: tl.constexpr, K_COUNTS: tl.constexpr, K_MAXC: tl.constexpr,
        K_WIDTHS: tl.constexpr, K_TSIZE: tl.constexpr, V_LEVELS: tl.constexpr, V_BITS: tl.constexpr,
        V_COUNTS: tl.constexpr, V_MAXC: tl.constexpr, V_WIDTHS: tl.constexpr, V_TSIZE: tl.constexpr, STEP: tl.constexpr, ROUND_OFFSET: tl.constexpr,
        SIGNS: tl.constexpr, EMULATE_BF16_DOT: tl.constexpr,
        FROM_EXACT: tl.constexpr, E_PS: tl.constexpr, HALF_E: tl.constexpr, SPLIT_KV: tl.constexpr):
    """k, v [B, Hkv, N, D] -> records out [B, Hkv, N, KW + VW] (int32). SIGNS: the rotations
    are 16-bit sign matrices (scale kscale / vscale) applied to 16-bit inputs with one MMA;
    else float32 matrices applied as tf32x3.

    FROM_EXACT: k_ptr = v_ptr is an exact tier's pool viewed as its element dtype (records of
    HALF_E key then HALF_E value elements, E_PS per page), and each (b, h) row encodes one token
    (N = 1): the one at slot slot_in_page of page column page_col of its page table
    (pages_ptr [B·Hkv, max_pages]; an unused entry reads page 0). A decode step's graduating
    token is read in place, with no gather launched before.

    SPLIT_KV: grid axis 2 has two programs per tile, one for the keys and one for the values,
    so a latency-bound launch (a decode step's one token per row) runs half the chain per
    program; else one program encodes both."""
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    d = tl.arange(0, D)
    if FROM_EXACT:
        page = tl.maximum(tl.load(pages_ptr + pid_bh * max_pages + page_col), 0).to(tl.int64)
        k_row = (page * E_PS + slot_in_page) * (2 * HALF_E)
        v_row = k_row + HALF_E
    else:
        k_row = b * skb + h * skh
        v_row = b * svb + h * svh
    row = (pid_bh * N + tok).to(tl.int64) * (KW + VW)
    do_keys = True
    do_values = True
    if SPLIT_KV:
        do_keys = tl.program_id(2) == 0
        do_values = tl.program_id(2) == 1
    if do_keys:
        _encode_keys(k_ptr, k_row, skn, tok, tmask, d, row, out_ptr, kfwd_ptr, kscale, kcomps_ptr, kthr_ptr,
                     D, KW, KWPAD, K_LEVELS, K_BITS, K_COUNTS, K_MAXC, K_WIDTHS, K_TSIZE, STEP, ROUND_OFFSET, SIGNS,
                     EMULATE_BF16_DOT)
    if do_values:
        _encode_values(v_ptr, v_row, svn, tok, tmask, d, row, out_ptr, vfwd_ptr, vscale, vcomps_ptr, vthr_ptr,
                       D, KW, VW, VWPAD, VALUE_SCALAR, V_LEVELS, V_BITS, V_COUNTS, V_MAXC, V_WIDTHS, V_TSIZE, STEP,
                       ROUND_OFFSET, SIGNS, EMULATE_BF16_DOT)
