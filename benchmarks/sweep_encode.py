"""Launch settings and rotation paths of the fused encoder, timed on the GPU.

    python benchmarks/sweep_encode.py [--out DIR]

One Llama-3-8B layer (8 KV heads, d=128) and one SmolLM2 layer (3 KV heads, d=64), 32,768
tokens of bf16 K and V: encode_records' do_bench median for each (tokens per program, warps,
register cap) in kernels.encode.ENCODE_LAUNCH, with the 16-bit sign-matrix rotation and with
the float32 (tf32x3) one, next to the layer's dense causal SDPA prefill in the same run (the
issue's target: encode <= 10% of it). Every setting's records are checked against a float64
encode of the same inputs (codes at most one step apart, and rarely: as the GPU tests).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_decode import sweep_setup, SHAPES, median_ms
from sphkv_compile.kernels import encode as kencode
from sphkv_compile.options import SphkvOptions
from sphkv_compile.store import encode_records as reference_encode_records
from sphkv_compile.tiers import TierSpec, tier_codecs

# (shape, rotation, (tokens per program, warps, register cap)); the first of each shape is the
# launch of sessions 2-5 with the float32 rotation, what bench_decode timed until now
SETTINGS = [("llama3-8b", "float32", (16, 8, 0)), ("llama3-8b", "signs", (16, 8, 0)),
            ("llama3-8b", "signs", (16, 4, 0)), ("llama3-8b", "signs", (16, 8, 128)),
            ("llama3-8b", "signs", (8, 4, 0)), ("llama3-8b", "signs", (32, 8, 0)),
            ("smollm2", "float32", (32, 4, 0)), ("smollm2", "signs", (32, 4, 0)),
            ("smollm2", "signs", (16, 4, 0))]
ORIGINAL_ROTATIONS = kencode._rotations


def apply(d: int, rotation: str, launch: tuple) -> None:
    kencode.ENCODE_LAUNCH[(kencode.head_dim_class(d), rotation == "signs")] = launch
    kencode._rotations = ORIGINAL_ROTATIONS if rotation == "signs" else (
        lambda kc, vc, kd, vd: ORIGINAL_ROTATIONS(kc, vc, torch.float32, torch.float32))


def warm(index: int) -> None:
    """Compile one setting (Triton's disk cache keeps it for the timing process)."""
    name, rotation, launch = SETTINGS[index]
    _, Hkv, d = SHAPES[name]
    apply(d, rotation, launch)
    k = torch.randn(1, Hkv, 64, d, device="cuda", dtype=torch.bfloat16)
    opts = SphkvOptions()
    spec = TierSpec("uniform", float(opts.bits), opts.value_codec, float(opts.bits))
    kencode.encode_records(spec, k, k, opts.seed, torch.bfloat16)
    torch.cuda.synchronize()


def prefill_ms(q, k, v) -> float:
    best = None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            run()
        except RuntimeError:
            continue
        ms = median_ms(run, rep=50)
        best = ms if best is None else min(best, ms)
    return best


def codes_off(spec, d, got, want) -> tuple[int, float]:
    """(largest code difference, share of codes that differ) between two record sets."""
    worst, differ, total = 0, 0, 0
    kc, vc = tier_codecs(spec, d, 0)
    for codec, g, w in ((kc, got[..., :kc.words], want[..., :kc.words]),
                        (vc, got[..., kc.words:], want[..., kc.words:])):
        for f, (a, b) in enumerate(zip(codec.layout.unpack(g.cpu()), codec.layout.unpack(w.cpu()))):
            diff = (a - b).abs()
            if f == 1 and hasattr(codec, "tree"):  # level-1 angles wrap around the circle
                diff = torch.minimum(diff, (1 << codec.level_bits[0]) - diff)
            worst = max(worst, int(diff.max()))
            differ += int((diff > 0).sum())
            total += diff.numel()
    return worst, differ / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    args = sweep_setup(__file__, len(SETTINGS), warm, ap)
    if args is None:
        return
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    spec = TierSpec("uniform", float(opts.bits), opts.value_codec, float(opts.bits))
    rows = []
    original_launch = dict(kencode.ENCODE_LAUNCH)
    for name in dict.fromkeys(n for n, _, _ in SETTINGS):
        Hq, Hkv, d = SHAPES[name]
        k = torch.randn(1, Hkv, args.tokens, d, device=device, dtype=torch.bfloat16, generator=gen)
        k = k * torch.exp(2 * torch.randn(1, Hkv, args.tokens, 1, device=device, generator=gen)).to(k.dtype)
        v = torch.randn_like(k)
        q = torch.randn(1, Hq, args.tokens, d, device=device, dtype=torch.bfloat16, generator=gen)
        dense = prefill_ms(q, k, v)
        del q
        n = 4096  # float64 reference on the first tokens
        want = reference_encode_records(spec, k[:, :, :n].double(), v[:, :, :n].double(), opts.seed, torch.bfloat16)
        for shape, rotation, launch in SETTINGS:
            if shape != name:
                continue
            apply(d, rotation, launch)
            row = dict(shape=name, d=d, kv_heads=Hkv, tokens=args.tokens, rotation=rotation,
                       block_t=launch[0], warps=launch[1], maxnreg=launch[2])
            try:
                run = lambda: kencode.encode_records(spec, k, v, opts.seed, torch.bfloat16)
                got = run()[:, :, :n]
                row["max_code_step"], row["codes_differing"] = codes_off(spec, d, got, want)
                row["ms"] = median_ms(run, rep=50)
                row["prefill_ms"] = dense
                row["over_prefill"] = row["ms"] / dense
                row["Mtok_per_s"] = Hkv * args.tokens / (row["ms"] * 1e-3) / 1e6
            except Exception as err:  # a setting that fails to compile or launch is reported
                row["error"] = repr(err)[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
        kencode.ENCODE_LAUNCH.update(original_launch)
        kencode._rotations = ORIGINAL_ROTATIONS
    with open(os.path.join(args.out, "sweep_encode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
