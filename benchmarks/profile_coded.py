"""One decode call of the default configuration (Llama-3-8B shape, B=8, T=32k), run twice so a
profiler can skip the compiling launch:

    ncu --kernel-name regex:paged_coded --launch-skip 1 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats --section Occupancy \\
        python benchmarks/profile_coded.py
"""
from __future__ import annotations

import torch

from bench_decode import SHAPES, build_store
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec


def main(name="llama3-8b", B=8, T=32768):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    Hq, Hkv, d = SHAPES[name]
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(2):
        kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn)
    torch.cuda.synchronize()


if __name__ == "__main__":
    import sys

    from coded_flags import parse

    # key=value settings of kernels.attend.CODED, e.g. programs_per_sm=3
    kattend.CODED.update(parse(flag.split("=") for flag in sys.argv[1:]))
    main()
