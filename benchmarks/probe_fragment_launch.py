"""The fragment kernel against the Triton kernels at a few decode points, same store, same run:
    python benchmarks/probe_fragment_launch.py [--points llama3-8b:1:4096 ...] [--settings LABEL ...]

The first setting run at a point is the reference the others' outputs are compared with, both
as run eagerly (<label>_diff) and as replayed from the CUDA graph that is timed (<label>_graph_diff)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench_decode import decode_point, graph_of, median_ms
from sphkv_compile.kernels import attend as kattend, dependent_launch, fragment_codegen, fragment_launch
from sphkv_compile.kernels.layout import tier_info
from sphkv_compile.options import SphkvOptions

POINTS = [("llama3-8b", 1, 4096), ("llama3-8b", 1, 32768), ("llama3-8b", 8, 32768), ("llama3-8b", 32, 32768),
          ("llama3-8b", 8, 131072), ("smollm2", 1, 4096), ("smollm2", 8, 32768), ("smollm2", 32, 32768)]
# label -> FRAGMENT settings, attend.COMBINE's under "combine" and PLAIN's under "plain",
# DEPENDENT_LAUNCH's "enabled" under "pdl" and its "release_early" (a setting with "head_dims"
# runs at those head dims only); programs_per_sm
# None: the occupancy query's count; maxnreg 0: no register cap; "offset_in_register": the decoders'
# table lookups generated as before session 28 (each table's offset added to the code's in a
# register, not carried as the shared load's immediate); "path_by_select": each path node's
# (cos, sin) pair loaded whole and the lane's half selected (before session 28's 16-bit loads)
SETTINGS = {"triton": dict(enabled=False),
            "fragment_decode_offset_in_register": dict(enabled=True, offset_in_register=True),
            "fragment_16_rows": dict(enabled=True, decode_kernel=False),
            "fragment_decode": dict(enabled=True),
            "fragment_decode_path_by_select": dict(enabled=True, path_by_select=True),
            # launch shapes that bear on B=1's fixed costs (session 28)
            "combine_splits_8": dict(enabled=True, combine=dict(splits=8)),
            "combine_columns_16": dict(enabled=True, combine=dict(columns=16)),
            # before session 28's few_rows_warps: 8 warps for every block (as combine_warps_4 measured the change)
            "combine_warps_4": dict(enabled=True, combine=dict(warps=4)),
            "combine_few_rows_warps_8": dict(enabled=True, combine=dict(few_rows_warps=8)),
            "tokens_per_warp_16": dict(enabled=True, tokens_per_warp=16),
            # d=128 decode kernel capped at 128 registers: four programs per SM instead of three; after
            # session 28's path loads it spills one word, reloaded twice per tile (sm_90 compile); untimed
            "decode_cap_128": dict(enabled=True, decode_maxnreg={128: 128}),
            # the call's kernels launched with programmatic dependent launch (session 29), releasing
            # the next kernel early as dependent_launch's default does, from every kernel, from none
            "pdl": dict(enabled=True, pdl=True),
            "pdl_release_all": dict(enabled=True, pdl=True,
                                    release_early=("queries", "fragment", "exact", "chunk", "combine")),
            "pdl_release_none": dict(enabled=True, pdl=True, release_early=()),
            "triton_pdl": dict(enabled=False, pdl=True),
            # before session 29: the exact tier's splits and the new token's in two launches
            "separate_exact_and_chunk": dict(enabled=True, plain=dict(exact_with_chunk=False)),
            # session 33, untimed: the exact tier's and new token's launch prepares the queries too
            # (no prepare_queries_kernel launch) and runs before the fragment kernel
            "queries_with_exact": dict(enabled=True, plain=dict(queries_with_exact=True)),
            "queries_with_exact_pdl": dict(enabled=True, pdl=True, plain=dict(queries_with_exact=True))}
DEFAULT_SETTINGS = ("triton", "fragment_decode_offset_in_register", "fragment_16_rows", "fragment_decode")


def _offset_in_register(on: bool) -> None:
    """Generate the decoders with the table offsets added in registers (on) or as the loads'
    immediates (off, the default), and drop every cache that holds decoders or kernels."""
    if on:
        def lookup(body, offset, table_bytes, name):
            function = "lookup_fixed" if offset == "0" else "lookup"
            body.emit(f"{name} = {function}_at_0({offset} + {table_bytes})")
        fragment_codegen._lookup = lookup
    else:
        fragment_codegen._lookup = _LOOKUP
    _drop_decoders()


def _path_by_select(on: bool) -> None:
    """Generate the path nodes' factors as a whole (cos, sin) pair and a select (on), or as one
    16-bit load (off, the default)."""
    if on:
        def path_lookup(body, offset, table_bytes, side_bit, name):
            fragment_codegen._lookup(body, offset, table_bytes, f"t_{name}")
            body.emit(f"c_{name}, s_{name} = halves(t_{name})")
            body.emit(f"{name} = gl.where(((sub >> {side_bit}) & 1) == 1, s_{name}, c_{name})")
            return name
        fragment_codegen._path_lookup = path_lookup
    else:
        fragment_codegen._path_lookup = _PATH_LOOKUP
    _drop_decoders()


def _drop_decoders() -> None:
    fragment_codegen.fragment_decoders.cache_clear()
    for cache in (fragment_launch._DECODERS, fragment_launch._COMPILED, fragment_launch._PER_SM):
        cache.clear()


_LOOKUP = fragment_codegen._lookup
_PATH_LOOKUP = fragment_codegen._path_lookup
PATCHES = {"offset_in_register": _offset_in_register, "path_by_select": _path_by_select}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", nargs="*", help="shape:B:T (default: POINTS)")
    ap.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS))
    args = ap.parse_args()
    points = [(n, int(b), int(t)) for n, b, t in (p.split(":") for p in args.points)] if args.points else POINTS
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    rows = []
    for name, B, T in points:
        q, kn, specs, states, row = decode_point(name, B, T, opts, device, gen)
        base = None
        for label in args.settings:
            setting = SETTINGS[label]
            if q.shape[-1] not in setting.get("head_dims", (q.shape[-1],)):
                continue
            saved, saved_combine = dict(fragment_launch.FRAGMENT), dict(kattend.COMBINE)
            saved_plain = dict(kattend.PLAIN)
            saved_pdl = dict(dependent_launch.DEPENDENT_LAUNCH)
            setting = dict(setting)
            kattend.COMBINE.update(setting.pop("combine", {}))
            kattend.PLAIN.update(setting.pop("plain", {}))
            dependent_launch.DEPENDENT_LAUNCH["enabled"] = setting.pop("pdl", False)
            if "release_early" in setting:
                dependent_launch.DEPENDENT_LAUNCH["release_early"] = setting.pop("release_early")
            patched = [patch for patch in PATCHES if setting.pop(patch, False)]
            for patch in patched:
                PATCHES[patch](True)
            fragment_launch.FRAGMENT.update(setting)
            try:
                def run():
                    return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn,
                                          v_new=kn)[0]
                out = run().float()
                base = out if base is None else base
                row[label + "_diff"] = float((out - base).abs().max() / base.abs().max())
                kept = {}
                graph = graph_of(lambda: kept.update(out=run()))
                row[label + "_ms"] = median_ms(graph.replay)
                graph.replay()
                row[label + "_graph_diff"] = float((kept["out"].float() - base).abs().max() / base.abs().max())
            finally:
                for patch in patched:
                    PATCHES[patch](False)
                fragment_launch.FRAGMENT.clear()
                fragment_launch.FRAGMENT.update(saved)
                kattend.COMBINE.clear()
                kattend.COMBINE.update(saved_combine)
                kattend.PLAIN.update(saved_plain)
                dependent_launch.DEPENDENT_LAUNCH.update(saved_pdl)
        info = tier_info(specs[1], q.shape[-1], opts.seed, torch.bfloat16)
        q_rot = torch.empty(kn.shape[0] * kn.shape[1], q.shape[1] // kn.shape[1], q.shape[-1], device=device)
        kernel = fragment_launch.compiled_stand_in(info, q_rot, states[1], q_rot.shape[1])
        row["registers"], row["dynamic_shared"] = kernel.n_regs, kernel.metadata.shared
        row["occupancy_programs_per_sm"] = fragment_launch.programs_per_sm(info, q_rot, states[1], q_rot.shape[1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(os.environ.get("OUT", "."), "probe_fragment_launch.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
