"""Host time of an eager decode step on a dynamic cache, by Python function: the SmolLM2-shaped
random Llama of rdr_gpu_check.py after a prompt, one forward per token (what a plain
model.generate(ids) runs after optimize()), under cProfile. A plain generate() on a GPU is
host-bound, so the step's time is mostly this Python.

    python benchmarks/profile_eager_host.py [--policy uniform|rdr] [--prompt 2048] [--steps 16] [--device cuda]

Prints ms per step for transformers' DynamicCache and for sphkv's dynamic store (same model,
same prompt, timed without the profiler), then the sphkv step's functions by own time and by
cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import transformers as tf

import sphkv_compile.api as sphkv
from rdr_gpu_check import add_device_arg, device_from, model_on, sync


def forward(model, ids, cache):
    """One forward over ids with the cache under the keyword this transformers names it by."""
    return model(input_ids=ids, use_cache=True, **{sphkv.cache_keyword(model): cache})


def decode_steps(model, ids, steps, cache):
    """Prefill, then `steps` single-token forwards; returns the seconds the steps took."""
    with torch.no_grad():
        out = forward(model, ids, cache)
        token = out.logits[:, -1:].argmax(-1)
        sync(ids.device)
        t = time.perf_counter()
        for _ in range(steps):
            out = forward(model, token, cache)
            token = out.logits[:, -1:].argmax(-1)
        sync(ids.device)
        return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="uniform", choices=("uniform", "rdr"))
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rows", type=int, default=35, help="functions printed per table")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    ids = torch.randint(3, 49152, (1, args.prompt), device=device)

    dense = model_on(device)
    decode_steps(dense, ids, 2, tf.DynamicCache(config=dense.config))  # warm-up
    dense_ms = 1000 * decode_steps(dense, ids, args.steps, tf.DynamicCache(config=dense.config)) / args.steps
    print(f"dense DynamicCache: {dense_ms:.2f} ms per eager decode step", flush=True)
    del dense

    options = dict(bits=3.5) if args.policy == "uniform" else dict(policy="rdr", budget=0.125, rebudget_every=32)
    model = sphkv.optimize(model_on(device), **options)
    decode_steps(model, ids, 4, sphkv.new_cache(model))  # warm-up: kernels compile
    ms = 1000 * decode_steps(model, ids, args.steps, sphkv.new_cache(model)) / args.steps
    print(f"sphkv {args.policy} dynamic: {ms:.2f} ms per eager decode step ({ms / dense_ms:.2f}x dense)", flush=True)

    cache = sphkv.new_cache(model)
    with torch.no_grad():
        forward(model, ids, cache)
    profiler = cProfile.Profile()
    token = ids[:, -1:]
    sync(device)
    profiler.enable()
    with torch.no_grad():
        for _ in range(args.steps):
            token = forward(model, token, cache).logits[:, -1:].argmax(-1)
    sync(device)
    profiler.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.rows)
        print(f"\n== sphkv {args.policy}, {args.steps} steps, by {key}\n{text.getvalue()}", flush=True)


if __name__ == "__main__":
    main()
