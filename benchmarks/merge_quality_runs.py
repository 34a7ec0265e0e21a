"""One table and plot from two runs of `python -m sphkv_compile.eval` on the same samples: an
earlier run's methods plus a later run's, the later one's rows replacing the earlier one's for
the methods both ran. The runs must share their size, settings and samples: every method both
ran and the later run did not change (dense, at least) must score the same in both, or the
script refuses, naming the first difference.

    python benchmarks/merge_quality_runs.py EARLIER.json LATER.json --out DIR [--changed uniform rdr]
        [--same uniform_uncentered=uniform rdr_uncentered=rdr]

--changed: the methods whose code changed between the runs (their rows may differ); every
other method both ran must match.
--same NEW=OLD: a later method that must reproduce an earlier one's rows (an ablation that
restores the earlier code), checked like the shared methods.
"""
from __future__ import annotations

import argparse
import json
import os

from sphkv_compile.eval.report import markdown, plot


def _key(row: dict) -> tuple:
    return (row["task"], row["method"], row["budget"])


def merge(earlier: dict, later: dict, changed: set[str], same: dict[str, str]) -> dict:
    for name in ("size", "budgets", "tasks", "sizes", "settings"):
        if earlier["config"].get(name) != later["config"].get(name):
            raise SystemExit(f"the runs differ in {name}: {earlier['config'].get(name)} against "
                             f"{later['config'].get(name)}")
    old = {_key(s): s for s in earlier["summary"]}
    shared = [s for s in later["summary"] if s["method"] not in changed and _key(s) in old]
    if not any(s["method"] == "dense" for s in shared):
        raise SystemExit("the later run has no dense rows to compare: run it with --methods dense ...")
    for s in shared:
        if s != old[_key(s)]:
            raise SystemExit(f"{_key(s)} differs between the runs: {old[_key(s)]} against {s}; not the same samples")
    for new, was in same.items():
        rows = [s for s in later["summary"] if s["method"] == new]
        if not rows:
            raise SystemExit(f"the later run has no rows of {new}")
        for s in rows:
            before = old.get((s["task"], was, s["budget"]))
            if before is None or dict(s, method=was) != before:
                raise SystemExit(f"{new} does not reproduce {was} at {_key(s)}: {before} against {s}")
    later_methods = list(later["config"]["methods"])
    methods = [m for m in earlier["config"]["methods"] if m not in later_methods or m == "dense"]
    methods += [m for m in later_methods if m != "dense"]
    summary = [s for s in earlier["summary"] if s["method"] not in later_methods] + later["summary"]
    config = dict(later["config"], methods=methods, merged_from=[earlier["config"]["methods"], later_methods])
    return {"config": config, "summary": summary}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("earlier")
    ap.add_argument("later")
    ap.add_argument("--out", required=True)
    ap.add_argument("--changed", nargs="*", default=["uniform", "rdr"])
    ap.add_argument("--same", nargs="*", default=[], metavar="NEW=OLD")
    args = ap.parse_args(argv)
    with open(args.earlier) as f:
        earlier = json.load(f)
    with open(args.later) as f:
        later = json.load(f)
    merged = merge(earlier, later, set(args.changed), dict(pair.split("=", 1) for pair in args.same))
    os.makedirs(args.out, exist_ok=True)
    methods, budgets = merged["config"]["methods"], merged["config"]["budgets"]
    with open(os.path.join(args.out, "quality_merged.json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(args.out, "quality_merged.md"), "w") as f:
        f.write(markdown(merged["summary"], methods, budgets))
    plot(os.path.join(args.out, "quality_merged.png"), merged["summary"], methods, budgets)
    print(f"wrote quality_merged.json, .md, .png under {args.out} ({', '.join(methods)})")


if __name__ == "__main__":
    main()
