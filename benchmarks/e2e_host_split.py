"""Where the wall time of a CUDA-graphed decode step goes, without a profiler: e2e_decode.py's
model (Llama-3-8B shape, random bf16 weights, cache filled to --context tokens) through
generate(), dense-gqa against sphkv.

Session 30 found sphkv's step ~1.4 ms longer than dense-gqa's at B=8 and 32 layers although its
kernels took less device time; session 31's profile (profile_e2e_step.py --trace) put the
difference on the host: dynamo's guards, the compiled call's input handling and the CUDA graph's
launch, each serial with the device because generate() waits for every step's token. The
profiler itself slows the host (CUPTI hooks each graph node), so this script times the same
pieces with perf_counter only:

- prelude: generate()'s own work between one step's token and the next compiled call;
- call: the compiled call's host time (guards, the wrappers, the CUDA graph's launch);
- rest: from the call's return to the token (the device finishing the graph, then sampling);
- guards: dynamo's guard check of the compiled frame, timed alone on the step's inputs;
- node run: cudagraph trees' CUDAGraphNode.run inside the call (input checks, the launch, the
  outputs' reconstruction), and replay: the CUDA graph's launch inside that (private APIs,
  wrapped with a timer; left out where they are not found).

    python benchmarks/e2e_host_split.py [--layers 32] [--batch 8] [--context 32768] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import inspect
import io
import json
import os
import pstats
import statistics
import time
import types

import torch
import transformers as tf

from e2e_decode import filled_model, release_graphs
from rdr_gpu_check import add_device_arg, device_from

class Stamps(tf.LogitsProcessor):
    """Stamps each generate() step after a device sync; changes nothing."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


class HostTimers:
    """Wraps cudagraph trees' CUDAGraphNode.run and CUDAGraph.replay with timers for the run's
    duration (private APIs: a wrapper that cannot be installed is left out)."""

    def __init__(self):
        self.times = {"node_run": [], "replay": []}
        self.restore = []
        try:
            from torch._inductor.cudagraph_trees import CUDAGraphNode
            self._wrap(CUDAGraphNode, "run", "node_run")
        except (ImportError, AttributeError):
            pass
        self._wrap(torch.cuda.CUDAGraph, "replay", "replay")

    def _wrap(self, cls, name: str, key: str) -> None:
        original = getattr(cls, name)
        times = self.times[key]

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            times.append(time.perf_counter() - t0)
            return out

        setattr(cls, name, timed)
        self.restore.append((cls, name, original))

    def close(self) -> None:
        for cls, name, original in self.restore:
            setattr(cls, name, original)


def timed_compiled_call(model, calls: list, profiler: cProfile.Profile | None = None, skip: int = 0):
    """Wrap generate()'s compiled forward so each call's host start and end are recorded (and,
    with a profiler, the calls after the first `skip` run under it)."""
    original = model.get_compiled_call

    def get_compiled_call(config):
        compiled = original(config)

        def call(*args, **kwargs):
            profiled = profiler is not None and len(calls) >= skip
            if profiled:
                profiler.enable()
            t0 = time.perf_counter()
            out = compiled(*args, **kwargs)
            t1 = time.perf_counter()
            if profiled:
                profiler.disable()
            calls.append((t0, t1, args, kwargs))
            return out

        return call

    model.get_compiled_call = get_compiled_call


def guard_check_us(model, calls, reps: int = 50) -> float | None:
    """Time dynamo's guard check of the compiled decode frame on the last call's inputs. Which
    frame holds the compiled code depends on the wrappers around forward (sphkv's, transformers'
    decorators), so every function with a dynamo cache entry is tried, with its locals rebuilt
    from the call (private API: None where no entry accepts them)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    *_, args, kwargs = calls[-1]
    for fn in [o for o in gc.get_objects() if type(o) is types.FunctionType]:  # not isinstance: dead weak proxies raise
        entries = _debug_get_cache_entry_list(fn.__code__)
        if not entries:
            continue
        for local in _frame_locals(fn, model, args, kwargs):
            for entry in entries:
                if not entry.guard_manager.check(local):
                    continue
                t0 = time.perf_counter()
                for _ in range(reps):
                    entry.guard_manager.check(local)
                return 1e6 * (time.perf_counter() - t0) / reps
    return None


def _frame_locals(fn, model, args, kwargs) -> list[dict]:
    """The locals fn's frame may start with when called with args and kwargs, as a method of
    model or plainly (closure variables included)."""
    sig = inspect.signature(fn, follow_wrapped=False)  # the frame's own parameters, not the wrapped one's
    frames = []
    for head in ((model,), ()):
        try:
            bound = sig.bind(*head, *args, **kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        local = dict(bound.arguments)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            local[name] = cell.cell_contents
        frames.append(local)
    return frames


def run_kind(kind: str, args, device) -> dict:
    release_graphs()
    model, kw = filled_model(kind, args.shape, args.layers, args.batch, args.context,
                             args.context + 1 + args.warmup + args.steps, args.bits, device)
    config = model.config
    calls, clock = [], Stamps()
    profiler = cProfile.Profile() if args.cprofile else None
    timed_compiled_call(model, calls, profiler, skip=args.warmup + args.steps - 1 - args.cprofile)  # generate() makes new - 1 compiled calls
    ids = torch.randint(3, config.vocab_size, (args.batch, args.context + 1), device=device)
    new = args.warmup + args.steps
    timers = HostTimers()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=tf.LogitsProcessorList([clock]), **kw)
        guards = guard_check_us(model, calls)
    timers.close()
    # the compiled decode calls after the warm-up; call i precedes stamp i + 1 (stamp 0: the prefill's token)
    decode_calls = calls[-args.steps:]
    stamps = clock.stamps[-args.steps - 1:]
    prelude = [c[0] - s for c, s in zip(decode_calls, stamps)]
    call = [c[1] - c[0] for c in decode_calls]
    rest = [s - c[1] for c, s in zip(decode_calls, stamps[1:])]
    step = [b - a for a, b in zip(stamps, stamps[1:])]
    us = lambda xs: 1e6 * statistics.median(xs)  # noqa: E731
    row = dict(kind=kind, step_us=us(step), prelude_us=us(prelude), call_us=us(call), rest_us=us(rest),
               guards_us=guards)
    for key, times in timers.times.items():  # one per decode call where the wrapper was installed
        row[f"{key}_us"] = us(times[-args.steps:]) if len(times) >= args.steps else None
    print(f"{kind:22s} step {row['step_us']:8.1f}  prelude {row['prelude_us']:7.1f}  call {row['call_us']:7.1f}  "
          f"rest {row['rest_us']:8.1f}  guards {guards if guards is None else round(guards, 1)}  "
          f"node run {row['node_run_us']}  replay {row['replay_us']}", flush=True)
    if profiler is not None:  # the Python side of the last --cprofile calls (its overhead inflates them)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"{kind}: Python functions by own time over the last {args.cprofile} compiled calls\n{text.getvalue()}")
    del model, kw
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--cprofile", type=int, default=0, help="profile the last N compiled calls with cProfile "
                    "(their timings then include its overhead: time the split in a run without it)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=".")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    if device.type != "cuda":
        raise SystemExit("e2e_host_split.py times CUDA graphs: it needs a CUDA device")
    rows = [run_kind(kind, args, device) for kind in ("dense-gqa", "sphkv")]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e_host_split.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
