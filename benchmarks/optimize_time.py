"""What optimize()'s trial forward costs, and where the first generate()'s compile time goes.

    python benchmarks/optimize_time.py [--shape llama3-8b] [--layers 32] [--prompt 512] [--new 8]

For trial=False and trial=True, each in a fresh process with empty Triton and Inductor caches
(a cold start, as a user's first run): seconds for optimize(), for the first generate() (prompt
of `--prompt` random ids, `--new` tokens, sphkv's default dynamic cache) and for a second one.
The trial runs five ids and one decode step through the store, so it may move kernel compiles
from the first generate() into optimize(); the sum is what a user waits for either way.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = "SPHKV_OPTIMIZE_TIME_CHILD"


def timed(fn):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def child(args) -> dict:
    import torch

    import sphkv_compile.api as sphkv
    from e2e_decode import build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.shape, args.layers, device)
    _, optimize_s = timed(lambda: sphkv.optimize(model, trial=args.trial == "on"))
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False)

    first, first_s = timed(generate)
    second, second_s = timed(generate)
    assert torch.equal(first, second), "the two generate() calls disagree"
    return {"trial": args.trial, "optimize_s": optimize_s, "first_generate_s": first_s,
            "second_generate_s": second_s, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "tokens": first[0, args.prompt:].tolist()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--trial", choices=("on", "off"), help=argparse.SUPPRESS)  # the child's run
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if os.environ.get(CHILD):
        print(json.dumps(child(args)))
        return
    rows = []
    for trial in ("off", "on"):
        with tempfile.TemporaryDirectory() as caches:
            env = dict(os.environ, **{CHILD: "1", "TRITON_CACHE_DIR": os.path.join(caches, "triton"),
                                      "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor")})
            argv_child = [sys.executable, __file__, "--shape", args.shape, "--layers", str(args.layers),
                          "--prompt", str(args.prompt), "--new", str(args.new), "--trial", trial]
            done = subprocess.run(argv_child, env=env, capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__)))
            if done.returncode:
                sys.exit(f"trial={trial} failed:\n{done.stderr[-4000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{rows[0]['device']}, {args.shape} x {args.layers} layers, prompt {args.prompt}, {args.new} new tokens, "
          "cold Triton/Inductor caches per row")
    print("| trial | optimize() s | first generate() s | sum s | second generate() s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['trial']} | {r['optimize_s']:.2f} | {r['first_generate_s']:.2f} | "
              f"{r['optimize_s'] + r['first_generate_s']:.2f} | {r['second_generate_s']:.2f} |")
    print("same tokens with and without the trial:", rows[0]["tokens"] == rows[1]["tokens"])
    with open(os.path.join(args.out, "optimize_time.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
