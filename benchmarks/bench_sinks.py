"""Decode with gpt-oss's sink logits: what the sink costs the sphkv kernels, one command.

    python benchmarks/bench_sinks.py [--points gpt-oss-20b:8:32768,...] [--out DIR]

gpt-oss adds one learned logit per query head to every softmax (transformers' `s_aux`); the sphkv
kernels add it to the combine kernel's normaliser (the torch reference: store.sink_factor). Per point this times,
in one run: the sphkv decode call without and with sinks (CUDA-graph replay, do_bench median,
default configuration) and cuDNN / flash SDPA bf16 without sinks. Dense SDPA has no sink
argument, so its time is a lower bound on dense decode with sinks (gpt-oss's own eager path
materialises the logits). Shape: gpt-oss-20b's attention (64 query heads over 8 KV heads, head
dim 64; its sliding-window layers are not timed here).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench_decode import build_store, dense_decode, graph_of, median_ms
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

SINK_SHAPES = {"gpt-oss-20b": (64, 8, 64)}


def bench_point(name: str, B: int, T: int, opts: SphkvOptions, device, gen) -> dict:
    Hq, Hkv, d = SINK_SHAPES[name]
    row = {"shape": name, "B": B, "T": T}
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
    for be in ("cudnn", "flash"):
        try:
            row[f"{be}_no_sinks_ms"] = dense_decode(q, k, torch.randn_like(k), be)
        except RuntimeError as err:
            row[f"{be}_no_sinks_ms"] = None
            row[f"{be}_error"] = str(err)[:200]
    del k
    torch.cuda.empty_cache()
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    vn = torch.randn_like(kn)
    sinks = torch.randn(Hq, device=device, generator=gen)
    for label, s in (("sphkv_ms", None), ("sphkv_sinks_ms", sinks)):
        def run(s=s):
            return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=vn,
                                  sinks=s)

        run()
        torch.cuda.synchronize()
        row[label] = median_ms(graph_of(run).replay)
    row["sink_overhead"] = row["sphkv_sinks_ms"] / row["sphkv_ms"] - 1
    dense = [row[f"{b}_no_sinks_ms"] for b in ("cudnn", "flash") if row.get(f"{b}_no_sinks_ms")]
    if dense:
        row["sphkv_sinks_vs_best_dense_no_sinks"] = min(dense) / row["sphkv_sinks_ms"]
    del states
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="gpt-oss-20b:1:32768,gpt-oss-20b:8:32768,gpt-oss-20b:8:131072")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": []}
    for point in args.points.split(","):
        name, B, T = point.split(":")
        row = bench_point(name, int(B), int(T), opts, device, gen)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "bench_sinks.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
