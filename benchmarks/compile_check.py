"""Compile the kernels for sm_90 without a GPU (Triton's bundled ptxas) and print each one's
registers, spills and shared memory: catches compile errors and register pressure at no
device time.

    python benchmarks/compile_check.py all                       every kernel at d=64 and 128
    python benchmarks/compile_check.py fragment [D] [decode] [MAXNREG] [PDL]
        the Gluon fragment kernel of the default tier (decode 1: paged_fragment_decode_kernel,
        the default; 0: the 16-row kernel; PDL 1: as launched with programmatic dependent
        launch), with its loop body's opcodes
"""
from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sphkv_compile.kernels.attend import COMBINE, _small_kernel_warps
from sphkv_compile.kernels.attention_kernels import paged_partials_kernel
from sphkv_compile.kernels.combine_kernels import combine_kernel
from sphkv_compile.kernels.encode_kernels import encode_kv_kernel
from sphkv_compile.kernels.query_kernels import prepare_queries_kernel
from sphkv_compile.kernels.layout import tier_info
from sphkv_compile.radius import LOG2_MIN
from sphkv_compile.tiers import TierSpec

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, sig, consts, num_warps=4, num_stages=2):
    src = ASTSource(fn, sig, consts)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    md = k.metadata
    return k, getattr(md, "shared", None), k.n_regs if hasattr(k, "n_regs") else None


def sass_summary(k):
    """Registers, stack and the most frequent SASS opcodes (Triton's bundled cuobjdump)."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    full = collections.Counter(m.group(1) for m in
                               re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    ops = collections.Counter()
    for op, n in full.items():
        ops[op.split(".")[0]] += n
    print(" ", [l.strip() for l in usage.splitlines() if "REG" in l], sum(ops.values()), ops.most_common(12))
    # shared-memory stores by width (the decoded tiles' way into the MMA layout) and spills
    print("  stores/spills:", {op: n for op, n in sorted(full.items()) if op.split(".")[0] in ("STS", "STL", "LDL")})
    print("  largest loop body:", loop_body_size(sass), "instructions")


def loop_body(sass: str) -> list[tuple[str, str]]:
    """(opcode, operands) of the instructions between the target of the longest backward branch
    and the branch itself."""
    import re

    addrs = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);", sass):
        addrs.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best = []
    for addr, op, args in addrs:
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = [(o, a) for x, o, a in addrs if int(target.group(1), 16) <= x <= addr]
            best = max(best, body, key=len)
    return best


def loop_body_size(sass: str) -> int:
    """Instructions between the target of the longest backward branch and the branch itself."""
    return len(loop_body(sass))


def fragment(d=128, decode=1, maxnreg=0, pdl=0):
    """The default tier's Gluon fragment kernel for sm_90: registers, loop size and the loop's
    opcodes (full names: LOP3.LUT, SHF.R.U32.HI, LDS.U16 ...), most frequent first."""
    import collections
    import os
    import subprocess
    import tempfile

    from sphkv_compile.kernels import fragment_launch

    key = "decode_maxnreg" if decode else "maxnreg"
    saved = fragment_launch.FRAGMENT[key]
    if maxnreg:
        fragment_launch.FRAGMENT[key] = {d: maxnreg}
    try:
        info = tier_info(TierSpec("uniform", 3.5, "polar", 3.5), d, 0, torch.bfloat16)
        k = fragment_launch.compile_for_target(info, d, decode=bool(decode), pdl=bool(pdl))
        options = fragment_launch.launch_options(d, bool(decode))
    finally:
        fragment_launch.FRAGMENT[key] = saved
    print("decode kernel" if decode else "16-row kernel", f"d={d}", options)
    sass_summary(k)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(op for op, _ in loop_body(sass))
    print("  loop opcodes:", ", ".join(f"{op} {n}" for op, n in ops.most_common()))
    return k


def pointer_alignment(fn, sig) -> dict:
    """The 16-byte alignment the JIT assumes of every tensor argument at launch (torch
    allocations are aligned), so vector loads compile as they would on the GPU. (The JIT also
    marks integer arguments divisible by 16; those are left unmarked here.)"""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig.get(name, "").startswith("*")}


def paged_signature(fn, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            tables = "*i64" if any(c.startswith("DECODE_K") for c in consts) else "*fp32"  # (cos, sin) pairs for the generated decoders
            sig[name] = ("*fp32" if name in ("q_ptr", "acc_ptr", "m_ptr", "l_ptr")
                         else tables if name in ("ktab_ptr", "vtab_ptr") else "*i32")
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
                  V_TSIZE=info.value.table_size, K_WIDTHS=info.key.fields.widths, V_WIDTHS=info.value.fields.widths, STEP=info.key.radius_step, LOG2_MIN=LOG2_MIN, DOT_PRECISION="tf32",
                  PDL=0)
    sig = paged_signature(paged_partials_kernel, consts)
    k = triton.compile(ASTSource(paged_partials_kernel, sig, consts, pointer_alignment(paged_partials_kernel, sig)),
                       target=TARGET, options={"num_warps": warps, "num_stages": stages})
    asm = k.asm
    print("paged_partials", d, block_t, warps, "shared", k.metadata.shared)
    sass_summary(k)
    ptx = asm["ptx"]
    print(" ptx lines", ptx.count("\n"), "ld.global", ptx.count("ld.global"), "mma", ptx.count("mma."),
          "shfl", ptx.count("shfl"), "bar.sync", ptx.count("bar.sync"), "st.shared", ptx.count("st.shared"),
          "ld.shared", ptx.count("ld.shared"))
    return k


def coded(d=128, block_t=128, block_m=16, warps=4, stages=1, bf16=1, maxnreg=0, halves=0, shared=0, packed=0,
          scalar=0):
    """The compressed-tier paged kernel with the generated decoders, default tier (halves=1:
    paged_coded_halves_kernel, keys and values decoded in two halves of D; 4: in quarters,
    paged_coded_quarters_kernel; shared=1: the tables staged in shared memory; packed=1 (with
    shared): float16-pair tables, f16x2 trees and float16 tiles; scalar=1: the 3-bit scalar value
    codec, whose decoder has no packed form)."""
    import triton.language as tl

    from sphkv_compile.kernels.attention_kernels import (paged_coded_halves_kernel, paged_coded_kernel,
                                                         paged_coded_quarters_kernel, tables_stay_in_global_memory)
    from sphkv_compile.kernels.decode_codegen import decoder, staged_offsets, stager

    spec = TierSpec("uniform", 3.5, "scalar", 3) if scalar else TierSpec("uniform", 3.5, "polar", 3.5)
    info = tier_info(spec, d, 0, torch.bfloat16)
    packed = bool(packed and shared)
    tile = tl.float16 if packed else tl.bfloat16 if bf16 else tl.float32
    leaf = {tl.float16: "tl.float16", tl.bfloat16: "tl.bfloat16"}.get(tile)
    wt = info.key_words + info.value_words
    ksm, vsm = staged_offsets(info.key, packed) if shared else (None, None)
    consts = dict(PS=64, WT=wt, D=d, BLOCK_M=block_m, BLOCK_T=block_t, STEP=info.key.radius_step,
                  LOG2_MIN=LOG2_MIN, DOT_PRECISION="tf32", TILE_DTYPE=tile,
                  STAGE_TABLES=stager(info.key, info.value, packed) if shared else tables_stay_in_global_memory)

    def key(*part):
        return decoder(info.key, 0, wt, leaf, *part, smem=ksm, packed=packed)

    def value(*part):
        return decoder(info.value, info.key_words, wt, leaf, *part, smem=vsm, packed=packed and not scalar)

    if halves == 4:  # quarters of D
        fn = paged_coded_quarters_kernel
        consts.update({f"DECODE_{c}{i}": f(i, 4) for c, f in (("K", key), ("V", value)) for i in range(4)})
    elif halves:
        fn = paged_coded_halves_kernel
        consts.update(DECODE_K=key(0), DECODE_K2=key(1), DECODE_V=value(0), DECODE_V2=value(1))
    else:
        fn = paged_coded_kernel
        consts.update(DECODE_K=key(), DECODE_V=value())
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    sig = paged_signature(fn, consts)
    k = triton.compile(ASTSource(fn, sig, consts, pointer_alignment(fn, sig)), target=TARGET, options=options)
    print(fn.__name__, d, block_t, warps, "shared", k.metadata.shared)
    sass_summary(k)
    return k


def compile_all(d=128):
    """Every kernel once, for sm_90 (compile errors and shared memory, no GPU needed)."""
    from sphkv_compile.kernels.attention_kernels import (chunk_partials_kernel, exact_and_chunk_partials_kernel,
                                                         paged_mass_kernel)
    from sphkv_compile.kernels.compaction import compact_rows_kernel
    from sphkv_compile.kernels.layout import radius_round_offset

    from sphkv_compile.kernels.encode import _launch_shape

    ENCODE_BLOCK_T, encode_warps, _ = _launch_shape(d, True)  # as the wrapper launches 16-bit K/V
    spec = TierSpec("uniform", 3.5, "polar", 3.5)
    info = tier_info(spec, d, 0, torch.bfloat16)
    sc = tier_info(TierSpec("s", 3.5, "scalar", 3), d, 0, torch.bfloat16)
    key, val = info.key, info.value
    jobs = {
        "encode_polar": (encode_kv_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*i32", "kfwd_ptr": "*bf16",
                                            "vfwd_ptr": "*bf16", "kscale": "fp32", "vscale": "fp32", "pages_ptr": "*i32"},
                         dict(D=d, BLOCK_T=ENCODE_BLOCK_T, KW=info.key_words, VW=info.value_words, KWPAD=16, VWPAD=16,
                              VALUE_SCALAR=False, K_LEVELS=key.levels, K_BITS=key.bits, K_COUNTS=key.fields.counts,
                              K_MAXC=key.fields.max_comps, K_TSIZE=key.table_size, V_LEVELS=val.levels, K_WIDTHS=key.fields.widths,
                              V_WIDTHS=val.fields.widths,
                              V_BITS=val.bits, V_COUNTS=val.fields.counts, V_MAXC=val.fields.max_comps,
                              V_TSIZE=val.table_size, STEP=key.radius_step, ROUND_OFFSET=radius_round_offset(16), SIGNS=True,
                              EMULATE_BF16_DOT=False, FROM_EXACT=False, E_PS=1, HALF_E=1, SPLIT_KV=False)),
        "encode_scalar": (encode_kv_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*i32", "kfwd_ptr": "*bf16",
                                             "vfwd_ptr": "*bf16", "kscale": "fp32", "vscale": "fp32", "pages_ptr": "*i32"},
                          dict(D=d, BLOCK_T=ENCODE_BLOCK_T, KW=sc.key_words, VW=sc.value_words, KWPAD=16, VWPAD=16,
                               VALUE_SCALAR=True, K_LEVELS=key.levels, K_BITS=key.bits, K_COUNTS=key.fields.counts,
                               K_MAXC=key.fields.max_comps, K_TSIZE=key.table_size, V_LEVELS=0, K_WIDTHS=key.fields.widths,
                               V_WIDTHS=sc.value.fields.widths,
                               V_BITS=sc.value.bits, V_COUNTS=sc.value.fields.counts,
                               V_MAXC=sc.value.fields.max_comps, V_TSIZE=1, STEP=key.radius_step,
                               ROUND_OFFSET=radius_round_offset(16), SIGNS=True,
                              EMULATE_BF16_DOT=False, FROM_EXACT=False, E_PS=1, HALF_E=1, SPLIT_KV=False)),
        "chunk": (chunk_partials_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "valid_ptr": "*i8"},
                  dict(D=d, BLOCK_M=16, BLOCK_T=64, HAS_VALID=True, DOT_PRECISION="tf32", PDL=0)),
        "exact_and_chunk": (exact_and_chunk_partials_kernel,
                            {"pool_ptr": "*bf16", "pages_ptr": "*i32", "count_ptr": "*i32", "k_ptr": "*bf16",
                             "v_ptr": "*bf16", "valid_ptr": "*i8"},
                            dict(PS=64, WT=2 * d, VOFF=d, D=d, BLOCK_M=16, BLOCK_T=64, HAS_VALID=False,
                                 DOT_PRECISION="tf32", PDL=0, QUERIES=False, QBLOCK_M=1, QBLOCK_C=1, QCOLUMNS=1,
                                 HAS_ROT=False, ZERO_MASS=False)),
        # the same launch preparing a decode step's queries too (attend.PLAIN["queries_with_exact"])
        "exact_and_chunk_queries": (exact_and_chunk_partials_kernel,
                                    {"pool_ptr": "*bf16", "pages_ptr": "*i32", "count_ptr": "*i32", "k_ptr": "*bf16",
                                     "v_ptr": "*bf16", "valid_ptr": "*i8", "qsrc_ptr": "*bf16", "q_scale": "fp32"},
                                    dict(PS=64, WT=2 * d, VOFF=d, D=d, BLOCK_M=16, BLOCK_T=64, HAS_VALID=False,
                                         DOT_PRECISION="tf32", PDL=0, QUERIES=True, QBLOCK_M=4,
                                         QBLOCK_C=COMBINE["columns"], QCOLUMNS=COMBINE["columns"], HAS_ROT=True,
                                         ZERO_MASS=True)),
        # a prefill block (16 rows, tl.dot rotation) and a decode step of Llama-3-8B (4 rows, FMAs)
        "combine": (combine_kernel, {"out_ptr": "*bf16"},
                    dict(D=d, BLOCK_M=16, HAS_ROT=True, BLOCK_S=COMBINE["splits"], BLOCK_C=COMBINE["columns"],
                         COLUMNS=d, HAS_SINKS=False, PDL=0)),
        "combine_decode": (combine_kernel, {"out_ptr": "*bf16"},
                           dict(D=d, BLOCK_M=4, HAS_ROT=True, BLOCK_S=COMBINE["splits"] * 4, BLOCK_C=COMBINE["columns"],
                                COLUMNS=COMBINE["columns"], HAS_SINKS=False, PDL=0)),
        "queries": (prepare_queries_kernel, {"q_ptr": "*bf16", "scale": "fp32"},
                    dict(D=d, BLOCK_M=16, BLOCK_C=COMBINE["columns"], COLUMNS=d, HAS_ROT=True, ZERO_MASS=False, PDL=0)),
        "queries_decode": (prepare_queries_kernel, {"q_ptr": "*bf16", "scale": "fp32"},
                           dict(D=d, BLOCK_M=4, BLOCK_C=COMBINE["columns"], COLUMNS=COMBINE["columns"], HAS_ROT=True,
                                ZERO_MASS=True, PDL=0)),
        "mass": (paged_mass_kernel, {"pool_ptr": "*i32", "pages_ptr": "*i32", "count_ptr": "*i32",
                                     "util_ptr": "*fp16", "kcomps_ptr": "*i32"},
                 dict(PS=64, WT=28, D=d, BLOCK_R=16, BLOCK_T=64, EXACT=False, K_LEVELS=key.levels,
                      K_WIDTHS=key.fields.widths,
                      K_COUNTS=key.fields.counts, K_MAXC=key.fields.max_comps, K_TSIZE=key.table_size,
                      STEP=key.radius_step, LOG2_MIN=LOG2_MIN, DOT_PRECISION="tf32")),
        "compact": (compact_rows_kernel, {"pool_ptr": "*i32", "util_ptr": "*fp16", "pages_ptr": "*i32",
                                          "count_ptr": "*i32", "keep_ptr": "*i8", "rank_ptr": "*i32"},
                    dict(W=28, WPAD=32, PS=64, BLOCK_T=64)),
    }
    # a decode step's chain as attend launches it with programmatic dependent launch (2: releasing
    # the next kernel early, 1: waiting only; dependent_launch.mode)
    for name, pdl in (("chunk", 2), ("combine_decode", 1), ("queries_decode", 1)):
        fn, ptrs, consts = jobs[name]
        jobs[name + "_pdl"] = (fn, ptrs, {**consts, "PDL": pdl})
    for name in ("encode_polar", "encode_scalar"):  # a decode step's graduating token (decode_update.py)
        fn, ptrs, consts = jobs[name]
        jobs[name + "_decode"] = (fn, ptrs, {**consts, "FROM_EXACT": True, "E_PS": 64, "HALF_E": d,
                                             "SPLIT_KV": True, "BLOCK_T": 16})
    for name, (fn, ptrs, consts) in jobs.items():
        sig = {a: ("constexpr" if a in consts else ptrs.get(a, "*i32" if "comps" in a else "*fp32") if a.endswith("_ptr")
                   else ptrs.get(a, "i32")) for a in fn.arg_names}
        try:
            warps = {"combine": _small_kernel_warps(16, d), "combine_decode": _small_kernel_warps(4, d),
                     "queries": _small_kernel_warps(16, d), "queries_decode": _small_kernel_warps(4, d),
                     "encode_polar": encode_warps,
                     "encode_scalar": encode_warps}.get(name.removesuffix("_pdl").removesuffix("_decode"), 4)
            k = triton.compile(ASTSource(fn, sig, consts, pointer_alignment(fn, sig)), target=TARGET,
                               options={"num_warps": warps, "num_stages": 1})
            print(name, "ok, shared", k.metadata.shared)
            sass_summary(k)
        except Exception as err:
            print(name, "FAILED", str(err)[-1500:])


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["coded"]:
        coded(*[int(a) for a in sys.argv[2:]])
    elif sys.argv[1:2] == ["fragment"]:
        fragment(*[int(a) for a in sys.argv[2:]])
    elif sys.argv[1:] == ["all"]:
        compile_all(64)
        compile_all(128)
    else:
        main(*[int(a) for a in sys.argv[1:]])

