"""Where a decode step of e2e_decode.py's model spends its device time, kernel by kernel:
dense-gqa against sphkv at the same batch, under torch.profiler over a window of generate()'s
steps (the logits processor advances the profiler's schedule, so warm-up steps, compiles and
graph captures stay outside the window).

    python benchmarks/profile_e2e_step.py [--layers 8] [--context 32768] [--batch 8] [--host] [--trace]
                                          [--out DIR]

Prints, per kind, the mean device microseconds per step of the kernels that take the most, and
their sum; then the kernels whose time per step differs most between the kinds; and each kind's
wall time per step (a device sync after every step, as e2e_decode.py times it). --host adds the
host's side (the profiler's CPU activity: the ops and Python-level calls that take the most
self time per step); --trace writes a Chrome trace per kind, where host and device line up.

Session 30: sphkv's kernels took less device time per step than dense-gqa's at B=8, yet its step
took ~1.4 ms longer end to end; the wall time against the kernel sum says how much of a step
is neither.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile, schedule

from e2e_decode import filled_model, release_graphs
from rdr_gpu_check import add_device_arg, device_from


class ProfilerSteps(tf.LogitsProcessor):
    """Advances the profiler's schedule once per generate() step and stamps the step's end after
    a device sync; changes nothing."""

    def __init__(self, prof, device):
        self.prof, self.device, self.stamps = prof, device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.prof.step()
        return scores


def us_per_step(prof, steps: int, device_type: torch.autograd.DeviceType) -> dict[str, float]:
    """Each event name's time per step: device time for CUDA events, self time for CPU ones."""
    total = collections.Counter()
    for ev in prof.events():
        # the profiler's step markers also appear as device-side annotations spanning the
        # whole step: counted, they doubled the "kernel" sum (session 31)
        if ev.device_type == device_type and not ev.name.startswith("ProfilerStep"):
            us = ev.device_time if device_type == torch.autograd.DeviceType.CUDA else ev.self_cpu_time_total
            total[ev.name[:70]] += us
    return {name: us / steps for name, us in total.most_common()}


def show(title: str, times: dict[str, float], top: int) -> None:
    print(title)
    for name, us in list(times.items())[:top]:
        print(f"  {us:9.1f} us  {name}")


def profile_kind(kind: str, args, device) -> dict[str, float]:
    if device.type == "cuda":
        release_graphs()
    model, kw = filled_model(kind, args.shape, args.layers, args.batch, args.context,
                             args.context + 1 + args.warmup + args.steps + 2, args.bits, device)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (args.batch, args.context + 1), device=device)
    on_gpu = device.type == "cuda"
    activities = ([ProfilerActivity.CUDA] if on_gpu else []) + ([ProfilerActivity.CPU] if args.host or not on_gpu else [])
    window = schedule(wait=args.warmup, warmup=1, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=window, with_stack=False) as prof, torch.no_grad():
        new = args.warmup + 1 + args.steps + 1
        clock = ProfilerSteps(prof, device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=tf.LogitsProcessorList([clock]), **kw)
        if on_gpu:
            torch.cuda.synchronize()
    # the active window's steps end at stamps warmup + 1 .. warmup + steps (after the warm-up step)
    window_stamps = clock.stamps[args.warmup:args.warmup + args.steps + 1]
    wall_us = 1e6 * statistics.median(b - a for a, b in zip(window_stamps, window_stamps[1:]))
    gpu = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    times = us_per_step(prof, args.steps, gpu)
    show(f"\n{kind}: {sum(times.values()):.1f} us of {'device' if on_gpu else 'CPU'} time per step over "
         f"{args.layers} layers (B={args.batch}, {args.context} tokens); wall {wall_us:.1f} us per step "
         f"(profiled)", times, args.top)
    if args.host and on_gpu:
        show(f"{kind}: host self time per step", us_per_step(prof, args.steps, torch.autograd.DeviceType.CPU), args.top)
    if args.trace:
        prof.export_chrome_trace(os.path.join(args.out, f"trace_{kind}.json"))
    del model, kw
    return times, wall_us


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
    ap.add_argument("--host", action="store_true", help="also the host's side (CPU activity)")
    ap.add_argument("--trace", action="store_true", help="write a Chrome trace per kind under --out")
    ap.add_argument("--out", default=".")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    os.makedirs(args.out, exist_ok=True)
    results = {kind: profile_kind(kind, args, device) for kind in ("dense-gqa", "sphkv")}
    per_kind = {kind: times for kind, (times, _) in results.items()}
    walls = {kind: wall for kind, (_, wall) in results.items()}
    dense, ours = per_kind["dense-gqa"], per_kind["sphkv"]
    diff = {name: ours.get(name, 0.0) - dense.get(name, 0.0) for name in set(dense) | set(ours)}
    print(f"\nsphkv minus dense-gqa, us per step: total {sum(ours.values()) - sum(dense.values()):+.1f}")
    for name, us in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"  {us:+9.1f} us  {name}")
    for kind in per_kind:
        print(f"{kind}: wall {walls[kind]:.1f} us per step, kernels {sum(per_kind[kind].values()):.1f} us: "
              f"{walls[kind] - sum(per_kind[kind].values()):.1f} us in neither")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with open(os.path.join(args.out, "profile_e2e_step.json"), "w") as f:
        json.dump({"device": name, "args": vars(args), "us_per_step": per_kind, "wall_us_per_step": walls}, f, indent=1)


if __name__ == "__main__":
    main()
