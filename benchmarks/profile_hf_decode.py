"""Where a decode step of generate() spends its time on the GPU: the SmolLM2-shaped random
Llama of rdr_gpu_check.py, dense static cache against the sphkv store (uniform or RDR), with
torch.profiler over a few decode steps after a warm-up.

    python benchmarks/profile_hf_decode.py [--policy uniform|rdr] [--prompt 2048] [--steps 16] [--out DIR]
                                           [--beams N] [--timing-only] [--dynamic]

--dynamic: both run generate()'s default dynamic cache, uncompiled (what a plain
model.generate(ids) gets): transformers' DynamicCache against sphkv's dynamic store, each step's
ops launched from Python.

Prints ms per decoded token for both caches and the ops that take the most host and device
time (the profiler's table), and writes the tables under --out.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

import sphkv_compile
import sphkv_compile.api as sphkv
from rdr_gpu_check import add_device_arg, device_from, model_on


def generate(model, ids, steps, beams=1, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=beams, **kw)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_token_ms(model, ids, steps, kw, beams=1, **extra) -> float:
    """Wall time of (prefill + steps) minus (prefill + 1 step), per extra step: decode only.
    One cache object, reset between calls: a new cache per generate would make transformers
    recompile its decode step each time (the first run of this script timed that)."""
    times = []
    for n in (1, steps + 1):
        for cache in kw.values():  # (none with --dynamic: generate() makes a new one each call)
            cache.reset()
        sync(ids.device)
        t = time.perf_counter()
        generate(model, ids, n, beams, **kw, **extra)
        sync(ids.device)
        times.append(time.perf_counter() - t)
    return 1000 * (times[1] - times[0]) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="uniform", choices=("uniform", "rdr"))
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=".")
    ap.add_argument("--beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    ap.add_argument("--timing-only", action="store_true", help="skip the run without CUDA graphs and the profiler")
    ap.add_argument("--dynamic", action="store_true", help="generate()'s default dynamic caches, uncompiled")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    ids = torch.randint(3, 49152, (1, args.prompt), device=device)

    options = dict(bits=3.5) if args.policy == "uniform" else dict(policy="rdr", budget=0.125, rebudget_every=32)
    # warm-up: the decode step compiles; under RDR past a re-budget too (session 8's timing, 460 ms
    # per token, had the first re-budget during decoding, and whatever it compiles, in its window)
    warm_steps = 4 + (options.get("rebudget_every", 0) if args.policy == "rdr" else 0)
    max_len = args.prompt + max(args.steps + 1, warm_steps)

    dense = model_on(device)
    dense_kw = {} if args.dynamic else {"past_key_values": tf.StaticCache(config=dense.config, max_cache_len=max_len)}
    beams = args.beams
    label = "" if beams == 1 else f", beam search over {beams} beams"
    generate(dense, ids, 4, beams, **dense_kw)  # warm-up: the greedy decode step compiles (beam search's does not)
    dense_ms = per_token_ms(dense, ids, args.steps, dense_kw, beams)
    print(f"dense {'dynamic' if args.dynamic else 'static'} cache{label}: {dense_ms:.2f} ms per decoded token",
          flush=True)
    del dense, dense_kw

    model = sphkv.optimize(model_on(device), **options)
    kw = {} if args.dynamic else {sphkv.cache_keyword(model): sphkv.new_cache(model, max_cache_len=max_len)}
    generate(model, ids, warm_steps, beams, **kw)
    for run in ("first", "second"):  # a second run shows whether anything still compiles
        ms = per_token_ms(model, ids, args.steps, kw, beams)
        print(f"sphkv {args.policy}{label}{' (dynamic cache)' if args.dynamic else ''} ({run} timing): {ms:.2f} ms per decoded token ({ms / dense_ms:.2f}x dense); "
              f"decode step: {sphkv_compile.report()['decode_step']}; re-budgets of the last generate() "
              f"(prefill + {args.steps + 1} tokens): {sphkv_compile.report()['rebudgets']}", flush=True)
    if args.timing_only:
        return
    cache = next(iter(kw.values()), None)
    if args.policy == "uniform" and device.type == "cuda" and not args.dynamic:
        # optimize() keeps generate()'s CUDA graphs for this policy: the same tokens without them?
        no_graphs = {"compile_config": tf.CompileConfig(mode="default")}
        generate(model, ids, 4, **kw, **no_graphs)  # warm-up: this mode compiles its own decode step
        ms_plain = per_token_ms(model, ids, args.steps, kw, **no_graphs)
        cache.reset()
        with_graphs = generate(model, ids, args.steps, **kw)
        cache.reset()
        without = generate(model, ids, args.steps, **kw, **no_graphs)
        print(f"sphkv {args.policy} without CUDA graphs (mode 'default'): {ms_plain:.2f} ms per decoded token; "
              f"same tokens as with graphs: {torch.equal(with_graphs, without)}", flush=True)

    if cache is not None:
        cache.reset()
    generate(model, ids, 4, **kw)  # the compiled call of the default mode again, outside the profile
    if cache is not None:
        cache.reset()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generate(model, ids, args.steps, **kw)
    os.makedirs(args.out, exist_ok=True)
    keys = ("self_cpu_time_total",) + (("self_cuda_time_total",) if device.type == "cuda" else ())
    for key in keys:
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
        name = f"profile_{args.policy}{'_dynamic' if args.dynamic else ''}_{key}.txt"
        with open(os.path.join(args.out, name), "w") as f:
            f.write(table)
        print(f"\n== by {key}\n" + "\n".join(table.splitlines()[:22]), flush=True)


if __name__ == "__main__":
    main()
