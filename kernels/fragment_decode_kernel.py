"""ADA decode over a compressed tier for up to 8 query rows per KV head (a decode step's query
heads of one GQA group): paged_fragment_kernel turned around, the queries as the mma's 8 columns.

paged_fragment_kernel computes S = q @ k^T and acc += p @ v with the query rows as mma_v2's 16
M rows; a decode step has G of them (4 for Llama-3-8B), so 3/4 of its [16, D] float32
accumulator, its [16, D] query operand and its [16, tokens] logits are padding, held in registers
all the same: they are what limits it to two programs per SM at d=128. Here the tokens are the
M rows and the queries the N = 8 columns: S^T = k @ q^T and acc^T += v^T @ p^T. The keys are the A
operand of the first mma and the values that of the second, with the same lanes holding the same
subtrees as before (key lane s: quarter s; value lane o: octant o), so the generated decoders
serve both kernels. The accumulator is [D, 8], half the registers; the logits [tokens, 8].

p^T leaves the first mma in the accumulator layout (a lane holds a token's two adjacent query
columns) and enters the second as the B operand (a lane holds a query's two adjacent tokens): per
8 x 8 block that is the transpose `movmatrix.trans` does in one instruction per register.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .fragment_kernels import (_from_lane, _stage_tables, _tile_records, after_previous_kernel, await_tile, key_order,
                               query_maxima, radius_lanes, split_tokens, subtree_lanes)


@gluon.jit
def _transpose_blocks(p):
    """Each 8 x 8 block of p [W, CT, 8] (float16, mma accumulator layout) transposed in place:
    the result at (w, 8b + a, c) is p at (w, 8b + c, a). One movmatrix per register pair."""
    return gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [p],
                                     dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def fragment_query_columns(q_ptr, first_row, row0, M, D: gl.constexpr, W: gl.constexpr, MMA: gl.constexpr,
                           BOP: gl.constexpr):
    """The query rows row0 + [0, 8) of M (pre-scaled, rotated; row r at q_ptr + (first_row + r)·D)
    as the B operand [W, D, 8] of k @ q^T for every warp, each divided by its max |q|
    (query_maxima) with its D index in the key fragments' order; and those maxima [W, 8] in the
    logits' column layout."""
    qs = query_maxima(q_ptr, first_row, row0, M, 8, D, W)
    wq = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, BOP)))
    kq = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(2, BOP)))
    nq = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, BOP)))
    rows = row0 + nq[None, None, :] + wq[:, None, None] * 0
    q = gl.load(q_ptr + (first_row + rows) * D + key_order(kq, D)[None, :, None], mask=rows < M, other=0.0)
    qop = (q / gl.convert_layout(qs, gl.SliceLayout(0, gl.SliceLayout(1, BOP)))[None, None, :]).to(gl.float16)
    return qop, gl.convert_layout(qs, gl.SliceLayout(0, gl.SliceLayout(1, MMA)))


@gluon.jit
def paged_fragment_decode_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, ktab_ptr, vtab_ptr,
        M, max_pages, S, split_offset, S_total,
        PS: gl.constexpr, WT: gl.constexpr, D: gl.constexpr, CT: gl.constexpr, W: gl.constexpr,
        K_WORDS: gl.constexpr, V_WORDS: gl.constexpr, KEY_QUARTER: gl.constexpr, VALUE_OCTANT: gl.constexpr,
        KEY_RADIUS: gl.constexpr, VALUE_RADIUS: gl.constexpr, DECLARE_RECORDS: gl.constexpr, COPY_TILE: gl.constexpr,
        STEP: gl.constexpr, LOG2_MIN: gl.constexpr, PDL: gl.constexpr):
    """Same arguments and results as paged_fragment_kernel; program (batch·KV head, split, 8 query
    rows)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    AOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BOP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    TOKENS: gl.constexpr = gl.SliceLayout(2, MMA)  # [W, CT]: the logits' rows
    QUERIES: gl.constexpr = gl.SliceLayout(1, MMA)  # [W, 8]: the logits' columns
    pid_bh = after_previous_kernel(gl.program_id(0), PDL)
    _stage_tables(ktab_ptr, vtab_ptr, K_WORDS, V_WORDS, W)
    pid_s = gl.program_id(1)
    row0 = gl.program_id(2) * 8
    BLOCK: gl.constexpr = W * CT
    start, end = split_tokens(count_ptr, pid_bh, pid_s, S, BLOCK)

    qop, qs_c = fragment_query_columns(q_ptr, pid_bh * M, row0, M, D, W, MMA, BOP)

    m_i = gl.full([W, 8], float("-inf"), gl.float32, QUERIES)
    t_i = gl.zeros([W, 8], gl.float32, QUERIES)
    # the softmax denominator, summed over tokens once at the end: per element until then
    l_e = gl.zeros([W, CT, 8], gl.float32, MMA)
    acc = gl.zeros([W, D, 8], gl.float32, MMA)
    wk, tk, ksub, wv, tv, vsub = subtree_lanes(W, CT)
    wc, tc, my_token, token_lane = radius_lanes(W, CT, TOKENS)
    DECLARE_RECORDS(pid_bh)
    row = pid_bh * max_pages
    COPY_TILE(pool_ptr, pages_ptr, row, start, end, 0, PS)
    for t0 in range(start, end, BLOCK):
        stage_at = await_tile(pool_ptr, pages_ptr, row, t0, start, end, COPY_TILE, PS, W, CT, WT)
        kbase, _ = _tile_records(t0, end, wk[:, None], tk[None, :], WT, CT, stage_at)
        kj = KEY_QUARTER(kbase[:, :, None] + 0 * ksub, ksub)
        k = gl.convert_layout(gl.reshape(kj, [W, CT, D]), AOP, assert_trivial=True)
        s = mma_v2(k, qop, gl.zeros([W, CT, 8], gl.float32, MMA))  # S^T

        _, cvalid = _tile_records(t0, end, wc[:, None], tc[None, :], WT, CT, stage_at)
        mbase, mvalid = _tile_records(t0, end, wc[:, None], my_token, WT, CT, stage_at)
        kr = _from_lane(gl.where(mvalid, KEY_RADIUS(mbase, STEP, LOG2_MIN), 0.0), token_lane)
        vr = _from_lane(gl.where(mvalid, VALUE_RADIUS(mbase, STEP, LOG2_MIN), 0.0), token_lane)
        s = s * kr[:, :, None] + gl.where(cvalid, 0.0, float("-inf"))[:, :, None]
        m_new = gl.maximum(m_i, gl.max(s, 1) * qs_c[None, :])
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp past the end has seen nothing yet
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s * qs_c[None, None, :] - m_safe[:, None, :])
        l_e = l_e * alpha[:, None, :] + p
        # as paged_fragment_kernel: p times the value radius over a running column scale T
        wgt = p * vr[:, :, None]
        t_old = t_i * alpha
        t_new = gl.maximum(t_old, gl.max(wgt, 1))
        t_new = gl.where(t_new > 0, t_new, 1.0)
        pt = _transpose_blocks((wgt * (1.0 / t_new)[:, None, :]).to(gl.float16))
        # pt at (w, 8b + a, c) holds p^T's (token 8b + c, query a): relabel to (token, query)
        pt = gl.reshape(gl.permute(gl.reshape(pt, [W, CT // 8, 8, 8]), [0, 1, 3, 2]), [W, CT, 8])
        pb = gl.convert_layout(pt, BOP, assert_trivial=True)

        vbase, _ = _tile_records(t0, end, wv[:, None], tv[None, :], WT, CT, stage_at)
        vj = VALUE_OCTANT(vbase[:, :, None] + 0 * vsub, vsub)
        v = gl.convert_layout(gl.permute(gl.reshape(vj, [W, CT, D]), [0, 2, 1]), AOP, assert_trivial=True)  # v^T
        acc = mma_v2(v, pb, acc * (t_old / t_new)[:, None, :])
        t_i = t_new
        m_i = m_new

    # the warps' states, merged once
    l_i = gl.sum(l_e, 1)
    m_all = gl.max(m_i, 0)
    f = gl.exp2(m_i - gl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
    l_all = gl.sum(l_i * f, 0)
    acc_all = gl.sum(acc * (f * t_i)[:, None, :], 0)
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)
    no = gl.arange(0, D, layout=gl.SliceLayout(1, OUT))
    ro = row0 + gl.arange(0, 8, layout=gl.SliceLayout(0, OUT))
    coord = (no & 7) * (D // 8) + (no >> 3)  # value fragment row -> tree coordinate
    out = (pid_bh * S_total + split_offset + pid_s) * M + ro
    gl.store(acc_ptr + out[None, :] * D + coord[:, None], acc_all, mask=ro[None, :] < M)
    r1 = row0 + gl.arange(0, 8, layout=gl.SliceLayout(0, QUERIES))
    out1 = (pid_bh * S_total + split_offset + pid_s) * M + r1
    gl.store(m_ptr + out1, m_all, mask=r1 < M)
    gl.store(l_ptr + out1, l_all, mask=r1 < M)
