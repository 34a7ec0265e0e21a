"""Markdown tables from a bench_decode.py JSON result (so docs/PERFORMANCE.md is never typed).

    python benchmarks/report.py benchmarks/results/h100_bench_decode_final.json
"""
from __future__ import annotations

import json
import sys


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def tables(result: dict) -> str:
    lines = [f"Device: **{result['device']}**, torch {result['torch']}, triton {result['triton']}. "
             f"Copy bandwidth measured in the same run: **{result['copy_GBs']:.0f} GB/s** (read + write).", ""]
    if "rel_err_vs_float64" in result:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in result["rel_err_vs_float64"].items())
        lines += [f"Kernels vs float64 reference before timing (bf16 output, every default tier): {errs}.", ""]
    lines += ["| shape | values | B | T | cuDNN ms | flash ms | sphkv ms (graph) | sphkv ms (eager) | dense MB | "
              "compressed MB | sphkv GB/s | speedup | target |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["decode"]:
        lines.append(f"| {r['shape']} | {r['value_codec']} | {r['B']} | {r['T']} | {fmt(r.get('cudnn_ms'))} | "
                     f"{fmt(r.get('flash_ms'))} | {fmt(r['sphkv_ms'])} | {fmt(r['sphkv_eager_ms'])} | "
                     f"{r['dense_MB']:.0f} | {r['compressed_MB']:.1f} | {r['sphkv_GBs']:.0f} | "
                     f"{fmt(r.get('speedup'), '.2f')} | {fmt(r.get('target_speedup'), '.2f')} |")
    e = result.get("encode")
    if e:
        lines += ["", f"Encode (K and V of one Llama-3-8B layer, 8 KV heads, d=128, {e['T']} tokens, fused kernel): "
                  f"**{e['encode_ms']:.3f} ms** ({e['encode_Mtok_per_s']:.0f} M head-tokens/s, "
                  f"{e['input_GBs']:.0f} GB/s of bf16 input); dense causal SDPA prefill of that layer "
                  f"{e['prefill_ms']:.3f} ms; ratio **{e['encode_over_prefill']:.3f}** (target <= 0.10)."]
    if result.get("sweep"):
        lines += ["", "| sweep shape | B | T | BLOCK_T | warps | stages | precision | ms |", "|---|---:|---:|---:|---:|---:|---|---:|"]
        for s in result["sweep"]:
            if "ms" in s:
                lines.append(f"| {s['shape']} | {s['B']} | {s['T']} | {s['block_t']} | {s['warps']} | {s['stages']} | "
                             f"{s['precision']} | {s['ms']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
