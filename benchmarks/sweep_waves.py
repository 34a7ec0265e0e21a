"""Split counts of the compressed-tier decode kernel, timed on the GPU: does a partial last wave
of programs cost time?

    python benchmarks/sweep_waves.py [--out DIR]

Until session 15 the launch asked for four programs per SM and rounded the splits per row up,
so a Llama-3-8B B=8 decode (64 rows) launched 64 x 9 = 576 programs where 132 SMs x 4 = 528 fit
at once (ncu: 1.09 waves); kernels.attend._balanced_splits now picks the split count. For each
point this times the whole attend call (CUDA-graph replay, do_bench median) under the default
("balanced"), the rule before it ("round_up", CODED["balance_waves"] off) and forced split
counts, with cuDNN SDPA bf16 in the same run, and reports each output's relative difference
from the first candidate's.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench_decode import dense_decode, graph_of, median_ms
from sweep_coded import _store
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.options import SphkvOptions

# (shape, B, T, candidates: "balanced", "round_up" or a split count per row to force). Session 15's
# first run forced 6-16 splits at Llama B=8 32k, 1-4 at B=32, 8/9/16 at B=8 128k, 16/33/66 at B=1,
# 11-44 at SmolLM2 B=8 and 4-11 at B=32 (h200_session15_sweep_waves_forced.log).
POINTS = [("llama3-8b", 8, 32768, ["balanced", "round_up", 8, 16]),
          ("llama3-8b", 32, 32768, ["balanced", "round_up", 4]),
          ("llama3-8b", 8, 131072, ["balanced", "round_up", 16]),
          ("llama3-8b", 16, 32768, ["balanced", "round_up", 8]),
          ("llama3-8b", 2, 32768, ["balanced", "round_up", 33]),
          ("smollm2", 32, 32768, ["balanced", "round_up", 4, 8]),
          ("smollm2", 64, 32768, ["balanced", "round_up", 2, 3])]


def use(candidate) -> None:
    """Launch the compressed tier under the default rule, the old one, or a forced split count."""
    kattend.CODED["balance_waves"] = candidate == "balanced"
    kattend._coded_programs = DEFAULT_PROGRAMS if isinstance(candidate, str) else (lambda wanted, rows, D, per_sm: rows * candidate)


DEFAULT_PROGRAMS = kattend._coded_programs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    rows = []
    for name, B, T, candidates in POINTS:
        q, states, specs, kn = _store(name, B, T, opts, device, gen)
        k = torch.randn(B, kn.shape[1], T, q.shape[-1], device=device, dtype=torch.bfloat16, generator=gen)
        cudnn = dense_decode(q, k, torch.randn_like(k), "cudnn")
        del k
        reference = None
        for splits in candidates:
            use(splits)

            def run():
                return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn)[0]

            out = run().float()
            reference = out if reference is None else reference
            ms = median_ms(graph_of(run).replay)
            row = {"shape": name, "B": B, "T": T, "splits": splits, "ms": ms, "cudnn_ms": cudnn,
                   "rel_diff_vs_default": float((out - reference).norm() / reference.norm())}
            rows.append(row)
            print(json.dumps(row), flush=True)
        use("balanced")
        del states
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "sweep_waves.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
