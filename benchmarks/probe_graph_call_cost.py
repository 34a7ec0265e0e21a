"""The host cost of a compiled, CUDA-graphed call as a function of its tensor inputs and of its
graph's kernel nodes, apart from any model (session 31).

e2e_host_split.py found sphkv's decode step at Llama-3-8B shape, 32 layers, B=8, spending
~1.9 ms more host time inside the compiled call than dense-gqa's (0.7 ms of it dynamo's guards),
with 741 graph inputs against 389 and ~7 more kernels per layer. Which of the two costs what
decides what to cut: this probe compiles (mode 'reduce-overhead')

- inputs: one custom op that mutates a list of N static tensors (as sphkv's ops take a layer's
  state), N = 16 .. 1024; two kernels whatever N;
- nodes: K custom ops in a chain, each one kernel, K = 16 .. 1024; one input;

and prints each call's host time (median; the call returns once the graph is launched) and the
guard check's time alone.

    python benchmarks/probe_graph_call_cost.py [--calls 50] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


@torch.library.custom_op("sphkv_probe::touch_all", mutates_args=("state",))
def touch_all(x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
    state[0].add_(1)
    return x + 1


@touch_all.register_fake
def _(x, state):
    return torch.empty_like(x)


@torch.library.custom_op("sphkv_probe::bump", mutates_args=())
def bump(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@bump.register_fake
def _(x):
    return torch.empty_like(x)


class Holder:
    def __init__(self, n: int, device):
        self.state = [torch.zeros(4, device=device) for _ in range(n)]
        for t in self.state:
            torch._dynamo.mark_static_address(t)


def with_inputs(x, holder):
    return touch_all(x, holder.state)


def with_nodes(x, k: int):
    for _ in range(k):
        x = bump(x)
    return x


def guard_us(fn, local: dict, reps: int = 200) -> float | None:
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    for entry in _debug_get_cache_entry_list(fn.__code__):
        if entry.guard_manager.check(local):
            t0 = time.perf_counter()
            for _ in range(reps):
                entry.guard_manager.check(local)
            return 1e6 * (time.perf_counter() - t0) / reps
    return None


def call_us(compiled, args, calls: int) -> float:
    host = []
    for i in range(calls + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        compiled(*args)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 5:
            host.append(t1 - t0)
    return 1e6 * statistics.median(host)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    x = torch.zeros(4, device=device)
    rows = []
    for n in args.sizes:
        torch.compiler.reset()
        holder = Holder(n, device)
        compiled = torch.compile(with_inputs, mode="reduce-overhead", fullgraph=True)
        us = call_us(compiled, (x, holder), args.calls)
        g = guard_us(with_inputs, {"x": x, "holder": holder})
        rows.append(dict(kind="inputs", n=n, call_us=us, guard_us=g))
        print(f"inputs {n:5d}: call {us:8.1f} us  guards {g if g is None else round(g, 1)} us", flush=True)
    for k in args.sizes:
        torch.compiler.reset()
        compiled = torch.compile(with_nodes, mode="reduce-overhead", fullgraph=True)
        us = call_us(compiled, (x, k), args.calls)
        g = guard_us(with_nodes, {"x": x, "k": k})
        rows.append(dict(kind="nodes", n=k, call_us=us, guard_us=g))
        print(f"nodes  {k:5d}: call {us:8.1f} us  guards {g if g is None else round(g, 1)} us", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_graph_call_cost.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
