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
    "medium": dict(ppl=(2, 768, 128), agreement=(1, 768, 24), passkey=([768, 1536], [0.5]), ruler=([768], 1)),
    "large": dict(ppl=(2, 2048, 256), agreement=(2, 2048, 32), passkey=([8000, 2048, 4096], [0.2, 0.8]),
                  ruler=([2048, 4096], 1)),
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
    return interleave(out)


def interleave(samples: list) -> list:
    """Round-robin over task families, so a run stopped early has covered every family."""
    families: dict[str, list] = {}
    for s in samples:
        families.setdefault(s.task, []).append(s)
    out = []
    while any(families.values()):
        for queue in families.values():
            if queue:
                out.append(queue.pop(0))
    return out


def write_outputs(out_dir: str, config: dict, rows: list, methods, budgets) -> str:
    """Everything from the rows so far: written after every sample, so a stopped run keeps its results."""
    summary = aggregate(rows)
    report.write_json(os.path.join(out_dir, "quality.json"), config, rows, summary)
    table = report.markdown(summary, methods, budgets)
    with open(os.path.join(out_dir, "quality.md"), "w") as f:
        f.write(table)
    report.plot(os.path.join(out_dir, "quality.png"), summary, methods, budgets)
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sphkv_compile.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of everything (same as --size quick)")
    ap.add_argument("--size", choices=list(SIZES), default="full", help="sample counts and lengths (see SIZES)")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if not m.endswith("_uncentered")],
                    choices=list(METHODS),
                    help="default: all but the *_uncentered ablations (keys stored as they are, center_keys=False)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[1 / 4, 1 / 8, 1 / 16])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--out", default="eval_out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy 2-core machine more threads ran up to 10x slower)")
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
    config = {"size": size_name, "methods": args.methods, "budgets": args.budgets, "tasks": args.tasks,
              "sizes": size, "settings": cfg.__dict__, "threads": torch.get_num_threads(), "samples_done": 0}
    with tqdm(total=per_sample * len(samples), desc="configs", unit="cfg") as bar:
        for i, sample in enumerate(samples):
            bar.set_postfix(sample=f"{i + 1}/{len(samples)}", task=sample.task, tokens=sample.prompt.shape[1])
            rows += run_sample(model, sample, args.methods, args.budgets, cfg, bar)
            config.update(samples_done=i + 1, seconds=time.time() - t0)
            table = write_outputs(args.out, config, rows, args.methods, args.budgets)
    print(table)
    print(f"wrote {args.out}/quality.json, quality.md, quality.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
