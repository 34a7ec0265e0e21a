"""Host cost of one decode step's sphkv ops, apart from the model: where generate() waits.

One layer's static store (uniform policy, SmolLM2 or Llama-3-8B shape) filled with
`--context` tokens on the GPU, then `--iters` decode steps of the three ops a compressed layer
runs per step (sphkv::attend, sphkv::update_cache, sphkv::kv_budget) launched back to back
with no sync inside the loop. Prints, per op and for the whole step: host microseconds per
call (wall clock of the launching loop) and device microseconds per call (CUDA events), then
the Python functions that take the host time (cProfile). --cuda-graph: one captured step
replayed next to eager steps (same outputs and tiers?); --kernels: each op's GPU kernels and
their device time (what a replay still pays).

    python benchmarks/host_overhead.py [--shape smollm2] [--batch 1] [--context 2048] [--iters 200]
                                       [--cuda-graph] [--kernels]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from sphkv_compile.backend import install_kernels
from sphkv_compile.hf_cache import SphkvLayer
from sphkv_compile.options import SphkvOptions

SHAPES = {"smollm2": (3, 3, 64), "llama3-8b": (8, 4, 128)}  # KV heads, query heads per KV head, head dim


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also capture one decode step in a CUDA graph, replay it, and check it against eager steps")
    ap.add_argument("--kernels", action="store_true",
                    help="also list the GPU kernels each op launches per call, with their device time (torch.profiler)")
    args = ap.parse_args(argv)
    install_kernels()
    dev = torch.device("cuda")
    H, G, d = SHAPES[args.shape]
    B = args.batch
    opts = SphkvOptions.from_dict({"bits": 3.5})
    layer = SphkvLayer(opts, 0, max_cache_len=args.context + 9 * args.iters + 100)
    k = torch.randn(B, H, args.context, d, device=dev, dtype=torch.bfloat16)
    layer.lazy_initialization(k, k)
    layer.store_chunk(k, torch.randn_like(k), None, torch.zeros(B, H, args.context, device=dev))
    layer.cumulative_length.add_(args.context)
    tiers, o = layer.op_tiers, layer.options
    q = torch.randn(B, H * G, 1, d, device=dev, dtype=torch.bfloat16)
    kn, vn = torch.randn(B, H, 1, d, device=dev, dtype=torch.bfloat16), torch.randn(B, H, 1, d, device=dev, dtype=torch.bfloat16)
    valid = torch.ones(B, 1, dtype=torch.bool, device=dev)
    state = layer.state

    def attend(st=state):
        return torch.ops.sphkv.attend(q, st, kn, vn, valid, tiers, o.seed, "bfloat16", d ** -0.5, o.utility_window,
                                      False)

    def update(st=state):
        torch.ops.sphkv.update_cache(st, kn, vn, valid, torch.zeros(B, H, 1, device=dev), tiers, o.seed, "bfloat16",
                                     o.sink, o.recent, 1)

    def budget(st=state, meter=layer.meter):
        torch.ops.sphkv.kv_budget(st, meter, layer.cumulative_length, tiers, o.seed, "bfloat16", d, o.sink,
                                  o.recent, o.policy, 0.0, layer.max_cache_len, o.rebudget_every)

    def step(st=state, meter=layer.meter):
        out = attend(st)
        update(st)
        budget(st, meter)
        return out

    # the same work without the op dispatcher (the registered CUDA implementations called directly)
    from sphkv_compile.kernels import cuda_ops

    def attend_direct():
        return cuda_ops.attend_cuda(q, state, kn, vn, valid, tiers, o.seed, "bfloat16", d ** -0.5, o.utility_window,
                                    False)

    def update_direct():
        cuda_ops.update_cache_cuda(state, kn, vn, valid, torch.zeros(B, H, 1, device=dev), tiers, o.seed, "bfloat16",
                                   o.sink, o.recent, 1)

    print(f"{torch.cuda.get_device_name()}  {args.shape} B={B} context={args.context}: per call")
    for name, fn in (("attend", attend), ("update_cache", update), ("kv_budget", budget), ("whole step", step),
                     ("attend, no dispatcher", attend_direct), ("update, no dispatcher", update_direct)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        host = (time.perf_counter() - t) / args.iters * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.iters * 1e6
        print(f"  {name:22s} host {host:8.1f} us   device span {start.elapsed_time(end) * 1e3 / args.iters:8.1f} us"
              f"   wall {wall:8.1f} us")
    if args.cuda_graph:
        cuda_graph_check(step, state, layer.meter, args.iters, tiers)
    if args.kernels:
        kernel_table({"attend": attend, "update_cache": update, "kv_budget": budget})
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print("\n".join(out.getvalue().splitlines()[:45]))


def kernel_table(ops: dict, calls: int = 20) -> None:
    """Per op: every GPU kernel it launches per call and its device time (what a CUDA graph
    replay still pays: the launches are gone, the kernels are not)."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in ops.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        rows = [(e.device_time_total / calls, e.count / calls, e.key) for e in prof.key_averages()
                if e.device_time_total > 0 and e.count >= calls]
        total = sum(r[0] for r in rows)
        print(f"  {name}: {sum(r[1] for r in rows):.0f} kernels, {total:.1f} us of device time per call")
        for us, n, key in sorted(rows, reverse=True):
            print(f"    {us:7.1f} us  x{n:.0f}  {key[:100]}")


def cuda_graph_check(step, state, meter, iters: int, tiers: str) -> None:
    """Can the uniform decode step (which reads nothing back to the host) be replayed from a CUDA
    graph? Captures one step, replays it `iters` times next to as many eager steps on a copy of
    the store, and compares the outputs and the tokens every tier holds."""
    from sphkv_compile.ops import unflatten_state
    from sphkv_compile.store import gather_tokens

    twin, twin_meter = [t.clone() for t in state], meter.clone()
    for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
        step(), step(twin, twin_meter)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(), step(twin, twin_meter)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = step()
    worst = 0.0
    for _ in range(iters):  # the capture itself ran nothing: each replay is one step
        graph.replay()
        ref = step(twin, twin_meter)
        worst = max(worst, float((out[0].float() - ref[0].float()).abs().max()))
    torch.cuda.synchronize()
    same = all(torch.equal(a[2], b[2]) and torch.equal(a[0][a[2]], b[0][b[2]])
               for a, b in zip(map(gather_tokens, unflatten_state(state, tiers)),
                               map(gather_tokens, unflatten_state(twin, tiers))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    host = (time.perf_counter() - t) / iters * 1e6
    torch.cuda.synchronize()
    print(f"  CUDA graph: replay host {host:.1f} us, device {start.elapsed_time(end) * 1e3 / iters:.1f} us per step;"
          f" outputs max |diff| vs eager {worst:.3g}; tiers equal: {same}")


if __name__ == "__main__":
    main()
