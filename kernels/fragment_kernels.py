"""ADA decode over a compressed tier in Gluon: keys and values decoded per lane straight into
mma_v2's operand fragments, each warp with its own online softmax.

Same contract as attention_kernels.paged_coded_kernel (split partials acc, m, l in the rotated
domain; combine_kernels.combine_kernel merges them), for tiers with polar keys and values.

Each program owns (batch·KV head, split, 16 query rows) and W warps. In the tile loop warp w
takes its own CT tokens: it decodes their keys as the B operand of a batched q @ k^T (4 lanes
per token, one quarter subtree each: fragment_codegen.py), applies the radii and its online
softmax, decodes the values as the B operand of p @ v (8 lanes per token, one octant subtree
each) and accumulates. No decoded tile goes through shared memory (the conversions to the
operand layouts are asserted trivial) and no warp waits on another inside the loop; the warps'
(m, l, acc) merge once at the end. The query columns are permuted into the key fragments'
order and the output columns back from the value fragments' order. The records themselves are
staged: each warp copies its CT tokens' records (contiguous, one page's) into shared memory
with cp.async one tile ahead, and the lanes read their words from there.

Why: today's Triton kernels decode a token per thread and hand tl.dot a [tokens, D] tile, which
goes through shared memory (STS, then ldmatrix) with a barrier per dot. A speed probe of this
design (benchmarks/probe_gluon_fragments.py) ran 1.22-1.48x faster than those kernels at
Llama-3-8B decode shapes on an H200 with the lanes loading their words from global memory
(session 24), and 1.14-1.18x faster than cuDNN with the records staged (session 25). Gluon does
not run under TRITON_INTERPRET, so the Triton kernels stay the interpreted reference and the
fallback.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .dependent_launch import after_previous_kernel
from .fragment_codegen import FRAGMENT_TABLE_BYTES, FRAGMENT_TABLES

_DECLARE = gl.constexpr(f".shared .align 16 .b8 {FRAGMENT_TABLES}[{FRAGMENT_TABLE_BYTES}];\n mov.u32 $0, $1;")
_STORE = gl.constexpr(f"{{ .reg .u32 a; .reg .pred p; setp.ne.u32 p, $3, 0; mov.u32 a, {FRAGMENT_TABLES}; "
          "mad.lo.u32 a, $2, 4, a; @p st.shared.u32 [a], $1; mov.u32 $0, 0; }")


@gluon.jit
def _stage_tables(ktab_ptr, vtab_ptr, K_WORDS: gl.constexpr, V_WORDS: gl.constexpr, W: gl.constexpr):
    """Copy the key table to byte 0 of the static shared array and the value table after it;
    every lane's lookups wait at the barrier."""
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    i = gl.arange(0, 32 * W, layout=ONE)
    gl.inline_asm_elementwise(_DECLARE, "=r,r", [i], dtype=gl.int32, is_pure=False, pack=1)
    for c in gl.static_range(0, K_WORDS, 32 * W):
        ok = (c + i) < K_WORDS
        w = gl.load(ktab_ptr + c + i, mask=ok, other=0)
        gl.inline_asm_elementwise(_STORE, "=r,r,r,r", [w, c + i, ok.to(gl.int32)], dtype=gl.int32, is_pure=False,
                                  pack=1)
    for c in gl.static_range(0, V_WORDS, 32 * W):
        ok = (c + i) < V_WORDS
        w = gl.load(vtab_ptr + c + i, mask=ok, other=0)
        gl.inline_asm_elementwise(_STORE, "=r,r,r,r", [w, K_WORDS + c + i, ok.to(gl.int32)], dtype=gl.int32,
                                  is_pure=False, pack=1)
    # (gl.thread_barrier is missing from some Triton versions)
    gl.inline_asm_elementwise("bar.sync 0; mov.u32 $0, $1;", "=r,r", [i], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _lane_id(zero):
    return gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [zero], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _from_lane(x, lane):
    """x as held by lane `lane` (all 32 lanes take part)."""
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [x, lane],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _tile_records(t0, end, w, t, WT: gl.constexpr, CT: gl.constexpr, stage_at):
    """(each token's first word in the staged tile, validity): warp w takes tokens t0 + w·CT + t,
    all in one page (tiles start at multiples of W·CT and CT divides the page size)."""
    return (w * CT + t) * WT + stage_at, t0 + w * CT + t < end


@gluon.jit
def split_tokens(count_ptr, pid_bh, pid_s, S, BLOCK: gl.constexpr):
    """This split's [start, end) of the row's tokens, in whole tiles of BLOCK."""
    count = gl.load(count_ptr + pid_bh)
    per = gl.cdiv(gl.cdiv(count, BLOCK), S) * BLOCK
    start = pid_s * per
    return start, gl.minimum(count, start + per)


@gluon.jit
def subtree_lanes(W: gl.constexpr, CT: gl.constexpr):
    """(warp, token, subtree) indices of the decoders' inputs [W, CT, parts]: for the keys (4
    parts: lane bits 0-1 the quarter, 2-4 the token within 8) and for the values (8 parts: token
    bit 0 in registers, bits 1-2 lane bits 0-1, the octant lane bits 2-4). The same lanes hold
    the same subtrees in both kernels' operand fragments."""
    KL: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 8, 4], [W, 1, 1], [2, 1, 0])
    VL: gl.constexpr = gl.BlockedLayout([1, 2, 1], [1, 4, 8], [W, 1, 1], [1, 2, 0])
    wk = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, KL)))
    tk = gl.arange(0, CT, layout=gl.SliceLayout(0, gl.SliceLayout(2, KL)))
    sk = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, KL)))
    ksub = sk[None, None, :] + 0 * tk[None, :, None] + 0 * wk[:, None, None]
    wv = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, VL)))
    tv = gl.arange(0, CT, layout=gl.SliceLayout(0, gl.SliceLayout(2, VL)))
    ov = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, VL)))
    vsub = ov[None, None, :] + 0 * tv[None, :, None] + 0 * wv[:, None, None]
    return wk, tk, ksub, wv, tv, vsub


@gluon.jit
def radius_lanes(W: gl.constexpr, CT: gl.constexpr, TOKENS: gl.constexpr):
    """(warp, token) indices [W, CT] in the logits' token layout TOKENS; the token whose radii
    each lane decodes (lane t % CT: every register of a lane computes the same, merged by the
    compiler); and the lane each logits entry's token comes from."""
    wc = gl.arange(0, W, layout=gl.SliceLayout(1, TOKENS))
    tc = gl.arange(0, CT, layout=gl.SliceLayout(0, TOKENS))
    my_token = _lane_id(wc[:, None] * 0 + tc[None, :] * 0) % CT
    token_lane = tc[None, :] + 0 * wc[:, None]
    return wc, tc, my_token, token_lane


@gluon.jit
def await_tile(pool_ptr, pages_ptr, row, t0, start, end, COPY_TILE: gl.constexpr, PS: gl.constexpr,
               W: gl.constexpr, CT: gl.constexpr, WT: gl.constexpr):
    """Start copying the next tile's records into the other staging buffer, wait for this tile's,
    and return this tile's first word in the staging buffer."""
    BLOCK: gl.constexpr = W * CT
    stage = ((t0 - start) // BLOCK) % 2
    # every lane is done with the other tile's words before they are overwritten
    gl.inline_asm_elementwise("bar.warp.sync -1; mov.u32 $0, $1;", "=r,r", [t0], dtype=gl.int32,
                              is_pure=False, pack=1)
    COPY_TILE(pool_ptr, pages_ptr, row, t0 + BLOCK, end, 1 - stage, PS)
    # this tile's copies have landed (the next one's may still be in flight); the reads take
    # the returned 0 into their addresses, so they cannot move above the wait
    dep = gl.inline_asm_elementwise("cp.async.wait_group 1; bar.warp.sync -1; mov.u32 $0, 0;", "=r,r", [t0],
                                    dtype=gl.int32, is_pure=False, pack=1)
    return stage * (W * CT * WT) + dep


@gluon.jit
def query_maxima(q_ptr, first_row, row0, M, ROWS: gl.constexpr, D: gl.constexpr, W: gl.constexpr):
    """max |q| of query rows row0 + [0, ROWS) of M (row r at q_ptr + (first_row + r)·D), 1 where a
    row is all zeros or past M: each row is divided by it so float16 holds any norm."""
    Q2: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [1, W], [1, 0])
    r2 = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, Q2))
    d2 = gl.arange(0, D, layout=gl.SliceLayout(0, Q2))
    q2 = gl.load(q_ptr + (first_row + r2[:, None]) * D + d2[None, :], mask=r2[:, None] < M, other=0.0)
    qs = gl.max(gl.abs(q2), 1)
    return gl.where(qs > 0, qs, 1.0)


@gluon.jit
def key_order(k, D: gl.constexpr):
    """The tree coordinate at index k of the key fragments' D order (bit 0: leaf bit 0, bits 1-2:
    the quarter, bits 3..: leaf bits 1..), where the queries' columns are read from."""
    return ((k >> 1) & 3) * (D // 4) + (k & 1) + (k >> 3) * 2


@gluon.jit
def fragment_queries(q_ptr, first_row, row0, M, D: gl.constexpr, W: gl.constexpr, MMA: gl.constexpr,
                     AOP: gl.constexpr):
    """The query rows row0 + [0, 16) of M (pre-scaled, rotated; row r at q_ptr + (first_row + r)·D)
    as the A operand of q @ k^T for every warp, each row divided by its max |q| (query_maxima)
    and its columns in the key fragments' order; and those maxima in the logits' rows."""
    qs = query_maxima(q_ptr, first_row, row0, M, 16, D, W)
    wq = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, AOP)))
    mq = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, AOP)))
    kq = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, AOP)))
    rows = row0 + mq[None, :, None] + wq[:, None, None] * 0
    q = gl.load(q_ptr + (first_row + rows) * D + key_order(kq, D)[None, None, :], mask=rows < M, other=0.0)
    qop = (q / gl.convert_layout(qs, gl.SliceLayout(0, gl.SliceLayout(2, AOP)))[None, :, None]).to(gl.float16)
    return qop, gl.convert_layout(qs, gl.SliceLayout(0, gl.SliceLayout(2, MMA)))


@gluon.jit
def paged_fragment_kernel(
        q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, ktab_ptr, vtab_ptr,
        M, max_pages, S, split_offset, S_total,
        PS: gl.constexpr, WT: gl.constexpr, D: gl.constexpr, CT: gl.constexpr, W: gl.constexpr,
        K_WORDS: gl.constexpr, V_WORDS: gl.constexpr, KEY_QUARTER: gl.constexpr, VALUE_OCTANT: gl.constexpr,
        KEY_RADIUS: gl.constexpr, VALUE_RADIUS: gl.constexpr, DECLARE_RECORDS: gl.constexpr, COPY_TILE: gl.constexpr,
        STEP: gl.constexpr, LOG2_MIN: gl.constexpr, PDL: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    AOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BOP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROWS: gl.constexpr = gl.SliceLayout(2, MMA)
    TOKENS: gl.constexpr = gl.SliceLayout(1, MMA)
    pid_bh = after_previous_kernel(gl.program_id(0), PDL)
    _stage_tables(ktab_ptr, vtab_ptr, K_WORDS, V_WORDS, W)
    pid_s = gl.program_id(1)
    row0 = gl.program_id(2) * 16
    BLOCK: gl.constexpr = W * CT
    start, end = split_tokens(count_ptr, pid_bh, pid_s, S, BLOCK)

    qop, qs_c = fragment_queries(q_ptr, pid_bh * M, row0, M, D, W, MMA, AOP)

    m_i = gl.full([W, 16], float("-inf"), gl.float32, ROWS)
    l_i = gl.zeros([W, 16], gl.float32, ROWS)
    t_i = gl.zeros([W, 16], gl.float32, ROWS)
    acc = gl.zeros([W, 16, D], gl.float32, MMA)
    wk, tk, ksub, wv, tv, vsub = subtree_lanes(W, CT)
    wc, tc, my_token, token_lane = radius_lanes(W, CT, TOKENS)
    # records: each warp copies its own tokens' (contiguous) into shared memory one tile ahead
    # (fragment_codegen._staging_source); the lanes read their subtrees' words from there
    DECLARE_RECORDS(pid_bh)
    row = pid_bh * max_pages
    COPY_TILE(pool_ptr, pages_ptr, row, start, end, 0, PS)
    for t0 in range(start, end, BLOCK):
        stage_at = await_tile(pool_ptr, pages_ptr, row, t0, start, end, COPY_TILE, PS, W, CT, WT)
        kbase, kvalid = _tile_records(t0, end, wk[:, None], tk[None, :], WT, CT, stage_at)
        kj = KEY_QUARTER(kbase[:, :, None] + 0 * ksub, ksub)
        k = gl.reshape(kj, [W, CT, D])
        kt = gl.convert_layout(gl.permute(k, 0, 2, 1), BOP, assert_trivial=True)
        s = mma_v2(qop, kt, gl.zeros([W, 16, CT], gl.float32, MMA))

        _, cvalid = _tile_records(t0, end, wc[:, None], tc[None, :], WT, CT, stage_at)
        # the radii, decoded once per token (lane t % 32 decodes token t: every register of a lane
        # computes the same, merged by the compiler) and fetched from there by the 8 lanes that
        # hold each token's logits. (Through convert_layout, the move went via shared memory with
        # two CTA barriers per tile: 1-2% slower at Llama-3-8B B=8 and 32 (H200, session 26).)
        mbase, mvalid = _tile_records(t0, end, wc[:, None], my_token, WT, CT, stage_at)
        kr = _from_lane(gl.where(mvalid, KEY_RADIUS(mbase, STEP, LOG2_MIN), 0.0), token_lane)
        vr = _from_lane(gl.where(mvalid, VALUE_RADIUS(mbase, STEP, LOG2_MIN), 0.0), token_lane)
        s = s * kr[:, None, :] + gl.where(cvalid, 0.0, float("-inf"))[:, None, :]
        m_new = gl.maximum(m_i, gl.max(s, 2) * qs_c[None, :])
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp past the end has seen nothing yet
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s * qs_c[None, :, None] - m_safe[:, :, None])
        l_i = l_i * alpha + gl.sum(p, 2)
        # p times the value radius over a running row scale T (the largest such product so far,
        # in the current max's units): the float16 operand holds no norm, and acc is kept in
        # units of T, so the mma accumulates into the rescaled acc directly
        wgt = p * vr[:, None, :]
        t_old = t_i * alpha
        t_new = gl.maximum(t_old, gl.max(wgt, 2))
        t_new = gl.where(t_new > 0, t_new, 1.0)
        pa = gl.convert_layout((wgt * (1.0 / t_new)[:, :, None]).to(gl.float16), AOP)

        vbase, _ = _tile_records(t0, end, wv[:, None], tv[None, :], WT, CT, stage_at)
        vj = VALUE_OCTANT(vbase[:, :, None] + 0 * vsub, vsub)
        v = gl.convert_layout(gl.reshape(vj, [W, CT, D]), BOP, assert_trivial=True)
        acc = mma_v2(pa, v, acc * (t_old / t_new)[:, :, None])
        t_i = t_new
        m_i = m_new

    # the warps' states, merged once
    m_all = gl.max(m_i, 0)
    f = gl.exp2(m_i - gl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
    l_all = gl.sum(l_i * f, 0)
    acc_all = gl.sum(acc * (f * t_i)[:, :, None], 0)
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)
    ro = row0 + gl.arange(0, 16, layout=gl.SliceLayout(1, OUT))
    no = gl.arange(0, D, layout=gl.SliceLayout(0, OUT))
    coord = (no & 7) * (D // 8) + (no >> 3)  # value fragment column -> tree coordinate
    out = (pid_bh * S_total + split_offset + pid_s) * M + ro
    gl.store(acc_ptr + out[:, None] * D + coord[None, :], acc_all, mask=ro[:, None] < M)
    r1 = row0 + gl.arange(0, 16, layout=gl.SliceLayout(0, ROWS))
    out1 = (pid_bh * S_total + split_offset + pid_s) * M + r1
    gl.store(m_ptr + out1, m_all, mask=r1 < M)
    gl.store(l_ptr + out1, l_all, mask=r1 < M)
