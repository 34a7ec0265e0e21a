"""Where one decode attend call's GPU time goes, kernel by kernel (the default configuration).

    python benchmarks/breakdown_decode.py [--out DIR]

For each point: the call replayed from a CUDA graph (do_bench median, as bench_decode.py times
it), and the same call run eagerly under torch.profiler, every kernel's mean device time per
call. The kernels of one call run one after another, so their sum against the replayed total
shows how much of the call is the compressed tier's split-KV kernel and how much the small
launches around it (exact tier, the new token, the combine, the query rotation).
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode import SHAPES, build_store, graph_of, median_ms
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

POINTS = [("llama3-8b", 1, 4096), ("llama3-8b", 1, 32768), ("llama3-8b", 1, 131072), ("llama3-8b", 8, 32768),
          ("smollm2", 1, 4096), ("smollm2", 8, 32768)]
CALLS = 20


def kernel_times(run) -> dict[str, float]:
    """Mean device microseconds per call of every kernel the call launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            run()
        torch.cuda.synchronize()
    total = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:60]] += ev.device_time
    return {name: us / CALLS for name, us in total.most_common()}


def point(name: str, B: int, T: int, device, gen) -> dict:
    opts = SphkvOptions()
    Hq, Hkv, d = SHAPES[name]
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    vn = torch.randn_like(kn)

    def run():
        return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=vn)

    run()
    torch.cuda.synchronize()
    replay_ms = median_ms(graph_of(run).replay)
    kernels = kernel_times(run)
    row = {"shape": name, "B": B, "T": T, "replay_us": replay_ms * 1e3, "kernels_us": kernels,
           "sum_us": sum(kernels.values())}
    print(f"\n{name} B={B} T={T}: replayed {row['replay_us']:.1f} us, kernels sum {row['sum_us']:.1f} us")
    for k, us in kernels.items():
        print(f"  {us:8.1f} us  {k}")
    del states
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = [point(n, B, T, device, gen) for n, B, T in POINTS]
    with open(os.path.join(args.out, "breakdown_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
