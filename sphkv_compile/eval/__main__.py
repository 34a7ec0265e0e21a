"""python -m sphkv_compile.eval [--quick] [--methods ...] [--budgets ...] [--tasks ...] [--out DIR]

Quality of every method at equal resident bytes on SmolLM2 (see tasks.py and methods.py).
Writes DIR/quality.json, DIR/quality.md and DIR/quality.png.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm import tqdm

from ..smollm2 import load_smollm2
from . import report, tasks
from .methods import METHODS, Settings
from .runner import aggregate, run_sample

SIZES = {  # per task family: what --quick and a full run evaluate
    "quick": dict(ppl=(1, 384, 64), agreement=(1, 384, 16), passkey=([512], [0.5]), ruler=([512], 1)),
    # what the documented run used: the shared 2-core machine was heavily contended that day
    "medium": dict(ppl=(2, 1024, 128), agreement=(1, 1024, 24), passkey=([1024, 2048], [0.5]), ruler=([1024], 1)),
    "full": dict(ppl=(3, 2048, 256), agreement=(2, 2048, 32), passkey=([1024, 2048, 4096, 8000], [0.1, 0.5, 0.9]),
                 ruler=([2048, 4096], 2)),
}
TASKS = ("ppl", "agreement", "passkey", "multikey", "multivalue", "vartrack")


def build_samples(model, tokenizer, size: dict, wanted) -> list:
    out = []
    if "ppl" in wanted:
        out += tasks.ppl_samples(tokenizer, *size["ppl"])
    if "agreement" in wanted:
        out += tasks.agreement_samples(model, tokenizer, *size["agreement"])
    if "passkey" in wanted:
        out += tasks.passkey_samples(tokenizer, *size["passkey"])
    lengths, count = size["ruler"]
    if "multikey" in wanted:
        out += tasks.multikey_samples(tokenizer, lengths, count)
    if "multivalue" in wanted:
        out += tasks.multivalue_samples(tokenizer, lengths, count)
    if "vartrack" in wanted:
        out += tasks.vartrack_samples(tokenizer, lengths, count)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sphkv_compile.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of everything (same as --size quick)")
    ap.add_argument("--size", choices=list(SIZES), default="full", help="sample counts and lengths (see SIZES)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[1 / 4, 1 / 8, 1 / 16])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--out", default="eval_out")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [b for b in args.budgets if not 0 < b <= 1]
    if bad:
        ap.error(f"budgets must be fractions of dense KV bytes in (0, 1], got {bad}")
    os.makedirs(args.out, exist_ok=True)
    size_name = "quick" if args.quick else args.size
    size = SIZES[size_name]
    t0 = time.time()
    tokenizer, model = load_smollm2()
    samples = build_samples(model, tokenizer, size, args.tasks)
    cfg = Settings()
    per_sample = sum(1 if m == "dense" else len(args.budgets) for m in args.methods)
    rows = []
    with tqdm(total=per_sample * len(samples), desc="configs", unit="cfg") as bar:
        for sample in tqdm(samples, desc="samples", unit="sample", position=1, leave=False):
            bar.set_postfix(task=sample.task, tokens=sample.prompt.shape[1])
            rows += run_sample(model, sample, args.methods, args.budgets, cfg, bar)
    summary = aggregate(rows)
    config = {"size": size_name, "methods": args.methods, "budgets": args.budgets, "tasks": args.tasks,
              "sizes": size, "settings": cfg.__dict__, "seconds": time.time() - t0, "threads": torch.get_num_threads()}
    report.write_json(os.path.join(args.out, "quality.json"), config, rows, summary)
    table = report.markdown(summary, args.methods, args.budgets)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table)
    report.plot(os.path.join(args.out, "quality.png"), summary, args.methods, args.budgets)
    print(table)
    print(f"wrote {args.out}/quality.json, quality.md, quality.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
