"""Where a decode step of e2e_decode.py's model spends its device time, kernel by kernel:
dense-gqa against sphkv at the same batch, under torch.profiler over a window of generate()'s
steps (the logits processor advances the profiler's schedule, so warm-up steps, compiles and
graph captures stay outside the window).

    python benchmarks/profile_e2e_step.py [--layers 8] [--context 32768] [--batch 8] [--out DIR]

Prints, per kind, the mean device microseconds per step of the kernels that take the most, and
their sum; then the kernels whose time per step differs most between the kinds. The end-to-end
benchmark showed sphkv's step no faster than dense-gqa's at B=8 though its attention call is
faster (session 29): the difference is in the other kernels of the step.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile, schedule

import sphkv_compile.api as sphkv
from e2e_decode import build_model, fill_dense, fill_sphkv, release_graphs, use_grouped_sdpa
from rdr_gpu_check import add_device_arg, device_from


class ProfilerSteps(tf.LogitsProcessor):
    """Advances the profiler's schedule once per generate() step; changes nothing."""

    def __init__(self, prof):
        self.prof = prof

    def __call__(self, input_ids, scores):
        self.prof.step()
        return scores


def kernel_us_per_step(prof, steps: int, device) -> dict[str, float]:
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    total = collections.Counter()
    for ev in prof.events():
        if ev.device_type == kind:
            total[ev.name[:70]] += ev.device_time if device.type == "cuda" else ev.self_cpu_time_total
    return {name: us / steps for name, us in total.most_common()}


def profile_kind(kind: str, args, device) -> dict[str, float]:
    model = build_model(args.shape, args.layers, device)
    config = model.config
    max_len = args.context + 1 + args.warmup + args.steps + 2
    if device.type == "cuda":
        release_graphs()
    if kind == "dense-gqa":
        use_grouped_sdpa(model)
        cache = tf.StaticCache(config=config, max_cache_len=max_len)
        fill_dense(cache, config, args.batch, args.context, device)
        kw = {"past_key_values": cache}
    else:
        model = sphkv.optimize(model, bits=args.bits)
        cache = sphkv.new_cache(model, max_cache_len=max_len)
        fill_sphkv(cache, config, args.batch, args.context, device)
        kw = {sphkv.cache_keyword(model): cache}
    ids = torch.randint(3, config.vocab_size, (args.batch, args.context + 1), device=device)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    window = schedule(wait=args.warmup, warmup=1, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=window) as prof, torch.no_grad():
        new = args.warmup + 1 + args.steps + 1
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=tf.LogitsProcessorList([ProfilerSteps(prof)]), **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
    times = kernel_us_per_step(prof, args.steps, device)
    print(f"\n{kind}: {sum(times.values()):.1f} us of device time per step over {args.layers} layers "
          f"(B={args.batch}, {args.context} tokens)")
    for name, us in list(times.items())[:args.top]:
        print(f"  {us:9.1f} us  {name}")
    del model, cache, kw
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=".")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    per_kind = {kind: profile_kind(kind, args, device) for kind in ("dense-gqa", "sphkv")}
    dense, ours = per_kind["dense-gqa"], per_kind["sphkv"]
    diff = {name: ours.get(name, 0.0) - dense.get(name, 0.0) for name in set(dense) | set(ours)}
    print(f"\nsphkv minus dense-gqa, us per step: total {sum(ours.values()) - sum(dense.values()):+.1f}")
    for name, us in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"  {us:+9.1f} us  {name}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_e2e_step.json"), "w") as f:
        json.dump({"device": name, "args": vars(args), "us_per_step": per_kind}, f, indent=1)


if __name__ == "__main__":
    main()
