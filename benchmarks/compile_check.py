"""Compile the kernels for sm_90 without a GPU (Triton's bundled ptxas) and print each one's
registers, spills and shared memory: catches compile errors and register pressure at no
device time.  python benchmarks/compile_check.py
"""
from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sphkv_compile.kernels.attention_kernels import combine_kernel, paged_partials_kernel
from sphkv_compile.kernels.encode_kernels import encode_kv_kernel
from sphkv_compile.kernels.layout import tier_info
from sphkv_compile.radius import LOG2_MIN
from sphkv_compile.tiers import TierSpec

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, sig, consts, num_warps=4, num_stages=2):
    src = ASTSource(fn, sig, consts)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    md = k.metadata
    return k, getattr(md, "shared", None), k.n_regs if hasattr(k, "n_regs") else None


def paged_signature(fn, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("q_ptr", "acc_ptr", "m_ptr", "l_ptr", "ktab_ptr", "vtab_ptr") else "*i32"
        else:
            sig[name] = "i32"
    return sig


def main(d=128, block_t=64, block_m=16, warps=4, stages=2):
    spec = TierSpec("uniform", 3.5, "polar", 3.5)
    info = tier_info(spec, d, 0, torch.bfloat16)
    consts = dict(PS=64, WT=info.key_words + info.value_words, VOFF=info.key_words, D=d, BLOCK_M=block_m,
                  BLOCK_T=block_t, EXACT=False, VALUE_SCALAR=False, K_LEVELS=info.key.levels,
                  K_COUNTS=info.key.fields.counts, K_MAXC=info.key.fields.max_comps, K_TSIZE=info.key.table_size,
                  V_LEVELS=info.value.levels, V_COUNTS=info.value.fields.counts, V_MAXC=info.value.fields.max_comps,
                  V_TSIZE=info.value.table_size, STEP=info.key.radius_step, LOG2_MIN=LOG2_MIN, DOT_PRECISION="tf32")
    k = triton.compile(ASTSource(paged_partials_kernel, paged_signature(paged_partials_kernel, consts), consts),
                       target=TARGET, options={"num_warps": warps, "num_stages": stages})
    asm = k.asm
    print("paged_partials", d, block_t, warps, "shared", k.metadata.shared)
    ptx = asm["ptx"]
    print(" ptx lines", ptx.count("\n"), "ld.global", ptx.count("ld.global"), "mma", ptx.count("mma."),
          "shfl", ptx.count("shfl"), "bar.sync", ptx.count("bar.sync"), "st.shared", ptx.count("st.shared"),
          "ld.shared", ptx.count("ld.shared"))
    return k


if __name__ == "__main__":
    import sys
    k = main(*[int(a) for a in sys.argv[1:]])
