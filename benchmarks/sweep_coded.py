"""Launch settings of the compressed-tier decode kernel (generated decoders), timed on the GPU.

    python benchmarks/sweep_coded.py [--out DIR]

For each launch setting (kernels.attend.CODED, and COMBINE through combine_<key>): the decode
time of the default configuration (CUDA-graph replay, do_bench median) at the POINTS below,
next to cuDNN SDPA bf16 in the same run. The settings compile in parallel processes first.
Correctness of the chosen setting is checked by bench_decode.py and tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import json
import os

import torch

from bench_decode import sweep_setup, SHAPES, build_store, check_against_reference, dense_decode, graph_of, median_ms
from coded_flags import with_launch_rule
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

# kernels.attend.CODED settings
# (each applied on top of the defaults; sessions 2 and 3 timed programs_per_sm and maxnreg:
# docs/PERFORMANCE_HISTORY.md)
# Session 6 swept min_tiles_per_split (1, 4, 8), programs_per_sm=4 and combine_splits=8; session 7
# the packed 16-bit decoders (then a setting, removed after this sweep: docs/PERFORMANCE_HISTORY.md).
# Session 8 decoding in halves of D (fewer registers), alone, capped at 128 registers, and with four
# blocks per SM (then the default: benchmarks/results/h200_sweep_coded_session8.json). Session 11
# timed joint lookups of two tree levels (slower, removed: docs/PERFORMANCE_HISTORY.md). Session 12 the
# quarters kernel at the default cap, and quarters and halves at 96 registers, five per SM (no
# gain: h200_sweep_coded_session12_quarters.json); now the tables staged in shared memory, with
# halves and with whole tiles (which fit 128 registers unspilled when the lookups need no 64-bit
# addresses).
# Timed: the tables in shared memory, 2-7% faster (the default since); two tokens per thread, so
# the decoded tile is written to shared memory in 16-byte vectors (session 13: slower at B=8, 2-8%
# faster at Llama B=1 only; h200_sweep_coded_session13_two_tokens.json).
# Session 16 timed the tree in float16 pairs (packed, now the default) against the same
# unit-radius kernels with bfloat16 tiles, and packed uncapped at three programs per SM
# (h200_sweep_coded_session16_packed.json). Session 17: two tokens per thread with the packed
# decoders (sm_90 compile, d=128: 2,000-2,100 instructions per token against 2,640 at one, the
# tile written as STS.128). 4 warps uncapped at two per SM was faster at every Llama point
# (B=8 32k 0.401 -> 0.391 ms, B=1 128k 0.303 -> 0.264) and within 1% on SmolLM2
# (h200_sweep_coded_session17_two_tokens_packed.json); 2 warps and quarters at 168 registers were
# slower at B=1. The full benchmark then found SmolLM2 B=32 up to 26% slower
# (h200_bench_decode_session17_two_tokens_all_dims), so two tokens is the default at d=128 only.
# The first row is session 16's default, for comparison.
SETTINGS = [dict(tokens_per_thread=1, maxnreg=128, programs_per_sm=4),
            dict(),
            dict(tokens_per_thread=2, warps=2, maxnreg=0, programs_per_sm=4),
            dict(tokens_per_thread=2, warps=4, quarters=True, maxnreg=168, programs_per_sm=3),
            dict(tokens_per_thread=2, warps=2, quarters=True, maxnreg=168, programs_per_sm=6)]
POINTS = [("llama3-8b", 1, 4096), ("smollm2", 1, 4096), ("llama3-8b", 1, 32768), ("llama3-8b", 8, 32768),
          ("smollm2", 8, 32768), ("llama3-8b", 1, 131072)]
DEFAULTS = dict(kattend.CODED)
COMBINE_DEFAULTS = dict(kattend.COMBINE)


def apply(setting: dict) -> None:
    """CODED keys as they are; combine_<key> sets COMBINE[key]. A setting of warps or
    programs_per_sm holds at every row count (CODED["many_rows"] off unless it sets it too)."""
    kattend.CODED.clear()
    kattend.CODED.update(DEFAULTS, **with_launch_rule({k: v for k, v in setting.items() if not k.startswith("combine_")}))
    kattend.COMBINE.clear()
    kattend.COMBINE.update(COMBINE_DEFAULTS, **{k[8:]: v for k, v in setting.items() if k.startswith("combine_")})


def _store(name, B, T, opts, device, gen):
    Hq, Hkv, d = SHAPES[name]
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    return q, states, specs, kn


def warm(index: int) -> None:
    """Compile one setting's kernels (Triton's disk cache keeps them for the timing process)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    apply(SETTINGS[index])
    for name in SHAPES:
        check_against_reference(name, opts.seed, device, gen)
        q, states, specs, kn = _store(name, 1, 300, opts, device, gen)
        kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn)
    torch.cuda.synchronize()


def main():
    args = sweep_setup(__file__, len(SETTINGS), warm)
    if args is None:
        return
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    rows = []
    stores = {}
    for name, B, T in POINTS:
        Hq, Hkv, d = SHAPES[name]
        q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
        dense = dense_decode(q, k, torch.randn_like(k), "cudnn")
        del k
        _, states, specs, kn = _store(name, B, T, opts, device, gen)
        stores[(name, B, T)] = (q, states, specs, kn, dense)
    for setting in SETTINGS:
        apply(setting)
        row = dict(setting)
        try:
            for name in SHAPES:  # every default tier against the float64 reference
                row[f"ref_err_{name}"] = check_against_reference(name, opts.seed, device, gen)
            for name, B, T in POINTS:
                q, states, specs, kn, dense = stores[(name, B, T)]

                def run():
                    return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn,
                                          v_new=kn)
                run()
                torch.cuda.synchronize()
                ms = median_ms(graph_of(run).replay)
                row[f"{name}_B{B}_T{T}"] = {"ms": ms, "cudnn_ms": dense, "speedup": dense / ms}
        except Exception as err:  # a setting that does not compile is reported, not fatal
            row["error"] = repr(err)[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(args.out, "sweep_coded.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
