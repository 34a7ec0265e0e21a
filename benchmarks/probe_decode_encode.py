"""A decode step's encode of the graduating token (encode.encode_exact_slot, one token per batch
row and KV head) under launch settings of encode.ENCODE_DECODE_STEP: warps, and keys and values
in one program or two. Each setting is timed as CUDA-graph replays of `--calls` encodes in a
row (as a step's layers run them), reported per call, with its records checked equal to the
default setting's.

    python benchmarks/probe_decode_encode.py [--out DIR]

Session 30's profile of a generate() step (profile_e2e_step.py) had this kernel at 21 us per
layer at Llama-3-8B B=8 with a binary search and 27 us with the count, both at 4 warps: one
program's chain of ~5,000 dependent instructions per warp, not its memory traffic.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from bench_decode import graph_of, median_ms
from sphkv_compile.kernels import encode as kencode
from sphkv_compile.options import SphkvOptions
from sphkv_compile.store import TierState
from sphkv_compile.tiers import TierSpec, record_words

SHAPES = {"llama3-8b": (8, 128), "smollm2": (3, 64)}  # (KV heads, head dim)
POINTS = [("llama3-8b", 1), ("llama3-8b", 8), ("llama3-8b", 106), ("smollm2", 8)]
SETTINGS = [dict(block_t=16, warps=w, split_kv=split) for w, split in itertools.product((4, 8), (False, True))]


def exact_tier(B: int, H: int, d: int, device, gen) -> TierState:
    """An exact tier of one 64-token page per (row, KV head), filled with random bf16 records."""
    kw, vw = record_words(TierSpec("exact"), d, 0, torch.bfloat16)
    st = TierState.allocate(B, H, B * H, 64, kw + vw, 1, device)
    st.pool.view(torch.bfloat16).copy_(torch.randn(st.pool.view(torch.bfloat16).shape, generator=gen, device=device))
    st.pages.copy_(torch.randperm(B * H, generator=gen, device=device).to(torch.int32).view(B, H, 1))
    return st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    spec = TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))
    default = dict(kencode.ENCODE_DECODE_STEP)
    rows = []
    for name, B in POINTS:
        H, d = SHAPES[name]
        st = exact_tier(B, H, d, device, gen)
        run = lambda: kencode.encode_exact_slot(spec, st, 5, d, opts.seed, torch.bfloat16)
        want = run()
        for setting in SETTINGS:
            kencode.ENCODE_DECODE_STEP.update(setting)
            try:
                got = run()
                same = bool(torch.equal(got, want))
                graph = graph_of(lambda: [run() for _ in range(args.calls)])
                us = median_ms(graph.replay) * 1e3 / args.calls
            finally:
                kencode.ENCODE_DECODE_STEP.update(default)
            rows.append(dict(shape=name, B=B, **setting, us_per_call=us, equal_to_default=same))
            print(f"{name:10s} B={B:4d} warps={setting['warps']:2d} "
                  f"split_kv={setting['split_kv']!s:5s} "
                  f"{us:7.2f} us/call  equal to default: {same}", flush=True)
    with open(os.path.join(args.out, "probe_decode_encode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
