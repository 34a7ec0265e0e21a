"""Split-KV attention over tier-homogeneous pages (ADA decode and chunked prefill).

Rows: the G·Tq queries of one KV head's group (row = g·Tq + t), pre-scaled by
scale·log2(e) so softmax runs in base 2. Compressed tiers see the queries rotated by the key
codec's Hadamard transform; the exact tier and the dense chunk see them as they are.

Each program owns (batch·KV head, split, row block): it walks its share of the tier's tokens
through the page table, decodes a key tile in registers (angular recurrence shared by all rows
of the group), takes logits with tl.dot, and accumulates p·v with values decoded in the rotated
domain. Splits write (acc, max, sum) partials; combine_kernels.combine_kernel merges every
tier's splits and the chunk's, undoes the value rotation once per output row, and normalises.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codes import decode_polar_tile, decode_scalar_tile
from .dependent_launch import after_previous_kernel
from .query_kernels import prepare_query_block, scaled_query_rows


@triton.jit
def _split_range(count, pid_s, S, BLOCK_T: tl.constexpr):
    """This split's [start, end) of a row's `count` tokens, in whole tiles."""
    tiles = tl.cdiv(count, BLOCK_T)
    per = tl.cdiv(tiles, S) * BLOCK_T
    start = pid_s * per
    return start, tl.minimum(count, start + per)


@triton.jit
def _tile_kv(pool_ptr, base, valid, kcomps_ptr, ktab_ptr, vcomps_ptr, vtab_ptr, WT: tl.constexpr, VOFF: tl.constexpr,
             D: tl.constexpr, EXACT: tl.constexpr, VALUE_SCALAR: tl.constexpr, WANT_V: tl.constexpr,
             K_LEVELS: tl.constexpr, K_COUNTS: tl.constexpr, K_MAXC: tl.constexpr, K_WIDTHS: tl.constexpr,
             K_TSIZE: tl.constexpr, V_LEVELS: tl.constexpr, V_COUNTS: tl.constexpr, V_MAXC: tl.constexpr,
             V_WIDTHS: tl.constexpr, V_TSIZE: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr):
    """Keys and values [BLOCK_T, D] float32 for a tile (values only if WANT_V)."""
    d = tl.arange(0, D)
    if EXACT:
        k = tl.load(pool_ptr + base[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v = k
        if WANT_V:
            v = tl.load(pool_ptr + base[:, None] + VOFF + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    else:
        k = decode_polar_tile(pool_ptr, base, valid, kcomps_ptr, ktab_ptr, D, K_LEVELS, K_COUNTS, K_MAXC, K_WIDTHS,
                              WT, K_TSIZE, STEP, LOG2_MIN)
        v = k
        if WANT_V:
            if VALUE_SCALAR:
                v = decode_scalar_tile(pool_ptr, base + VOFF, valid, vcomps_ptr, vtab_ptr, D, V_COUNTS, V_MAXC,
                                       V_WIDTHS, WT - VOFF, STEP, LOG2_MIN)
            else:
                v = decode_polar_tile(pool_ptr, base + VOFF, valid, vcomps_ptr, vtab_ptr, D, V_LEVELS, V_COUNTS,
                                      V_MAXC, V_WIDTHS, WT - VOFF, V_TSIZE, STEP, LOG2_MIN)
    return k, v


@triton.jit
def _prepared_rows(q_ptr, pid_bh, pid_m, M, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row block pid_m of batch·KV head pid_bh's queries as prepare_queries_kernel wrote them
    (float32 [B·Hkv, M, D]); rows past M are 0."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    return tl.load(q_ptr + (pid_bh * M + rows)[:, None] * D + d[None, :], mask=(rows < M)[:, None], other=0.0)


@triton.jit
def _paged_split(q, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, kcomps_ptr, ktab_ptr, vcomps_ptr,
                 vtab_ptr, pid_bh, pid_s, pid_m, slot, M, max_pages, S, S_total,
                 PS: tl.constexpr, WT: tl.constexpr, VOFF: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, EXACT: tl.constexpr, VALUE_SCALAR: tl.constexpr,
                 K_LEVELS: tl.constexpr, K_COUNTS: tl.constexpr, K_MAXC: tl.constexpr, K_WIDTHS: tl.constexpr,
                 K_TSIZE: tl.constexpr, V_LEVELS: tl.constexpr, V_COUNTS: tl.constexpr, V_MAXC: tl.constexpr,
                 V_WIDTHS: tl.constexpr, V_TSIZE: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Split pid_s of S over the tier's tokens of row pid_bh, query rows block pid_m (q: their
    [BLOCK_M, D] float32 queries, _prepared_rows): partials to split slot `slot` of S_total."""
    count = tl.load(count_ptr + pid_bh)
    start, end = _split_range(count, pid_s, S, BLOCK_T)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    d = tl.arange(0, D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        slots = t0 + tl.arange(0, BLOCK_T)
        valid = slots < end
        page = tl.load(pages_ptr + pid_bh * max_pages + slots // PS, mask=valid, other=0)
        base = (page.to(tl.int64) * PS + slots % PS) * WT
        k, v = _tile_kv(pool_ptr, base, valid, kcomps_ptr, ktab_ptr, vcomps_ptr, vtab_ptr, WT, VOFF, D, EXACT,
                        VALUE_SCALAR, True, K_LEVELS, K_COUNTS, K_MAXC, K_WIDTHS, K_TSIZE, V_LEVELS, V_COUNTS,
                        V_MAXC, V_WIDTHS, V_TSIZE, STEP, LOG2_MIN)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = (pid_bh * S_total + slot) * M + rows
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + out, m_i, mask=rmask)
    tl.store(l_ptr + out, l_i, mask=rmask)


@triton.jit
def paged_partials_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr,
        kcomps_ptr, ktab_ptr, vcomps_ptr, vtab_ptr,
        M, max_pages, S, split_offset, S_total,
        PS: tl.constexpr, WT: tl.constexpr, VOFF: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, EXACT: tl.constexpr, VALUE_SCALAR: tl.constexpr,
        K_LEVELS: tl.constexpr, K_COUNTS: tl.constexpr, K_MAXC: tl.constexpr, K_WIDTHS: tl.constexpr,
        K_TSIZE: tl.constexpr, V_LEVELS: tl.constexpr, V_COUNTS: tl.constexpr, V_MAXC: tl.constexpr,
        V_WIDTHS: tl.constexpr, V_TSIZE: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (batch·KV head, split, row block). PDL: launched with programmatic dependent launch
    (dependent_launch.py)."""
    pid_bh = after_previous_kernel(tl.program_id(0), PDL)
    pid_s = tl.program_id(1)
    q = _prepared_rows(q_ptr, pid_bh, tl.program_id(2), M, D, BLOCK_M)
    _paged_split(q, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, kcomps_ptr, ktab_ptr, vcomps_ptr,
                 vtab_ptr, pid_bh, pid_s, tl.program_id(2), split_offset + pid_s, M, max_pages, S, S_total, PS, WT,
                 VOFF, D, BLOCK_M, BLOCK_T, EXACT, VALUE_SCALAR, K_LEVELS, K_COUNTS, K_MAXC, K_WIDTHS, K_TSIZE,
                 V_LEVELS, V_COUNTS, V_MAXC, V_WIDTHS, V_TSIZE, STEP, LOG2_MIN, DOT_PRECISION)


@triton.jit
def tables_stay_in_global_memory(ktab_ptr, vtab_ptr):
    """STAGE_TABLES of the coded kernels when the decoders load their tables from global memory
    (the other choice is decode_codegen.stager's generated function)."""
    pass


@triton.jit
def _coded_program(count_ptr, S, M, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's (batch·KV head, split, its [start, end) tokens, query rows and their mask)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(count_ptr + pid_bh)
    start, end = _split_range(count, pid_s, S, BLOCK_T)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_bh, pid_s, start, end, rows, rows < M


@triton.jit
def _tile_records(t0, end, pages_ptr, pid_bh, max_pages, PS: tl.constexpr, WT: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """The tile's valid slots and each token's first record word in the pool (via the page table)."""
    slots = t0 + tl.arange(0, BLOCK_T)
    valid = slots < end
    page = tl.load(pages_ptr + pid_bh * max_pages + slots // PS, mask=valid, other=0)
    return valid, (page.to(tl.int64) * PS + slots % PS) * WT


@triton.jit
def _softmax_step(s, valid, m_i, l_i):
    """Online softmax in base 2 over one tile's logits: (p, rescale of the old sums, new max, new sum)."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _operand(x, TILE_DTYPE: tl.constexpr):
    return x.to(TILE_DTYPE)


@triton.jit
def _row_scale(x):
    """max |x| of each row, 1 for a row of zeros: queries divided by it fit a float16 operand
    whatever their norm (the logits are scaled back by it)."""
    a = tl.max(tl.abs(x), 1)
    return tl.where(a > 0, a, 1.0)


@triton.jit
def _coded_softmax_step(s, q_scale, radius, valid, m_i, l_i):
    """_softmax_step for logits of a unit-radius key tile with queries divided by q_scale: the
    tokens' logits are q_scale (per row) · radius (per token) · s. The radius and the tile mask
    are one FFMA (an invalid token's bias is -inf, its radius 0), and q_scale rides in the exp2's
    FFMA. (Selecting the radius, not only the bias, compiles to 264 fewer instructions per warp
    and tile in the sm_90 compile at d=128: 4,000 -> 3,736.)"""
    bias = tl.where(valid, 0.0, float("-inf"))
    s = s * tl.where(valid, radius, 0.0)[None, :] + bias[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * q_scale[:, None] - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _value_weights(p, radius, valid, TILE_DTYPE: tl.constexpr):
    """(p · value radius, divided by its largest in each row, as the dot's operand; that
    largest). The dot then runs on the unit-radius value tile: no 16-bit operand holds a norm,
    and a row's largest contributions keep their precision whatever the radii. An invalid
    token's radius counts as 0 (its record loads are masked too; the select is the cheaper form,
    see _coded_softmax_step)."""
    w = p * tl.where(valid, radius, 0.0)[None, :]
    top = tl.max(w, 1)
    top = tl.where(top > 0, top, 1.0)
    return (w * (1.0 / top)[:, None]).to(TILE_DTYPE), top


@triton.jit
def _coded_values_part(acc, alpha, pv, top, v, DOT_PRECISION: tl.constexpr, TILE_DTYPE: tl.constexpr):
    """The accumulator rescaled by alpha plus pv · v (a unit-radius value slice) times each row's
    weight scale (_value_weights)."""
    return acc * alpha[:, None] + tl.dot(pv, _operand(v, TILE_DTYPE), input_precision=DOT_PRECISION) * top[:, None]


@triton.jit
def paged_coded_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, ktab_ptr, vtab_ptr,
        M, max_pages, S, split_offset, S_total,
        PS: tl.constexpr, WT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
        DECODE_K: tl.constexpr, DECODE_V: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr,
        DOT_PRECISION: tl.constexpr, TILE_DTYPE: tl.constexpr,
        STAGE_TABLES: tl.constexpr):
    """paged_partials_kernel for a compressed tier, with keys and values decoded by the
    generated one-token-per-thread decoders (decode_codegen.py) as unit-radius tiles, the radii
    applied to the logits and the probabilities. TILE_DTYPE: the dots' operands (bfloat16 as
    dense bf16 attention, float16 with the packed decoders, float32 under the interpreter)."""
    STAGE_TABLES(ktab_ptr, vtab_ptr)
    pid_bh, pid_s, start, end, rows, rmask = _coded_program(count_ptr, S, M, BLOCK_M, BLOCK_T)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (pid_bh * M + rows)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    q_scale = _row_scale(q)
    q = _operand(q / q_scale[:, None], TILE_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        valid, base = _tile_records(t0, end, pages_ptr, pid_bh, max_pages, PS, WT, BLOCK_T)
        k, k_radius = DECODE_K(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = tl.dot(q, tl.trans(_operand(k, TILE_DTYPE)), input_precision=DOT_PRECISION)
        p, alpha, m_new, l_i = _coded_softmax_step(s, q_scale, k_radius, valid, m_i, l_i)
        v, v_radius = DECODE_V(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        pv, top = _value_weights(p, v_radius, valid, TILE_DTYPE)
        acc = _coded_values_part(acc, alpha, pv, top, v, DOT_PRECISION, TILE_DTYPE)
        m_i = m_new
    out = (pid_bh * S_total + split_offset + pid_s) * M + rows
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + out, m_i, mask=rmask)
    tl.store(l_ptr + out, l_i, mask=rmask)


@triton.jit
def paged_coded_halves_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, ktab_ptr, vtab_ptr,
        M, max_pages, S, split_offset, S_total,
        PS: tl.constexpr, WT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
        DECODE_K: tl.constexpr, DECODE_K2: tl.constexpr, DECODE_V: tl.constexpr, DECODE_V2: tl.constexpr,
        STEP: tl.constexpr, LOG2_MIN: tl.constexpr, DOT_PRECISION: tl.constexpr, TILE_DTYPE: tl.constexpr,
        STAGE_TABLES: tl.constexpr):
    """paged_coded_kernel with keys and values decoded in two halves of D (the root's left and
    right subtrees): q·k is two dots of D/2 and the accumulator two [BLOCK_M, D/2] blocks, so a
    decoded half-tile is dead before the next is made (fewer live registers per thread)."""
    STAGE_TABLES(ktab_ptr, vtab_ptr)
    pid_bh, pid_s, start, end, rows, rmask = _coded_program(count_ptr, S, M, BLOCK_M, BLOCK_T)
    H: tl.constexpr = D // 2
    d = tl.arange(0, H)
    q_rows = q_ptr + (pid_bh * M + rows)[:, None] * D
    qa = tl.load(q_rows + d[None, :], mask=rmask[:, None], other=0.0)
    qb = tl.load(q_rows + H + d[None, :], mask=rmask[:, None], other=0.0)
    q_scale = tl.maximum(_row_scale(qa), _row_scale(qb))
    qa = _operand(qa / q_scale[:, None], TILE_DTYPE)
    qb = _operand(qb / q_scale[:, None], TILE_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_a = tl.zeros((BLOCK_M, H), tl.float32)
    acc_b = tl.zeros((BLOCK_M, H), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        valid, base = _tile_records(t0, end, pages_ptr, pid_bh, max_pages, PS, WT, BLOCK_T)
        ka, k_radius = DECODE_K(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = tl.dot(qa, tl.trans(_operand(ka, TILE_DTYPE)), input_precision=DOT_PRECISION)
        kb = DECODE_K2(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = tl.dot(qb, tl.trans(_operand(kb, TILE_DTYPE)), s, input_precision=DOT_PRECISION)
        p, alpha, m_new, l_i = _coded_softmax_step(s, q_scale, k_radius, valid, m_i, l_i)
        va, v_radius = DECODE_V(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        pv, top = _value_weights(p, v_radius, valid, TILE_DTYPE)
        acc_a = _coded_values_part(acc_a, alpha, pv, top, va, DOT_PRECISION, TILE_DTYPE)
        vb = DECODE_V2(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        acc_b = _coded_values_part(acc_b, alpha, pv, top, vb, DOT_PRECISION, TILE_DTYPE)
        m_i = m_new
    out = (pid_bh * S_total + split_offset + pid_s) * M + rows
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc_a, mask=rmask[:, None])
    tl.store(acc_ptr + out[:, None] * D + H + d[None, :], acc_b, mask=rmask[:, None])
    tl.store(m_ptr + out, m_i, mask=rmask)
    tl.store(l_ptr + out, l_i, mask=rmask)


@triton.jit
def _coded_logits_part(s, q_rows, off: tl.constexpr, rmask, q_scale, k, Q: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, TILE_DTYPE: tl.constexpr):
    """s + q[:, off:off+Q] · k[:, off:off+Q]ᵀ for that decoded slice of the unit key tile."""
    q = tl.load(q_rows + off + tl.arange(0, Q)[None, :], mask=rmask[:, None], other=0.0)
    q = _operand(q / q_scale[:, None], TILE_DTYPE)
    return tl.dot(q, tl.trans(_operand(k, TILE_DTYPE)), s, input_precision=DOT_PRECISION)


@triton.jit
def paged_coded_quarters_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, ktab_ptr, vtab_ptr,
        M, max_pages, S, split_offset, S_total,
        PS: tl.constexpr, WT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
        DECODE_K0: tl.constexpr, DECODE_K1: tl.constexpr, DECODE_K2: tl.constexpr, DECODE_K3: tl.constexpr,
        DECODE_V0: tl.constexpr, DECODE_V1: tl.constexpr, DECODE_V2: tl.constexpr, DECODE_V3: tl.constexpr,
        STEP: tl.constexpr, LOG2_MIN: tl.constexpr, DOT_PRECISION: tl.constexpr, TILE_DTYPE: tl.constexpr,
        STAGE_TABLES: tl.constexpr):
    """paged_coded_halves_kernel in quarters of D (the subtrees two levels below the root): a
    decoded quarter-tile holds half the registers of a half-tile, meant to let a lower register
    cap fit more programs per SM (the sm_90 compile still peaks at the halves kernel's 138
    registers uncapped, but spills less under a cap: kernels.attend.CODED). The query slices are
    re-read from L1 per tile rather than held (they would hold registers across the decode)."""
    STAGE_TABLES(ktab_ptr, vtab_ptr)
    pid_bh, pid_s, start, end, rows, rmask = _coded_program(count_ptr, S, M, BLOCK_M, BLOCK_T)
    Q: tl.constexpr = D // 4
    d = tl.arange(0, Q)
    q_rows = q_ptr + (pid_bh * M + rows)[:, None] * D
    q_scale = _row_scale(tl.load(q_rows + tl.arange(0, D)[None, :], mask=rmask[:, None], other=0.0))
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, Q), tl.float32)
    acc1 = tl.zeros((BLOCK_M, Q), tl.float32)
    acc2 = tl.zeros((BLOCK_M, Q), tl.float32)
    acc3 = tl.zeros((BLOCK_M, Q), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        valid, base = _tile_records(t0, end, pages_ptr, pid_bh, max_pages, PS, WT, BLOCK_T)
        s = tl.zeros((BLOCK_M, BLOCK_T), tl.float32)
        k, k_radius = DECODE_K0(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = _coded_logits_part(s, q_rows, 0, rmask, q_scale, k, Q, DOT_PRECISION, TILE_DTYPE)
        k = DECODE_K1(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = _coded_logits_part(s, q_rows, Q, rmask, q_scale, k, Q, DOT_PRECISION, TILE_DTYPE)
        k = DECODE_K2(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = _coded_logits_part(s, q_rows, 2 * Q, rmask, q_scale, k, Q, DOT_PRECISION, TILE_DTYPE)
        k = DECODE_K3(pool_ptr, base, valid, ktab_ptr, BLOCK_T, STEP, LOG2_MIN)
        s = _coded_logits_part(s, q_rows, 3 * Q, rmask, q_scale, k, Q, DOT_PRECISION, TILE_DTYPE)
        p, alpha, m_new, l_i = _coded_softmax_step(s, q_scale, k_radius, valid, m_i, l_i)
        v, v_radius = DECODE_V0(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        pv, top = _value_weights(p, v_radius, valid, TILE_DTYPE)
        acc0 = _coded_values_part(acc0, alpha, pv, top, v, DOT_PRECISION, TILE_DTYPE)
        v = DECODE_V1(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        acc1 = _coded_values_part(acc1, alpha, pv, top, v, DOT_PRECISION, TILE_DTYPE)
        v = DECODE_V2(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        acc2 = _coded_values_part(acc2, alpha, pv, top, v, DOT_PRECISION, TILE_DTYPE)
        v = DECODE_V3(pool_ptr, base, valid, vtab_ptr, BLOCK_T, STEP, LOG2_MIN)
        acc3 = _coded_values_part(acc3, alpha, pv, top, v, DOT_PRECISION, TILE_DTYPE)
        m_i = m_new
    out = acc_ptr + ((pid_bh * S_total + split_offset + pid_s) * M + rows)[:, None] * D + d[None, :]
    tl.store(out, acc0, mask=rmask[:, None])
    tl.store(out + Q, acc1, mask=rmask[:, None])
    tl.store(out + 2 * Q, acc2, mask=rmask[:, None])
    tl.store(out + 3 * Q, acc3, mask=rmask[:, None])
    rows_out = (pid_bh * S_total + split_offset + pid_s) * M + rows
    tl.store(m_ptr + rows_out, m_i, mask=rmask)
    tl.store(l_ptr + rows_out, l_i, mask=rmask)


@triton.jit
def _chunk_split(q, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr, pid_bh, pid_s, pid_m, slot,
                 M, N, Tq, q_pos0, Hkv, S, S_total, skb, skh, skn, svb, svh, svn,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HAS_VALID: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Split pid_s of S over the dense chunk [B, Hkv, N, D] of row pid_bh, causal (row g·Tq + t
    sees chunk tokens <= q_pos0 + t), query rows block pid_m (q: their [BLOCK_M, D] float32
    queries): partials to split slot `slot`."""
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    start, end = _split_range(N, pid_s, S, BLOCK_T)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    qpos = q_pos0 + rows % Tq
    end = tl.minimum(end, tl.max(tl.where(rmask, qpos, 0)) + 1)  # nothing later is visible
    d = tl.arange(0, D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < end
        if HAS_VALID:
            tmask = tmask & (tl.load(valid_ptr + b * N + tok, mask=tmask, other=0) != 0)
        k = tl.load(k_ptr + b * skb + h * skh + tok[:, None] * skn + d[None, :], mask=tmask[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * svb + h * svh + tok[:, None] * svn + d[None, :], mask=tmask[:, None],
                    other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        vis = tmask[None, :] & (tok[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen nothing yet keep m = -inf; exp2(-inf - -inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = (pid_bh * S_total + slot) * M + rows
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + out, m_i, mask=rmask)
    tl.store(l_ptr + out, l_i, mask=rmask)


@triton.jit
def chunk_partials_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr,
        M, N, Tq, q_pos0, Hkv, S, split_offset, S_total,
        skb, skh, skn, svb, svh, svn,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, HAS_VALID: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """The dense current chunk (_chunk_split); program (batch·KV head, split, row block). PDL:
    launched with programmatic dependent launch (dependent_launch.py)."""
    pid_bh = after_previous_kernel(tl.program_id(0), PDL)
    pid_s = tl.program_id(1)
    q = _prepared_rows(q_ptr, pid_bh, tl.program_id(2), M, D, BLOCK_M)
    _chunk_split(q, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr, pid_bh, pid_s, tl.program_id(2),
                 split_offset + pid_s, M, N, Tq, q_pos0, Hkv, S, S_total, skb, skh, skn, svb, svh, svn, D, BLOCK_M,
                 BLOCK_T, HAS_VALID, DOT_PRECISION)


@triton.jit
def exact_and_chunk_partials_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr,
        M, max_pages, S_exact, N, Tq, q_pos0, Hkv, S_chunk, split_offset, S_total,
        skb, skh, skn, svb, svh, svn,
        qsrc_ptr, kfwd_ptr, qrot_ptr, mass_ptr, q_scale, t0, G, sqb, sqh, sqt, sqd,
        PS: tl.constexpr, WT: tl.constexpr, VOFF: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_T: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
        QUERIES: tl.constexpr, QBLOCK_M: tl.constexpr, QBLOCK_C: tl.constexpr, QCOLUMNS: tl.constexpr,
        HAS_ROT: tl.constexpr, ZERO_MASS: tl.constexpr):
    """The exact tier's S_exact splits and the dense chunk's S_chunk in one launch (a decode step's
    two short kernels: one launch fewer, and the two run side by side). Program (batch·KV head,
    split, row block): splits below S_exact read the tier (paged_partials_kernel with EXACT), the
    rest the chunk (chunk_partials_kernel); their partials are adjacent, from split_offset.

    QUERIES: the launch also does prepare_queries_kernel's work (query_kernels.py), so a decode
    step has one launch fewer again. Its programs come after the chunk's, D // QCOLUMNS per
    (batch·KV head, row block of QBLOCK_M rows), and write q_ptr (the scaled rows, then read by
    the mass kernels) and qrot_ptr (their rotation, which the compressed tiers' kernels launched
    after this one read) and zero mass_ptr; the exact tier's and the chunk's programs read their
    rows straight from qsrc_ptr (q [B, Hq, T, D]), scaled as those programs scale them."""
    pid_bh = after_previous_kernel(tl.program_id(0), PDL)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    if pid_s >= S_exact + S_chunk:  # only a QUERIES launch has these programs
        if QUERIES:
            prepare_query_block(qsrc_ptr, kfwd_ptr, q_ptr, qrot_ptr, mass_ptr, q_scale, M, Tq, t0, G, Hkv, N,
                                sqb, sqh, sqt, sqd, pid_bh, pid_m, pid_s - S_exact - S_chunk, D, QBLOCK_M, QBLOCK_C,
                                QCOLUMNS, HAS_ROT, ZERO_MASS)
    else:
        if QUERIES:
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            q = scaled_query_rows(qsrc_ptr, pid_bh, rows, rows < M, tl.arange(0, D), q_scale, Tq, t0, G, Hkv,
                                  sqb, sqh, sqt, sqd)
        else:
            q = _prepared_rows(q_ptr, pid_bh, pid_m, M, D, BLOCK_M)
        if pid_s < S_exact:  # the codec arguments are unused by the exact path
            _paged_split(q, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, pool_ptr, pool_ptr, pool_ptr,
                         pool_ptr, pid_bh, pid_s, pid_m, split_offset + pid_s, M, max_pages, S_exact, S_total, PS,
                         WT, VOFF, D, BLOCK_M, BLOCK_T, True, False, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1.0, 0.0,
                         DOT_PRECISION)
        else:
            _chunk_split(q, k_ptr, v_ptr, valid_ptr, acc_ptr, m_ptr, l_ptr, pid_bh, pid_s - S_exact, pid_m,
                         split_offset + pid_s, M, N, Tq, q_pos0, Hkv, S_chunk, S_total, skb, skh, skn, svb, svh,
                         svn, D, BLOCK_M, BLOCK_T, HAS_VALID, DOT_PRECISION)


@triton.jit
def paged_mass_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, util_ptr, stat_m_ptr, stat_l_ptr,
        kcomps_ptr, ktab_ptr,
        M, Tq, W, max_pages,
        PS: tl.constexpr, WT: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
        EXACT: tl.constexpr, K_LEVELS: tl.constexpr, K_COUNTS: tl.constexpr, K_MAXC: tl.constexpr,
        K_WIDTHS: tl.constexpr, K_TSIZE: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """utility[token] += attention mass from the last W queries of every head in the group
    (final softmax from the combined row statistics). One program owns one tile of tokens."""
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    count = tl.load(count_ptr + pid_bh)
    if pid_t * BLOCK_T < count:
        slots = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        valid = slots < count
        page = tl.load(pages_ptr + pid_bh * max_pages + slots // PS, mask=valid, other=0)
        row_of_slot = page.to(tl.int64) * PS + slots % PS
        base = row_of_slot * WT
        k, _ = _tile_kv(pool_ptr, base, valid, kcomps_ptr, ktab_ptr, kcomps_ptr, ktab_ptr, WT, 0, D, EXACT, False,
                        False, K_LEVELS, K_COUNTS, K_MAXC, K_WIDTHS, K_TSIZE, K_LEVELS, K_COUNTS, K_MAXC, K_WIDTHS,
                        K_TSIZE, STEP, LOG2_MIN)
        d = tl.arange(0, D)
        mass = tl.zeros((BLOCK_T,), tl.float32)
        G = M // Tq
        for r0 in range(0, G * W, BLOCK_R):
            j = r0 + tl.arange(0, BLOCK_R)
            jmask = j < G * W
            rows = (j // W) * Tq + Tq - W + j % W
            q = tl.load(q_ptr + (pid_bh * M + rows)[:, None] * D + d[None, :], mask=jmask[:, None], other=0.0)
            mrow = tl.load(stat_m_ptr + pid_bh * M + rows, mask=jmask, other=0.0)
            lrow = tl.load(stat_l_ptr + pid_bh * M + rows, mask=jmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            ok = jmask & (lrow > 0)
            p = tl.exp2(s - tl.where(ok, mrow, 0.0)[:, None]) / tl.where(ok, lrow, 1.0)[:, None]
            p = tl.where(ok[:, None] & valid[None, :], p, 0.0)
            mass += tl.sum(p, 0)
        old = tl.load(util_ptr + row_of_slot, mask=valid, other=0.0).to(tl.float32)
        tl.store(util_ptr + row_of_slot, (old + mass).to(util_ptr.dtype.element_ty), mask=valid)
