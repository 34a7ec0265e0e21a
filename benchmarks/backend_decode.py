"""Decode speed through the backend's rewrite of a plain module: `torch.compile(model,
backend="sphkv")` on a gpt-fast-style model (tests/models/gpt_fast.py: static K/V buffers
written by index_put_, GQA by repeat_interleave, SDPA with a boolean mask row per position),
against the same model compiled by Inductor with CUDA graphs (`mode="reduce-overhead"`, as
gpt-fast runs it). Random weights; both prefill the same random prompt of `--context` tokens
in chunks, then decode; ms per step is the median over `--steps` timed steps after `--warmup`.

    python benchmarks/backend_decode.py [--dim 4096 --heads 32 --kv-heads 8 --layers 8]
        [--batch 4] [--context 8192] [--steps 16] [--dtype bfloat16] [--device cuda] [--out DIR]
        [--profile STEPS] [--census STEPS] [--dense-gqa both|repeat|sdpa] [--graphs-only] [--no-cuda-graphs]

Two dense rows: GQA by repeating K and V over the query heads before SDPA, as gpt-fast does (a
copy of the cache per step), and by SDPA's enable_gqa (read in place); sphkv's ratio is taken
against the faster. The rewrite reads the grouped store. Prints the rows, the ratio, the
resident KV bytes, and report()'s site count; on CUDA a second sphkv row replays the calls from
CUDA graphs (options cuda_graphs, inductor_passes/graph_replay.py). Writes backend_decode.json
under --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.models
import sphkv_compile  # noqa: E402
from tests.models import gpt_fast  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device, dtype, gqa="repeat") -> gpt_fast.GPTFast:
    torch.manual_seed(0)
    cfg = gpt_fast.Config(vocab=args.vocab, dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                          max_seq=args.context + args.warmup + args.steps + args.profile + args.census + 1, gqa=gqa)
    model = gpt_fast.GPTFast(cfg).eval().to(device, dtype)
    model.setup_caches(args.batch, dtype=dtype)
    return model


@torch.no_grad()
def decode_ms(step, model, args, device, profile=False, census=False) -> list[float]:
    """Prefill `context` tokens in chunks through `step`, then time each decode step."""
    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab, (args.batch, args.context), device=device, generator=gen)
    for start in range(0, args.context, args.prefill_chunk):
        chunk = prompt[:, start:start + args.prefill_chunk]
        logits = step(chunk, torch.arange(start, start + chunk.shape[1], device=device))
    token = logits[:, -1:].argmax(-1)
    times = []
    for i in range(args.warmup + args.steps):
        pos = torch.tensor([args.context + i], device=device)
        sync(device)
        t = time.perf_counter()
        token = step(token, pos)[:, -1:].argmax(-1)
        sync(device)
        times.append(1000 * (time.perf_counter() - t))
    if profile and args.profile:
        profile_steps(step, token, args, device)
    if census and args.census:
        kernel_census(step, token, args, device, args.context + args.warmup + args.steps + args.profile)
    return times[args.warmup:]


def kernel_census(step, token, args, device, start) -> None:
    """Device time of `--census` more decode steps by kernel name (torch.profiler): how many
    launches a step makes and which kernels its time goes to, top 30 by time."""
    from torch.profiler import ProfilerActivity, profile

    positions = [torch.tensor([start + i], device=device) for i in range(args.census)]
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for pos in positions:
            token = step(token, pos)[:, -1:].argmax(-1)
        sync(device)
    rows = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    rows.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in rows)
    launches = sum(e.count for e in rows)
    print(f"kernel census over {args.census} steps ({'device' if cuda else 'host'} time): {launches / args.census:.0f} "
          f"{'kernels' if cuda else 'ops'} and {total / args.census / 1000:.3f} ms per step")
    for e in rows[:30]:
        print(f"  {e.count / args.census:7.1f} per step  {getattr(e, attr) / args.census:9.1f} us per step  {e.key[:110]}")


def profile_steps(step, token, args, device) -> None:
    """Host time of `--profile` more decode steps by Python function (cProfile), top 30 by own
    time: where the backend's uncaptured step spends its milliseconds; on CUDA also every place
    the host waited for the GPU (torch.cuda.set_sync_debug_mode), counted by source line."""
    import collections
    import cProfile
    import pstats

    from sphkv_compile.inductor_passes.graph_replay import watch_host_waits

    prof = cProfile.Profile()
    start = args.context + args.warmup + args.steps
    positions = [torch.tensor([start + i], device=device) for i in range(args.profile)]  # made outside
    with watch_host_waits([token]) as found:
        prof.enable()
        for pos in positions:
            token = step(token, pos)[:, -1:].argmax(-1)
        prof.disable()
    sync(device)
    waits = collections.Counter(found)
    print(f"host waits for the GPU in {args.profile} steps:")
    for where, n in waits.most_common():
        print(f"  {n:5d}  {where}")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    ap.add_argument("--profile", type=int, default=0, help="then profile this many sphkv steps on the host (cProfile)")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="leave out the row with options cuda_graphs (on CUDA it runs by default)")
    ap.add_argument("--census", type=int, default=0,
                    help="then list this many more steps' kernels by device time (torch.profiler), for the last sphkv row")
    ap.add_argument("--dense-gqa", default="both", choices=("both", "repeat", "sdpa"),
                    help="the dense rows' GQA: repeat_interleave (gpt-fast), SDPA enable_gqa, or both")
    ap.add_argument("--graphs-only", action="store_true",
                    help="time sphkv only with options cuda_graphs (the row without graphs is host-bound)")
    args = ap.parse_args(argv)
    if args.graphs_only and not args.cuda_graphs:
        ap.error("--graphs-only and --no-cuda-graphs leave no sphkv row")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    rows = {}
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    # gpt-fast repeats the KV heads for GQA (a copy of the cache per step); SDPA's enable_gqa
    # reads them in place: both dense spellings are timed, and sphkv is compared with the faster
    dense_rows = {"repeat": "dense, GQA by repeat_interleave (gpt-fast)", "sdpa": "dense, GQA by SDPA enable_gqa"}
    for gqa in (("repeat", "sdpa") if args.dense_gqa == "both" else (args.dense_gqa,)):
        model = build(args, device, dtype, gqa)
        dense_bytes = sum(b.numel() * b.element_size() for blk in model.blocks
                          for b in (blk.attn.kv_cache.k_cache, blk.attn.kv_cache.v_cache))
        rows[dense_rows[gqa]] = decode_ms(torch.compile(model, mode=mode), model, args, device)
        del model
        gc.collect()
        torch._dynamo.reset()
    dense_labels = [label for label in dense_rows.values() if label in rows]

    variants = {} if args.graphs_only else {"sphkv": {"bits": args.bits}}
    if args.cuda_graphs and device.type == "cuda":
        variants["sphkv + CUDA graphs"] = {"bits": args.bits, "cuda_graphs": True}
    reports = {}
    for label, options in variants.items():
        model = build(args, device, dtype)
        rows[label] = decode_ms(torch.compile(model, backend="sphkv", options=options), model, args, device,
                                profile=label == "sphkv", census=label == list(variants)[-1])
        sphkv_compile.check_runtime()
        reports[label] = sphkv_compile.report()
        del model
        gc.collect()
        torch._dynamo.reset()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dense = {label: statistics.median(rows[label]) for label in dense_labels}
    dense_ms = min(dense.values())
    result = dict(device=name, torch=torch.__version__, args=vars(args), dense_ms=dense_ms, dense_kv_bytes=dense_bytes,
                  dense={label: dict(ms=ms, steps=rows[label]) for label, ms in dense.items()}, variants={})
    print(f"{name}, gpt-fast-style model: dim {args.dim}, {args.heads}q/{args.kv_heads}kv heads, {args.layers} layers, "
          f"batch {args.batch}, context {args.context}, {args.dtype}")
    for label, ms in dense.items():
        print(f"{label}, compiled ({mode}): {ms:.2f} ms per step; KV {dense_bytes / 1e9:.3f} GB")
    print(f"sphkv rows (GQA by repeat_interleave; the rewrite reads the grouped store either way) against the "
          f"faster dense row, {dense_ms:.2f} ms:")
    for label in variants:
        rep, ms = reports[label], statistics.median(rows[label])
        rewritten = sum(s["rewritten"] for s in rep["sites"])
        result["variants"][label] = dict(ms=ms, speedup=dense_ms / ms, kv_bytes=rep["kv_bytes"],
                                         sites_rewritten=rewritten, sites=len(rep["sites"]), steps=rows[label])
        print(f"{label} ({args.bits} bits): {ms:.2f} ms per step ({dense_ms / ms:.2f}x dense's speed); "
              f"KV {rep['kv_bytes'] / 1e9:.3f} GB ({rep['kv_bytes'] / dense_bytes:.3f} of dense); "
              f"{rewritten}/{len(rep['sites'])} sites rewritten")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "backend_decode.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
