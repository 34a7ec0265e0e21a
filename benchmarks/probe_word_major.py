"""Word-major pages for the compressed tiers, timed against today's record-major pages.

    python benchmarks/probe_word_major.py [--out DIR]

A record-major page is [page_size, words]: a warp's 16-byte load of word group j touches one L1
line per token (32 lines), and ncu counts these loads as about a quarter of the decode kernel's
L1 wavefronts (h200_session22_ncu_siblings: 16.8 M global sectors beside 48.9 M shared
wavefronts). A word-major page is [words, page_size]: a warp's load of word j covers 32
consecutive tokens, one or two lines. The store's pools keep their [pages, page_size, words]
shape; only the storage order changes (a transposed view), which kernels.attend reads from the
strides. For each point: the decode time (CUDA-graph replay, do_bench median) both ways, cuDNN
bf16 in the same run, and the largest difference between the two outputs (the same arithmetic
on the same records, so it should be 0).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench_decode import SHAPES, build_store, dense_decode, graph_of, median_ms
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

POINTS = [("llama3-8b", 1, 4096), ("llama3-8b", 1, 32768), ("llama3-8b", 8, 32768), ("llama3-8b", 32, 32768),
          ("llama3-8b", 8, 131072), ("smollm2", 1, 4096), ("smollm2", 8, 32768), ("smollm2", 32, 32768)]


def to_word_major(states) -> None:
    """Every compressed tier's pool as a [pages, page_size, words] view of [pages, words,
    page_size] storage (the exact tier keeps record-major rows: its kernel reads D-wide rows)."""
    for st in states[1:]:
        st.pool = st.pool.transpose(1, 2).contiguous().transpose(1, 2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    result = {"device": torch.cuda.get_device_name(device), "rows": []}
    for name, B, T in POINTS:
        Hq, Hkv, d = SHAPES[name]
        q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
        dense = dense_decode(q, k, torch.randn_like(k), "cudnn")
        del k
        specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
        states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
        kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)

        def run():
            return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn)[0]

        row = {"shape": name, "B": B, "T": T, "cudnn_ms": dense}
        base = run().clone()
        row["record_major_ms"] = median_ms(graph_of(run).replay)
        to_word_major(states)
        got = run()
        row["max_abs_diff"] = float((got.float() - base.float()).abs().max())
        row["word_major_ms"] = median_ms(graph_of(run).replay)
        row["speedup"] = row["record_major_ms"] / row["word_major_ms"]
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        del states
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_word_major.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
