"""The fragment kernel against the Triton kernels at a few decode points, same store, same run:
    python benchmarks/probe_fragment_launch.py [--out DIR]"""
from __future__ import annotations

import json
import os
import sys

import torch

from bench_decode import SHAPES, build_store, dense_decode, graph_of, median_ms
from sphkv_compile.kernels import attend as kattend, fragment_launch
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

POINTS = [("llama3-8b", 8, 32768), ("llama3-8b", 1, 32768), ("smollm2", 8, 32768)]
SETTINGS = {"triton": dict(enabled=False), "fragment_ct32": dict(enabled=True, tokens_per_warp=32),
            "fragment_ct16": dict(enabled=True, tokens_per_warp=16)}


def main():
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    rows = []
    for name, B, T in POINTS:
        Hq, Hkv, d = SHAPES[name]
        q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
        row = {"shape": name, "B": B, "T": T, "cudnn_ms": dense_decode(q, k, torch.randn_like(k), "cudnn")}
        del k
        specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
        states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
        kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        base = None
        for label, setting in SETTINGS.items():
            saved = dict(fragment_launch.FRAGMENT)
            fragment_launch.FRAGMENT.update(setting)
            try:
                def run():
                    return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn,
                                          v_new=kn)[0]
                out = run().float()
                base = out if base is None else base
                row[label + "_diff"] = float((out - base).abs().max() / base.abs().max())
                row[label + "_ms"] = median_ms(graph_of(run).replay)
            finally:
                fragment_launch.FRAGMENT.clear()
                fragment_launch.FRAGMENT.update(saved)
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(os.environ.get("OUT", "."), "probe_fragment_launch.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
