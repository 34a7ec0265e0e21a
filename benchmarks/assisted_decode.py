"""Prompt-lookup decoding on the embedded SmolLM2-135M: dense cache against the sphkv store,
each with and without drafts, on a prompt whose answer copies from it.

    python benchmarks/assisted_decode.py [--tokens 2048] [--new 64] [--lookup 10] [--device cuda|cpu]

The prompt is pydoc text followed by a request to repeat its last paragraph, so drafts taken
from the prompt (prompt_lookup_num_tokens) are often accepted. For each cache the script runs
greedy generate() with and without drafts and prints ms per new token, tokens per model forward
(1.0 without drafts; more when drafts are accepted), whether the drafted run gave the plain
run's tokens, and the resident KV bytes after the run. sphkv runs its defaults (3.5 bits, uniform
policy) on a dynamic cache and, with --static, on a static one too.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import sphkv_compile
from sphkv_compile.smollm2 import load_smollm2, pydoc_text


def prompt_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    text = pydoc_text()
    ids = tokenizer(text[: 6 * n_tokens + 64], add_special_tokens=False).input_ids[:n_tokens]
    body = tokenizer.decode(ids)
    last = body.strip().split("\n\n")[-1]
    request = f"{body}\n\nRepeat this paragraph of the text above exactly:\n\n{last[:400]}"
    messages = [{"role": "user", "content": request}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids


def timed(model, ids, new: int, **kw):
    """(tokens, seconds, model forwards) of one greedy generate()."""
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    finally:
        hook.remove()
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, len(forwards)


def per_token_ms(model, ids, new: int, **kw):
    """Decode ms per new token (a 1-token run's time taken off), tokens per decode forward, output."""
    timed(model, ids, 2, **kw)  # warm-up: kernels, compiles
    _, short, _ = timed(model, ids, 1, **kw)
    out, full, forwards = timed(model, ids, new, **kw)
    return 1000 * (full - short) / (new - 1), (new - 1) / max(1, forwards - 1), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length in pydoc tokens")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--static", action="store_true", help="also sphkv on a static cache")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    tokenizer, model = load_smollm2()
    model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    ids = prompt_ids(tokenizer, args.tokens).to(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; prompt {ids.shape[1]} "
          f"tokens, {args.new} new, prompt_lookup_num_tokens={args.lookup}", flush=True)
    fast = sphkv_compile.optimize(copy.deepcopy(model))
    runs = [("dense", model, {})] + [("sphkv dynamic", fast, {})]
    if args.static:
        runs.append(("sphkv static", fast, {"cache_implementation": "static"}))
    print("| cache | drafts | ms per token | tokens per forward | same tokens as without drafts | KV MB (dense's) |")
    print("|---|---|---:|---:|---|---:|")
    answers = {}
    for name, m, kw in runs:
        plain_ms, _, plain = per_token_ms(m, ids, args.new, **kw)
        answers[name] = plain
        kv = sphkv_compile.report() if m is fast else None
        held = f"{kv['kv_bytes'] / 1e6:.2f} ({kv['dense_kv_bytes'] / 1e6:.2f})" if kv else "–"
        print(f"| {name} | none | {plain_ms:.1f} | 1.00 | | {held} |", flush=True)
        look_ms, per_forward, drafted = per_token_ms(m, ids, args.new, prompt_lookup_num_tokens=args.lookup, **kw)
        print(f"| {name} | prompt lookup | {look_ms:.1f} | {per_forward:.2f} | {torch.equal(drafted, plain)} | |",
              flush=True)
    for name, out in answers.items():
        same = "" if name == "dense" else f" (same as dense: {torch.equal(out, answers['dense'])})"
        print(f"answer, {name}, no drafts{same}: {tokenizer.decode(out[0, ids.shape[1]:])[:160]!r}")


if __name__ == "__main__":
    main()
