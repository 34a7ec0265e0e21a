"""What Inductor's lowering of sphkv::attend costs over the bare Triton kernels (issue 4's
"another Inductor mechanism you measure to be as good").

    python benchmarks/lowering_overhead.py [--out DIR]

The ops reach Inductor as custom ops with CUDA implementations (inductor_passes/lowering.py):
Inductor keeps each as an extern call. Per point, in one run, do_bench medians of:
- kernels: kernels.attend.attend called directly, replayed from a CUDA graph (the kernels alone);
- kernels / op eager: the kernels called from Python, and torch.ops.sphkv.attend through the
  dispatcher (what the dispatcher adds on the host; a graph replay holds no host work);
- compiled: a decode-attention function as a model layer has it (q produced by a projection
  and a scale, the op, an output projection) under torch.compile(mode="reduce-overhead"),
  next to the same function with dense SDPA on a bf16 cache (the backend Inductor picks),
  compiled the same way; compiled - (projections alone) is what the op costs inside Inductor's
  graph. The store, weights and caches are marked static (as the sphkv cache marks its state),
  so the graphs neither copy them nor skip on the op's in-place state; the script checks that
  no CUDA graph was skipped.
If the compiled op costs what the kernels cost, the extern call loses nothing a template could
win back by launch; what a template could still add is autotuned block sizes (swept by hand:
sweep_coded.py) and fusing q's producer into the kernel.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch._dynamo.utils import counters

from bench_decode import SHAPES, build_store, graph_of, median_ms
from sphkv_compile.inductor_passes import lowering
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.ops import tiers_string
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

POINTS = [("llama3-8b", 1, 4096), ("llama3-8b", 8, 32768), ("smollm2", 1, 4096), ("smollm2", 8, 32768)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    assert lowering.install(), "the Triton kernels could not be registered"
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    rows = []
    for name, B, T in POINTS:
        Hq, Hkv, d = SHAPES[name]
        specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
        states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
        flat = [t for s in states for t in s.tensors()]
        tiers, scale = tiers_string(specs), d ** -0.5
        hidden = Hq * d
        x = torch.randn(B, 1, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        wq = torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16, generator=gen) * hidden ** -0.5
        wo = torch.randn_like(wq)
        kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        q0 = (x @ wq).view(B, 1, Hq, d).transpose(1, 2).contiguous()
        dense_k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
        dense_v = torch.randn_like(dense_k)

        def kernels():
            return kattend.attend(q0, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn,
                                  scale=scale)

        def op():
            return torch.ops.sphkv.attend(q0, flat, kn, kn, None, tiers, opts.seed, "bfloat16", scale, 0, False)

        def layer_sphkv(x):
            q = (x @ wq).view(B, 1, Hq, d).transpose(1, 2) * 1.0
            out, _ = torch.ops.sphkv.attend(q, flat, kn, kn, None, tiers, opts.seed, "bfloat16", scale, 0, False)
            return out.transpose(1, 2).reshape(B, 1, hidden) @ wo

        def layer_dense(x):
            q = (x @ wq).view(B, 1, Hq, d).transpose(1, 2) * 1.0
            out = torch.nn.functional.scaled_dot_product_attention(q, dense_k, dense_v, enable_gqa=True)
            return out.transpose(1, 2).reshape(B, 1, hidden) @ wo

        def projections(x):
            q = (x @ wq).view(B, 1, Hq, d).transpose(1, 2) * 1.0
            return q.transpose(1, 2).reshape(B, 1, hidden) @ wo

        for t in (*flat, wq, wo, kn, dense_k, dense_v):
            torch._dynamo.mark_static_address(t)
        row = dict(shape=name, B=B, T=T)
        row["kernels_ms"] = median_ms(graph_of(kernels).replay)
        row["kernels_eager_ms"] = median_ms(kernels)
        row["op_eager_ms"] = median_ms(op)
        counters["inductor"].clear()
        for label, fn in (("compiled_sphkv_ms", layer_sphkv), ("compiled_dense_ms", layer_dense),
                          ("compiled_projections_ms", projections)):
            compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):  # record, then replay
                compiled(x)
            row[label] = median_ms(lambda: compiled(x))
        skips = counters["inductor"]["cudagraph_skips"]
        assert skips == 0, f"{skips} CUDA graphs skipped: {dict(counters['inductor'])}"
        row["op_in_compiled_ms"] = row["compiled_sphkv_ms"] - row["compiled_projections_ms"]
        row["op_in_compiled_over_kernels"] = row["op_in_compiled_ms"] / row["kernels_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del states, flat, dense_k, dense_v
        torch.compiler.reset()
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "lowering_overhead.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
