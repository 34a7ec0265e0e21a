"""How much of a beam-search decode step is the sphkv cache's reorder.

    python benchmarks/reorder_share.py [--device cpu|cuda] [--prompt 512] [--beams 4] [--steps 8] [--static]

Runs generate() with beam search on the SmolLM2-shaped random model (rdr_gpu_check.model_on)
with prefill + 1 and prefill + 1 + steps new tokens, times every SphkvCache.reorder_cache call
(all layers at once since session 11; SphkvLayer.reorder_cache, one per layer, before) by
wrapping it, and prints the per-token cost of the extra steps and the reorders' share of it.
--static: a static cache, whose beam decode step sphkv compiles (CUDA graphs on a GPU).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import sphkv_compile
import sphkv_compile.api as sphkv
import sphkv_compile.hf_cache as hf_cache
from rdr_gpu_check import model_on
from rebudget_layer_time import CountOps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--static", action="store_true", help="cache_implementation='static'")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    spent = [0.0, 0]
    original = hf_cache.SphkvCache.reorder_cache
    last = []  # the cache of the last reorder

    def timed(self, beam_idx):
        last[:] = [self]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        original(self, beam_idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t
        spent[1] += 1

    hf_cache.SphkvCache.reorder_cache = timed
    model = sphkv.optimize(model_on(device), bits=3.5)
    ids = torch.randint(3, 49152, (1, args.prompt), device=device)
    # one static cache, reset between calls: a new one per call would recompile the decode step
    cache = sphkv.new_cache(model, max_cache_len=args.prompt + max(args.steps + 1, 4)) if args.static else None
    runs = {}
    for n in (4, 1, args.steps + 1):  # the first call warms up (and compiles the decode step)
        spent[:] = [0.0, 0]
        kw = {}
        if cache is not None:
            cache.reset()
            kw = {sphkv.cache_keyword(model): cache}
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, num_beams=args.beams, do_sample=False, **kw)
        runs[n] = (time.perf_counter() - t, *spent)
    (t1, r1, _), (tn, rn, calls) = runs[1], runs[args.steps + 1]
    per_token = 1000 * (tn - t1) / args.steps
    reorder = 1000 * (rn - r1) / args.steps
    print(f"{device.type}, prompt {args.prompt}, {args.beams} beams, {'static' if args.static else 'dynamic'} cache "
          f"({sphkv_compile.report()['decode_step']['reason']}): "
          f"{per_token:.1f} ms per decoded token, of which "
          f"reorders {reorder:.1f} ms ({reorder / per_token:.0%}; {calls} reorder calls in the longer run)")
    counter = CountOps(by_function=True)
    with counter:
        original(last[0], torch.arange(args.beams, device=device).flip(0))
    print(f"one reorder of the cache's {len(last[0].compressed_layers())} compressed layers: "
          f"{sum(counter.ops.values())} torch ops (views left out), {counter.ops['nonzero']} nonzero; "
          f"by sphkv function: {counter.by_function.most_common(8)}")


if __name__ == "__main__":
    main()
