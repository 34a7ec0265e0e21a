"""End-to-end decode through generate() at long context, dense against sphkv (issue 4, item 5).

A Llama with Llama-3-8B's shape (or SmolLM2's) and random bf16 weights on the GPU; the cache
holds `--context` tokens before generate() starts, so what is timed is decoding at that context:

- dense: transformers' StaticCache, compiled by generate() with its default (CUDA graphs);
- dense-gqa: the same, with SDPA given the grouped K and V (transformers' sdpa path expands GQA
  whenever there is a mask, and a static cache always has one): a stronger dense baseline;
- sphkv: sphkv_compile.optimize(model) with its static cache, compiled by generate(): with CUDA
  graphs for the uniform policy (its decode step runs on the device alone), mode 'default' for
  RDR (api.graph_blocker).

Both caches are filled with the same random keys and values (per layer and chunk, seeded), the
dense one by StaticCache.update, the sphkv one by the layer's own cache update (the codes are
written by the Triton encoder, as at the end of a real prefill). A prefill through the model
at 32k tokens and large batches would take minutes of device time and tell nothing about decode.

Each run is one generate() call of `--warmup + --steps` tokens; a logits processor stamps the
time of every step after a device sync, and ms/token is the median over the timed steps.
Batches: `--batch` (the same for both) and the largest batch each cache fits in the free
memory (after the weights, with --headroom GB kept free).

    python benchmarks/e2e_decode.py [--shape llama3-8b] [--layers 32] [--context 32768] [--out DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import transformers as tf

import sphkv_compile
import sphkv_compile.api as sphkv
from rdr_gpu_check import SMOLLM2_SHAPE, add_device_arg, device_from

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=5e5, max_position_embeddings=131072),
    "smollm2": {k: v for k, v in SMOLLM2_SHAPE.items() if k != "num_hidden_layers"}
    | {"max_position_embeddings": 131072},
    # Phi-3-mini's attention (32 heads, no GQA, head dim 96: stored zero-padded to 128 on CUDA,
    # sphkv_compile/head_pad.py) in a Llama body; Phi-3's fused qkv projection is not what is timed
    "phi3-mini": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=32, rope_theta=1e4, max_position_embeddings=131072),
}
FILL_CHUNK = 4096
GQA_ATTENTION = "sphkv_bench_sdpa_gqa"


def sdpa_gqa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention without its GQA expansion: with a mask (a static cache always
    has one, for its unfilled tail) transformers repeats K and V over the query heads before SDPA,
    which reads 4x the cache at Llama-3-8B's 32q/8kv. Here SDPA gets the grouped K and V
    (enable_gqa=True) and the same boolean mask, and picks its own kernel."""
    mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
        is_causal=mask is None and query.shape[2] > 1, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model) -> None:
    """Switch a model to sdpa_gqa (registered once, with transformers' sdpa mask builder)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    tf.AttentionInterface.register(GQA_ATTENTION, sdpa_gqa)
    tf.AttentionMaskInterface.register(GQA_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(GQA_ATTENTION)


def build_model(shape: str, layers: int, device) -> tf.LlamaForCausalLM:
    config = tf.LlamaConfig(num_hidden_layers=layers, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def kv_chunk(layer: int, start: int, n: int, batch: int, heads: int, d: int, device):
    """The same random keys and values for both caches (seeded per layer and chunk)."""
    g = torch.Generator(device=device).manual_seed(1_000_003 * layer + start)
    k = torch.randn(batch, heads, n, d, generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn(batch, heads, n, d, generator=g, device=device, dtype=torch.bfloat16)
    return k, v


def fill_dense(cache, config, batch: int, context: int, device) -> None:
    d = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        for s in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - s)
            k, v = kv_chunk(i, s, n, batch, config.num_key_value_heads, d, device)
            cache.update(k, v, i, {"cache_position": torch.arange(s, s + n, device=device)})


def fill_sphkv(cache, config, batch: int, context: int, device) -> None:
    d = config.hidden_size // config.num_attention_heads
    for layer in cache.compressed_layers():
        for s in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - s)
            k, v = kv_chunk(layer.layer_idx, s, n, batch, config.num_key_value_heads, d, device)
            if layer.store is None:
                layer.lazy_initialization(k, v)
            mass = torch.zeros(batch, k.shape[1], n, dtype=torch.float32, device=device)
            layer.store_chunk(k, v, None, mass)  # what attend_and_update does after attention
            layer.stored_any = True
            layer.cumulative_length.add_(n)


def filled_model(kind: str, shape: str, layers: int, batch: int, context: int, max_len: int, bits: float, device):
    """A fresh model of `kind` ("dense-gqa" or "sphkv") and its static cache holding `context`
    tokens of every batch row: (model, the cache keywords for generate()). For the profiling
    scripts, which build one kind at a time."""
    model = build_model(shape, layers, device)
    config = model.config
    if kind == "dense-gqa":
        use_grouped_sdpa(model)
        cache = tf.StaticCache(config=config, max_cache_len=max_len)
        fill_dense(cache, config, batch, context, device)
        return model, {"past_key_values": cache}
    model = sphkv.optimize(model, bits=bits)
    cache = sphkv.new_cache(model, max_cache_len=max_len)
    fill_sphkv(cache, config, batch, context, device)
    return model, {sphkv.cache_keyword(model): cache}


class StepClock(tf.LogitsProcessor):
    """Stamps each generate() step (after a device sync); changes nothing."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def decode(model, cache_kw: dict, batch: int, context: int, steps: int, warmup: int, vocab: int, device):
    ids = torch.randint(3, vocab, (batch, context + 1), device=device)
    clock = StepClock()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=warmup + steps,
                             min_new_tokens=warmup + steps, do_sample=False,
                             logits_processor=tf.LogitsProcessorList([clock]), **cache_kw)
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])][warmup - 1:]
    return 1000 * statistics.median(gaps), out[:, context + 1:]


def per_sequence_bytes(kind: str, model, config, context: int, new: int, device) -> int:
    d = config.hidden_size // config.num_attention_heads
    if kind in ("dense", "dense-gqa"):
        # the cache, plus for "dense" one layer's keys and values repeated over the query heads
        # (transformers' sdpa path expands GQA before SDPA: seen as a 6.25 GiB buffer at B=25 on the H200)
        per_layer = 2 * (context + 1 + new) * d * 2
        expanded = config.num_attention_heads if kind == "dense" else 0
        return per_layer * (config.num_hidden_layers * config.num_key_value_heads + expanded)
    cache = sphkv.new_cache(model, max_cache_len=context + 1 + new)
    layer = cache.compressed_layers()[0]
    layer.init_store(1, config.num_key_value_heads, d, torch.bfloat16, device)
    return layer.resident_bytes() * len(cache.layers)


def release_graphs() -> None:
    """Free the previous run's CUDA graphs and their memory pool (cudagraph trees keep it until
    reset: 15.6 GB after sphkv B=8 at 32k, which made the largest batch's fill run out of memory)."""
    from torch._inductor import cudagraph_trees

    torch.compiler.reset()
    cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    torch.cuda.empty_cache()


def run(kind: str, model, config, batch: int, args, device) -> dict:
    new = args.warmup + args.steps
    max_len = args.context + 1 + new
    if device.type == "cuda":
        release_graphs()
    if kind in ("dense", "dense-gqa"):
        cache = tf.StaticCache(config=config, max_cache_len=max_len)
        fill_dense(cache, config, batch, args.context, device)
        kw = {"past_key_values": cache}
    else:
        cache = sphkv.new_cache(model, max_cache_len=max_len)
        fill_sphkv(cache, config, batch, args.context, device)
        kw = {sphkv.cache_keyword(model): cache}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms, tokens = decode(model, kw, batch, args.context, args.steps, args.warmup, config.vocab_size, device)
    seen = int(cache.get_seq_length())  # generate() decoded on the filled cache, not a fresh prefill
    assert seen == args.context + new, f"{kind}: the cache holds {seen} tokens, expected {args.context + new}"
    held = cache.kv_bytes()[0] if kind == "sphkv" else sum(
        l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    row = dict(kind=kind, batch=batch, context=args.context, ms_per_step=ms, tokens_per_s=batch * 1000 / ms,
               kv_bytes=held, peak_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0)
    if kind == "sphkv":  # CUDA graphs or not, and why (what this row measured)
        row["decode_step"] = sphkv_compile.report()["decode_step"]
    print(f"{kind:6s} B={batch:4d}  {ms:8.2f} ms/step  {row['tokens_per_s']:9.1f} tok/s  "
          f"KV {held / 1e9:7.2f} GB  peak {row['peak_gb']:6.1f} GB  {row.get('decode_step') or ''}", flush=True)
    del cache, kw
    return row, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8, help="the batch both caches run at")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--headroom", type=float, default=8.0, help="GB left free when sizing the largest batch")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--kinds", nargs="+", default=["dense", "sphkv"], choices=("dense", "dense-gqa", "sphkv"))
    ap.add_argument("--policy", default="uniform", choices=("uniform", "rdr"), help="sphkv's retention policy")
    ap.add_argument("--budget", type=float, default=0.125, help="RDR's budget (fraction of dense 16-bit KV)")
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--pad-head-dim", default="auto", choices=("auto", "false"),
                    help="sphkv's pad_head_dim option (false: odd head dims run the torch reference ops)")
    ap.add_argument("--out", default=".")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    device = device_from(args.device)
    model = build_model(args.shape, args.layers, device)
    dense_model = model
    config = model.config
    rows, first_tokens = [], {}
    free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 16e9) - args.headroom * 1e9
    for kind in args.kinds:
        if kind == "dense-gqa":
            if "dense" in args.kinds:  # the plain model stays as it was for the other kinds
                model = dense_model = build_model(args.shape, args.layers, device)
            use_grouped_sdpa(model)
        if kind == "sphkv":
            options = {"bits": args.bits} if args.policy == "uniform" else \
                {"policy": "rdr", "budget": args.budget, "bits": args.bits}
            options["pad_head_dim"] = "auto" if args.pad_head_dim == "auto" else False
            fresh = "dense" in args.kinds or "dense-gqa" in args.kinds
            model = sphkv.optimize(build_model(args.shape, args.layers, device) if fresh else model, **options)
            if fresh:
                del dense_model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        per_seq = per_sequence_bytes(kind, model, config, args.context, args.warmup + args.steps, device)
        largest = int(min(args.max_batch, free // per_seq))
        print(f"{kind}: {per_seq / 1e9:.3f} GB of KV per sequence at {args.context} tokens; "
              f"largest batch in {free / 1e9:.0f} GB: {largest}", flush=True)
        for batch in sorted({args.batch, largest}):
            if batch < 1:
                continue
            row, tokens = run(kind, model, config, batch, args, device)
            row["largest_batch"] = batch == largest
            rows.append(row)
            if batch == args.batch:
                first_tokens[kind] = tokens
    kinds = list(first_tokens)
    for other in kinds[1:]:  # dense-gqa against dense checks sdpa_gqa: they should agree
        agree = float((first_tokens[kinds[0]] == first_tokens[other]).float().mean())
        print(f"greedy tokens of {other} equal to {kinds[0]}'s at B={args.batch}: {agree:.3f} (random weights and cache)")
        rows.append(dict(kind="agreement", batch=args.batch, value=agree, kinds=[kinds[0], other]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(device=name, torch=torch.__version__, shape=args.shape, policy=args.policy,
                  layers=args.layers, context=args.context, args=vars(args), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    tag = "" if args.pad_head_dim == "auto" else "_unpadded"
    with open(os.path.join(args.out, f"e2e_decode_{args.shape}_{args.context}{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, {args.shape} x{args.layers} layers, context {args.context}")
    print("| cache | batch | ms/step | tokens/s | KV GB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["kind"] != "agreement":
            tag = " (largest)" if r["largest_batch"] else ""
            print(f"| {r['kind']} | {r['batch']}{tag} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['kv_bytes'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
