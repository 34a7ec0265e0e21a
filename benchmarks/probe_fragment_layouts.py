"""Can a decoded tile reach the tensor cores without a trip through shared memory? Compile-only
probe (sm_90, no GPU needed), in Gluon, Triton's explicit-layout dialect:

    python benchmarks/probe_fragment_layouts.py

Today's kernels decode a token per thread and hand the [tokens, D] tile to tl.dot, which writes
it to shared memory and reads it back with ldmatrix: in session 22's ncu, 27 M of the kernel's
64 M L1 wavefronts at Llama B=8 32k. The rotated domain lets the kernel number the coordinates
as it likes (q is rotated the same way), so each lane can own the coordinates that mma_v2's
operand layout gives it, provided they form a subtree of the polar tree:
- keys, the B operand of q @ k^T ([D, tokens]): a lane holds one token and 32 of its D=128
  coordinates, the ones whose k index has bits 1-2 equal to the lane's bits 0-1. Number the
  coordinates so those are one of the root's four grandchildren's subtrees: per token 4 lanes
  x (31 subtree nodes + 2 on the path) = 132 node products against the tree's 127.
- values, the B operand of p @ v ([tokens, D]), with each warp on its own tokens (a batched
  mma): a lane holds 16 coordinates of 4 tokens per 16-token chunk, a 16-leaf subtree: 8 lanes
  x (15 + 3 on the path) = 144 node products per token.
Each kernel below builds its operand with the decoders' own construction (per-leaf vectors
joined in registers, then permuted and reshaped into that numbering) from stand-in leaves, and
converts it to the mma operand layout with convert_layout(assert_trivial=True), so the compile
itself proves that the conversion moves no data between threads; it prints the kernel's shared
memory (0: no round trip; the exit status counts the kernels that use any). Results: docs/PERFORMANCE_HISTORY.md, session 23.
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

try:
    from triton.experimental.gluon import GluonASTSource
except ImportError:  # Triton 3.6
    from triton.experimental.gluon._runtime import GluonASTSource



@gluon.jit
def _leaves_to_subtree(x):
    """Five joins of stand-in leaves (the decoders build a tile the same way): [..., 2, 2, 2, 2,
    2] in registers, the last axis the lowest leaf bit."""
    j = gl.join(x, x * 2.0)
    j = gl.join(j, j * 3.0)
    j = gl.join(j, j * 5.0)
    j = gl.join(j, j * 7.0)
    return j


@gluon.jit
def keys_probe(q_ptr, w_ptr, out_ptr, T: gl.constexpr, D: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # (token, subtree): lane bits 0-1 the subtree, 2-4 the token, warps the rest of the tokens
    lanes: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[8, 4], warps_per_cta=[4, 1],
                                           order=[1, 0])
    t = gl.arange(0, T, layout=gl.SliceLayout(1, lanes))
    s = gl.arange(0, 4, layout=gl.SliceLayout(0, lanes))
    x = gl.load(w_ptr + t[:, None] * 4 + s[None, :]).to(gl.float16)
    j = gl.join(_leaves_to_subtree(x), _leaves_to_subtree(x) * 11.0)  # 32 leaves: [T, 4, b4, b3, b2, b1, b0]
    # k index bits: 0 = leaf b0, 1-2 = subtree, 3-6 = leaf b1-b4
    k = gl.reshape(gl.permute(j, 0, 2, 3, 4, 5, 1, 6), [T, D])
    kT = gl.convert_layout(gl.permute(k, 1, 0), b_layout, assert_trivial=True)
    m = gl.arange(0, 16, layout=gl.SliceLayout(1, a_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, a_layout))
    q = gl.load(q_ptr + m[:, None] * D + d[None, :])
    s_acc = mma_v2(q, kT, gl.zeros([16, T], gl.float32, mma))
    mo = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    to = gl.arange(0, T, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + mo[:, None] * T + to[None, :], s_acc)


@gluon.jit
def values_probe(p_ptr, w_ptr, out_ptr, TW: gl.constexpr, D: gl.constexpr):
    # each warp multiplies its own tokens' probabilities by their values (batched over warps)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8])
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # (warp, token, subtree): token bit 0 in registers, bits 1-2 lane bits 0-1, bit 3 registers;
    # lane bits 2-4 the subtree
    lanes: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 2, 1], threads_per_warp=[1, 4, 8],
                                           warps_per_cta=[4, 1, 1], order=[1, 2, 0])
    wi = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, lanes)))
    t = gl.arange(0, TW, layout=gl.SliceLayout(0, gl.SliceLayout(2, lanes)))
    s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, lanes)))
    x = gl.load(w_ptr + (wi[:, None, None] * TW + t[None, :, None]) * 8 + s[None, None, :]).to(gl.float16)
    j = _leaves_to_subtree(x)  # 16 leaves: [4, TW, 8, b3, b2, b1, b0]
    # n index (d) bits: 0-2 = subtree, 3-6 = leaf b0-b3
    v = gl.reshape(gl.permute(j, 0, 1, 3, 4, 5, 6, 2), [4, TW, D])
    v = gl.convert_layout(v, b_layout, assert_trivial=True)
    pw = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, a_layout)))
    pm = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, a_layout)))
    pk = gl.arange(0, TW, layout=gl.SliceLayout(0, gl.SliceLayout(1, a_layout)))
    p = gl.load(p_ptr + (pw[:, None, None] * 16 + pm[None, :, None]) * TW + pk[None, None, :])
    acc = mma_v2(p, v, gl.zeros([4, 16, D], gl.float32, mma))
    ow = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))
    om = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))
    od = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))
    gl.store(out_ptr + (ow[:, None, None] * 16 + om[None, :, None]) * D + od[None, None, :], acc)


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, fn, sig, consts in (
            ("keys", keys_probe, {"q_ptr": "*fp16", "w_ptr": "*fp32", "out_ptr": "*fp32"}, {"T": 32, "D": 128}),
            ("values", values_probe, {"p_ptr": "*fp16", "w_ptr": "*fp32", "out_ptr": "*fp32"}, {"TW": 16, "D": 128})):
        kernel = triton.compile(GluonASTSource(fn, sig, consts), target=target,
                                options={"num_warps": 4})
        shared = kernel.metadata.shared
        failed += shared != 0
        print(f"{name}: Triton {triton.__version__}, shared memory {shared} bytes, conversion to the mma "
              "operand proven trivial (assert_trivial)")
    return failed


if __name__ == "__main__":
    sys.exit(main())
