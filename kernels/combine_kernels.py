"""The merge of split-KV partials (combine_kernel) into attention outputs.

Every split wrote, per query row, its running max m (log2 units), its sum l of 2^(s - m), and
its accumulator acc = sum of 2^(s - m)·v. The output row is sum_s 2^(m_s - M)·acc_s over
sum_s 2^(m_s - M)·l_s for any M; M = max_s m_s keeps every term finite.

One pass over the splits: each slot of a [splits, rows, columns] step keeps its own running
max and rescales its own sums as larger maxima arrive, elementwise, so the loop carries no
reduction across threads. The slots meet once at the end. Session 18's kernel made a
statistics pass first, then a weighted pass per block of columns: at B=1 (8 programs of 4
rows, ~36 splits) its ~11 dependent steps were 17.5 of the call's 93 us (H200, session 19).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dependent_launch import after_previous_kernel


@triton.jit
def _merge_splits(acc_ptr, m_ptr, l_ptr, base, s_lo, s_hi, rows, rmask, cols, M,
                  D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Splits s in [s_lo, s_hi), BLOCK_S at a time, for the given rows and columns: per slot,
    (running max [S, R, 1], sum of 2^(m_s - max)·acc_s [S, R, C], sum of 2^(m_s - max)·l_s
    [S, R, 1]). A slot that saw only empty splits keeps max -inf and zero sums."""
    top = tl.full((BLOCK_S, rows.shape[0], 1), float("-inf"), tl.float32)
    lsum = tl.zeros((BLOCK_S, rows.shape[0], 1), tl.float32)
    part = tl.zeros((BLOCK_S, rows.shape[0], cols.shape[0]), tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        idx = ((base + sp)[:, None] * M + rows[None, :])[:, :, None]  # [S, R, 1]
        ok = ((sp < s_hi)[:, None] & rmask[None, :])[:, :, None]
        m = tl.load(m_ptr + idx, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + idx, mask=ok, other=0.0)
        a = tl.load(acc_ptr + idx * D + cols[None, None, :], mask=ok, other=0.0)
        new = tl.maximum(top, m)
        safe = tl.where(new == float("-inf"), 0.0, new)  # exp2(-inf - 0) = 0: no -inf - -inf
        keep = tl.exp2(top - safe)
        w = tl.exp2(m - safe)
        part = part * keep + w * a
        lsum = lsum * keep + w * l
        top = new
    return top, part, lsum


@triton.jit
def _slots_to_rows(top, part, lsum):
    """Merge the slots of _merge_splits: (max [R, 1], sum of 2^(.. - max)·acc [R, C], of l [R, 1])."""
    mmax = tl.max(top, 0)
    safe = tl.where(mmax == float("-inf"), 0.0, mmax)
    w = tl.exp2(top - safe[None, :, :])
    return mmax, tl.sum(part * w, 0), tl.sum(lsum * w, 0)


@triton.jit
def _rescale(x, from_max, to_safe):
    """x held relative to from_max, relative to to_safe instead (0 where from_max is -inf: x is
    then 0, and 2^(0 - to_safe) may overflow)."""
    return tl.where(from_max == float("-inf"), 0.0, x * tl.exp2(tl.where(from_max == float("-inf"), 0.0, from_max)
                                                                - to_safe))


@triton.jit
def combine_kernel(
        acc_ptr, m_ptr, l_ptr, hinv_ptr, out_ptr, stat_m_ptr, stat_l_ptr, sinks_ptr,
        M, Tq, G, Hkv, S_total, S_rot,
        sob, soh, sot,
        D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_ROT: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr, HAS_SINKS: tl.constexpr, PDL: tl.constexpr):
    """Merge splits 0..S_rot-1 (values in the rotated domain) and S_rot..S_total-1 (plain),
    rotate back once, normalise, write out[b, h·G + g, t] for row g·Tq + t, and the rows'
    statistics (max, sum) to stat_m / stat_l.

    Program (batch·KV head, row block, column block of COLUMNS): a launch with few rows (a
    decode step at small batch) splits the columns over programs, each re-merging the rotated
    splits over all of D (the rotation mixes every column into each output column).

    HAS_SINKS: one more logit per query head (gpt-oss's sinks, sinks_ptr [Hq], log2 units)
    joins the normaliser only, as store.sink_factor does; the row statistics stay the tokens'.

    The rotation: a [BLOCK_M, D] x [D, BLOCK_C] tf32x3 dot per block of BLOCK_C output columns
    (about float32 accuracy on tensor cores), or float32 FMAs under tl.dot's 16 rows.

    PDL: launched with programmatic dependent launch (dependent_launch.py)."""
    pid_bh = after_previous_kernel(tl.program_id(0), PDL)
    pid_m = tl.program_id(1)
    pid_c = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    d = tl.arange(0, D)
    base = pid_bh * S_total
    b = pid_bh // Hkv
    head = (pid_bh % Hkv) * G + rows // Tq
    t = rows % Tq
    if HAS_ROT:
        rtop, rpart, rl = _merge_splits(acc_ptr, m_ptr, l_ptr, base, 0, S_rot, rows, rmask, d, M, D, BLOCK_S)
        rmax, acc_rot, rsum = _slots_to_rows(rtop, rpart, rl)
    for c0 in tl.static_range(0, COLUMNS, BLOCK_C):
        cols = pid_c * COLUMNS + c0 + tl.arange(0, BLOCK_C)
        ptop, ppart, pl = _merge_splits(acc_ptr, m_ptr, l_ptr, base, S_rot, S_total, rows, rmask, cols, M, D, BLOCK_S)
        mmax, part, total = _slots_to_rows(ptop, ppart, pl)  # the plain splits' max, sums (the same at every c0)
        if HAS_ROT:
            hinv = tl.load(hinv_ptr + d[:, None] * D + cols[None, :])
            if BLOCK_M >= 16:
                rot = tl.dot(acc_rot, hinv, input_precision="tf32x3")
            else:  # a decode step's G query heads: float32 FMAs
                rot = tl.sum(acc_rot[:, :, None] * hinv[None, :, :], 1)
            both = tl.maximum(mmax, rmax)
            safe = tl.where(both == float("-inf"), 0.0, both)
            part = _rescale(part, mmax, safe) + _rescale(rot, rmax, safe)
            total = _rescale(total, mmax, safe) + _rescale(rsum, rmax, safe)
            mmax = both
        safe = tl.where(mmax == float("-inf"), 0.0, mmax)
        norm = total
        if HAS_SINKS:  # a sink of -inf adds 0; one far above the tokens' logits makes norm inf (output 0)
            norm = total + tl.exp2(tl.load(sinks_ptr + head[:, None], mask=rmask[:, None], other=float("-inf")) - safe)
        inv = tl.where(total == 0, 0.0, 1.0 / tl.where(total == 0, 1.0, norm))
        # a row that saw nothing gives 0 (not 0/0); a NaN anywhere in the row stays NaN
        out = tl.where(total == 0, 0.0, part * inv)
        tl.store(out_ptr + b * sob + head[:, None] * soh + t[:, None] * sot + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        if c0 == 0:
            if pid_c == 0:  # the statistics are the same in every column block
                tl.store(stat_m_ptr + pid_bh * M + rows[:, None], mmax, mask=rmask[:, None])
                tl.store(stat_l_ptr + pid_bh * M + rows[:, None], total, mask=rmask[:, None])
