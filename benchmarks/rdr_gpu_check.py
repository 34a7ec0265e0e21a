"""RDR on the GPU, end to end through generate(): a Llama with SmolLM2-135M's shape (random
weights: the GPU machine cannot load the embedded GGUF) in bf16 on CUDA, a static cache at
budget 1/8 under both distortion prices, and the uniform policy for comparison.

    python benchmarks/rdr_gpu_check.py [--prompt 2048] [--new 128] [--out DIR]

Each run is timed after a warm-up generate on a fresh cache of the same size (the decode
step compiles there). Checks, per run: every cache tensor is on the GPU, the meter never saw the budget exceeded,
the bytes held per layer stay within the budget plus the documented metadata allowance,
re-budgets happened during decode. Prints wall time per decoded token against the dense
cache (the same model, transformers' own static cache) and writes rdr_gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers as tf

import sphkv_compile.api as sphkv
from sphkv_compile import rdr
from sphkv_compile.rdr.capacity import metadata_allowance_bytes

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, max_position_embeddings=8192)


def model_on(device) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SMOLLM2_SHAPE)).eval().to(device=device, dtype=torch.bfloat16)


def add_device_arg(ap) -> None:
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script")


def device_from(name: str) -> torch.device:
    """--device as a torch.device, with the current CUDA index made explicit."""
    device = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids, new, **kw):
    sync(ids.device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    sync(ids.device)
    return out, time.perf_counter() - t


def check_cache(cache, budget_fraction, max_len, device) -> dict:
    layers, worst = cache.compressed_layers(), None
    for layer in layers:
        st = layer.store
        for t in layer.state + [layer.meter]:
            assert t.device == device, f"layer {layer.layer_idx}: a cache tensor is on {t.device}, not {device}"
        r = layer.budget_report()
        budget = rdr.layer_budget_bytes(budget_fraction, max_len, st.kv_heads, st.head_dim)
        allowance = metadata_allowance_bytes(st.tiers, st.batch, st.kv_heads, st.head_dim, st.page_size, budget,
                                             seed=st.seed, kv_dtype=st.kv_dtype)
        held = layer.resident_bytes() + layer.cumulative_length.numel() * 8
        assert r["max_excess"] <= 0, r
        assert held <= budget + allowance, (layer.layer_idx, held, budget, allowance)
        row = {"held": held, "budget": budget, "allowance": allowance, "rebudgets": r["rebudgets"],
               "tokens": r["tokens"], "key_gain": r["key_gain"]}
        worst = row if worst is None or held - budget > worst["held"] - worst["budget"] else worst
    return {"layers": len(layers), "worst_layer": worst}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--out", default=".")
    add_device_arg(ap)
    ap.add_argument("--runs", nargs="+", default=["uniform", "rdr_unit", "rdr_logit"],
                    choices=["uniform", "rdr_unit", "rdr_logit"], help="besides dense, which always runs")
    args = ap.parse_args(argv)
    device = device_from(args.device)
    ids = torch.randint(3, SMOLLM2_SHAPE["vocab_size"], (1, args.prompt), device=device)
    max_len = args.prompt + args.new
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {"device": name, "prompt": args.prompt, "new": args.new,
               "budget": args.budget, "runs": {}}

    dense = model_on(device)
    timed_generate(dense, ids, 4, cache_implementation="static")  # warm-up
    ref, dense_s = timed_generate(dense, ids, args.new, cache_implementation="static")
    results["runs"]["dense"] = {"seconds": dense_s}
    print("dense", json.dumps(results["runs"]["dense"]), flush=True)
    del dense

    configs = {"uniform": dict(bits=3.5),
               "rdr_unit": dict(policy="rdr", budget=args.budget, distortion="unit", rebudget_every=32),
               "rdr_logit": dict(policy="rdr", budget=args.budget, distortion="logit", rebudget_every=32)}
    for name, options in ((n, configs[n]) for n in args.runs):
        model = sphkv.optimize(model_on(device), **options)
        # warm-up: the decode step compiles for this cache size (a short prompt: prefill is eager)
        timed_generate(model, ids[:, :args.prompt // 2], 8,
                       **{sphkv.cache_keyword(model): sphkv.new_cache(model, max_cache_len=max_len)})
        cache = sphkv.new_cache(model, max_cache_len=max_len)
        out, seconds = timed_generate(model, ids, args.new, **{sphkv.cache_keyword(model): cache})
        row = {"seconds": seconds, "agreement_with_dense": float((out[0, args.prompt:] == ref[0, args.prompt:])
                                                                 .float().mean())}
        if options.get("policy") == "rdr":
            row.update(check_cache(cache, args.budget, max_len, device))
            assert row["worst_layer"]["rebudgets"] >= 2, row
        results["runs"][name] = row
        print(name, json.dumps(row)[:400], flush=True)
        del model, cache

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rdr_gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{results['device']}, prompt {args.prompt} + {args.new} new tokens, budget {args.budget}")
    print(f"{'run':10s} {'s':>7s} {'ms/token':>9s} {'agree':>6s}")
    for name, r in results["runs"].items():
        print(f"{name:10s} {r['seconds']:7.2f} {1000 * r['seconds'] / args.new:9.1f} "
              f"{r.get('agreement_with_dense', 1.0):6.3f}")


if __name__ == "__main__":
    main()
