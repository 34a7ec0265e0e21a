"""The queries as the split-KV kernels read them, in one launch.

Rows of one KV head's group (row = g·Tq + t), scaled by scale·log2(e) (softmax in base 2), as
float32 [B·Hkv, M, D]; and, for compressed tiers, the same rows times the key codec's forward
rotation. In torch that was a cast, a scale, a matmul and cuBLAS's split-K reduction: four
launches, about 9 us of a B=1 decode step's 93 (H200, session 19's breakdown).

The same work also runs inside exact_and_chunk_partials_kernel (QUERIES, attend's
PLAIN["queries_with_exact"]): extra programs of that launch prepare the queries while the
exact tier's and the chunk's programs read q directly (scaled_query_rows), one launch fewer.

It also clears attend's new_mass [B·Hkv, N] where no utility signal is asked for: as a torch.zeros
of its own, that was one more launch per call (0.7 us and a gap of a B=1 step's 32; session 29).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dependent_launch import after_previous_kernel


@triton.jit
def scaled_query_rows(q_ptr, pid_bh, rows, rmask, cols, scale, Tq, t0, G, Hkv, sqb, sqh, sqt, sqd):
    """Rows g·Tq + t of batch·KV head pid_bh's group (query head h·G + g at position t0 + t),
    columns `cols`, as float32 times `scale`: the rows prepare_query_block writes to qc, bit for
    bit, read straight from q [B, Hq, T, D] by its strides."""
    b = (pid_bh // Hkv).to(tl.int64)  # a long prefill's q can pass 2^31 elements over the batch
    head = (pid_bh % Hkv) * G + rows // Tq
    src = q_ptr + b * sqb + head[:, None] * sqh + (t0 + rows % Tq)[:, None] * sqt
    return tl.load(src + cols[None, :] * sqd, mask=rmask[:, None], other=0.0).to(tl.float32) * scale


@triton.jit
def prepare_query_block(
        q_ptr, kfwd_ptr, qc_ptr, qrot_ptr, mass_ptr, scale, M, Tq, t0, G, Hkv, N, sqb, sqh, sqt, sqd,
        pid_bh, pid_m, pid_c,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr,
        HAS_ROT: tl.constexpr, ZERO_MASS: tl.constexpr):
    """One program's share of prepare_queries_kernel (its docstring), for (pid_bh, pid_m, pid_c)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dst = (pid_bh * M + rows)[:, None] * D
    if HAS_ROT:
        q = scaled_query_rows(q_ptr, pid_bh, rows, rmask, tl.arange(0, D), scale, Tq, t0, G, Hkv, sqb, sqh, sqt, sqd)
    for c0 in tl.static_range(0, COLUMNS, BLOCK_C):
        cols = pid_c * COLUMNS + c0 + tl.arange(0, BLOCK_C)
        qcols = scaled_query_rows(q_ptr, pid_bh, rows, rmask, cols, scale, Tq, t0, G, Hkv, sqb, sqh, sqt, sqd)
        tl.store(qc_ptr + dst + cols[None, :], qcols, mask=rmask[:, None])
        if HAS_ROT:
            d = tl.arange(0, D)
            fwd = tl.load(kfwd_ptr + d[:, None] * D + cols[None, :])
            if BLOCK_M >= 16:
                rot = tl.dot(q, fwd, input_precision="tf32x3")
            else:
                rot = tl.sum(q[:, :, None] * fwd[None, :, :], 1)
            tl.store(qrot_ptr + dst + cols[None, :], rot, mask=rmask[:, None])
    if ZERO_MASS:  # the first program of each batch·KV head zeroes its N entries of mass_ptr
        if pid_m == 0:
            if pid_c == 0:
                for n0 in range(0, N, 128):
                    n = n0 + tl.arange(0, 128)
                    tl.store(mass_ptr + pid_bh * N + n, tl.zeros((128,), tl.float32), mask=n < N)


@triton.jit
def prepare_queries_kernel(
        q_ptr, kfwd_ptr, qc_ptr, qrot_ptr, mass_ptr, scale,
        M, Tq, t0, G, Hkv, N,
        sqb, sqh, sqt, sqd,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr,
        HAS_ROT: tl.constexpr, ZERO_MASS: tl.constexpr, PDL: tl.constexpr):
    """Program (batch·KV head, row block, column block of COLUMNS): rows g·Tq + t of query
    head h·G + g at position t0 + t. qc[.., cols] = q[.., cols]·scale; qrot[.., cols] =
    (q·scale) @ kfwd[:, cols], in float32 FMAs under tl.dot's 16 rows (a decode step's G heads)
    and as a tf32x3 dot (about float32 accuracy on tensor cores) from 16 rows on. PDL: launched
    with programmatic dependent launch (dependent_launch.py)."""
    pid_bh = after_previous_kernel(tl.program_id(0), PDL)
    prepare_query_block(q_ptr, kfwd_ptr, qc_ptr, qrot_ptr, mass_ptr, scale, M, Tq, t0, G, Hkv, N, sqb, sqh, sqt, sqd,
                        pid_bh, tl.program_id(1), tl.program_id(2), D, BLOCK_M, BLOCK_C, COLUMNS, HAS_ROT, ZERO_MASS)
