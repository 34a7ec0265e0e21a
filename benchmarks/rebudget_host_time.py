"""Host time of RDR's re-budgets: the capacity allocation (rdr.update.capped_choice) runs on the
CPU for small layers and on the model's device for large ones (update.ALLOCATE_ON_DEVICE_MIN_ITEMS),
once per layer and re-budget. Times every call during a greedy
generate() of the SmolLM2-shaped random model (rdr_gpu_check.py), prefill and decode apart;
with --tile, also the first prefill instance repeated k times (items and capacities x k, rows
perturbed by 1e-9 so they do not tie exactly): how the allocation scales with tokens x KV heads
per batch row (Llama-3-8B at 32k: 8 x 32768 = 262,144 items per row).

    python benchmarks/rebudget_host_time.py [--device cpu|cuda] [--prompt 2048] [--steps 40] [--tile 1 4 16 43]
                                            [--rounds 24 4]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import sphkv_compile.api as sphkv
from rdr_gpu_check import add_device_arg, device_from, model_on


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--rebudget-every", type=int, default=32)
    ap.add_argument("--tile", type=int, nargs="*", default=[])
    ap.add_argument("--rounds", type=int, nargs="*", default=[],
                    help="also time these allocate.PRICE_ROUNDS on the largest tile (CPU)")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    update = importlib.import_module("sphkv_compile.rdr.update")
    timed, phase = {"prefill": [], "decode": []}, ["prefill"]
    inner = update.capped_choice

    first = []

    def capped_choice(D, *rest):
        if not first:
            first.append((D, *rest))
        t = time.perf_counter()
        out = inner(D, *rest)
        timed[phase[0]].append((time.perf_counter() - t, tuple(D.shape)))
        return out

    update.capped_choice = capped_choice
    model = sphkv.optimize(model_on(device), policy="rdr", budget=args.budget, rebudget_every=args.rebudget_every)
    ids = torch.randint(3, 49152, (1, args.prompt), device=device)
    kw = {sphkv.cache_keyword(model): sphkv.new_cache(model, max_cache_len=args.prompt + args.steps + 1)}
    flip = FirstTokenFlip(phase)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, **kw)  # warm-up: compiles
        timed["prefill"].clear()
        next(iter(kw.values())).reset()
        # the prefill's re-budgets, then (after the first token is picked) the decode ones
        model.generate(ids, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False,
                       logits_processor=[flip], **kw)
    for name, calls in timed.items():
        if calls:
            ms = [1000 * t for t, _ in calls]
            print(f"{name}: {len(calls)} allocations of {calls[0][1]} (groups, items, choices): median "
                  f"{statistics.median(ms):.1f} ms, max {max(ms):.1f} ms, total {sum(ms) / 1000:.2f} s")
    if args.tile:
        D, cost, budget, capacity, exact = first[0]
        gen = torch.Generator().manual_seed(0)
        places = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
        for k in args.tile:
            Dk = D.repeat(1, k, 1) * (1 + 1e-9 * torch.rand(1, D.shape[1] * k, 1, dtype=D.dtype, generator=gen))
            cap = capacity.clone()
            cap[:-1] *= k
            times, choices = [], []
            for where in places:
                inputs = [x.to(where) for x in (Dk, cost, budget * k, cap)]
                for _ in range(2):  # the second call is timed: the first pays one-time CUDA setup
                    sync(where)
                    t = time.perf_counter()
                    choice = inner(*inputs, exact)
                    sync(where)
                times.append(f"{where.type} {1000 * (time.perf_counter() - t):.0f} ms")
                choices.append(float(torch.gather(Dk, -1, choice.cpu()[..., None]).sum()))
            print(f"tiled x{k}: {Dk.shape[1]} items per row, {', '.join(times)}; total distortion {choices}")
        allocate = importlib.import_module("sphkv_compile.rdr.allocate")
        default_rounds = allocate.PRICE_ROUNDS
        for rounds in args.rounds:
            allocate.PRICE_ROUNDS = rounds
            t = time.perf_counter()
            choice = inner(Dk, cost, budget * k, cap, exact)
            total = float(torch.gather(Dk, -1, choice[..., None]).sum())
            print(f"tiled x{k} on the CPU, {rounds} price rounds: {1000 * (time.perf_counter() - t):.0f} ms; "
                  f"total distortion {total}")
        allocate.PRICE_ROUNDS = default_rounds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstTokenFlip:
    """A logits processor: everything after the first picked token counts as decode."""

    def __init__(self, phase: list):
        self.phase = phase

    def __call__(self, input_ids, scores):
        self.phase[0] = "decode"
        return scores


if __name__ == "__main__":
    main()
