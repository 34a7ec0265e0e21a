"""Host time of the CUDA path's launch code, without a GPU: kernels.attend.attend and
decode_update.decode_update called on CPU tensors with every Triton launch replaced by a no-op
that records the kernel's name. What is left is the Python between the launches (argument
checks, split counts, tables, allocations), which an eager decode step (a plain generate() on a
dynamic cache) pays once per layer on top of Triton's own launch overhead.

    python benchmarks/launch_host_time.py [--shape smollm2] [--tokens 2048] [--calls 300]

On the CPU the decode kernels are the Triton ones, not the GPU's Gluon fragment kernel, so the
launch list differs from the GPU's by that kernel; the rest of the code is the same.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from triton.runtime import jit

from bench_decode import SHAPES, build_store
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

LAUNCHED: list[str] = []


def _no_launch(self, *args, grid, warmup, **kwargs):
    LAUNCHED.append(self.fn.__name__)


def per_call_us(fn, calls: int) -> float:
    """Median over 5 rounds of the mean µs per call of `calls` calls."""
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(rounds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    jit.JITFunction.run = _no_launch  # before the kernels' modules build anything
    from sphkv_compile.kernels import attend as kernel_attend
    from sphkv_compile.kernels.decode_update import decode_update

    opts = SphkvOptions()
    Hq, Hkv, d = SHAPES[args.shape]
    B = args.batch
    gen = torch.Generator().manual_seed(0)
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, args.tokens - 1, specs, opts, opts.seed, torch.device("cpu"), gen)
    q = torch.randn(B, Hq, 1, d, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(B, Hkv, 1, d, dtype=torch.bfloat16, generator=gen)

    def attend():
        kernel_attend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kv, v_new=kv)

    def update():
        decode_update(states, specs, kv, kv, None, None, seed=opts.seed, kv_dtype=torch.bfloat16, sink=opts.sink,
                      recent=opts.recent, target=1)

    print(f"{args.shape} B={B} T={args.tokens}, launches replaced by no-ops (host Python only):")
    for name, fn in (("attend", attend), ("decode_update", update)):
        fn()
        LAUNCHED.clear()
        fn()
        kernels = list(LAUNCHED)
        print(f"  {name}: {per_call_us(fn, args.calls):.1f} us per call; launches {kernels}")


if __name__ == "__main__":
    main()
