"""Decode attention: sphkv Triton kernels vs cuDNN and flash SDPA (bf16), one command.

    python benchmarks/bench_decode.py [--quick] [--out DIR]

Measures in the same run: device-to-device copy bandwidth, dense decode (cuDNN, flash) and
sphkv decode (default configuration: sink + recent window exact, the rest in the uniform
3.5-bit polar tier) for T in 4k..128k, B in 1, 8, 32, Llama-3-8B (32q/8kv, d=128) and
SmolLM2 (9q/3kv, d=64); then encode throughput against dense SDPA prefill at 32k.
Times are triton.testing.do_bench medians. Each sphkv call is timed eagerly and replayed
from a CUDA graph (what torch.compile's reduce-overhead mode runs); dense SDPA is replayed
from a CUDA graph too (from session 16 on; before, it was timed eagerly).

The compressed store is filled with real codes: a sample of random Gaussian K/V is encoded
once and its records are tiled over every page, and pages are handed out in a shuffled
order so the page table is not the identity.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
import triton.testing

from sphkv_compile.options import SphkvOptions
from sphkv_compile.store import TierState
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.kernels import encode as kencode
from sphkv_compile.tiers import TierSpec, record_words

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}


def median_ms(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth(device) -> float:
    n = 1 << 30
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (ms * 1e-3)


def build_store(B, Hkv, d, T, specs, opts: SphkvOptions, seed, device, gen):
    """(states, compressed tokens per head, exact tokens per head) holding T tokens per head."""
    exact_n = min(T, opts.sink + opts.recent)
    comp_n = T - exact_n
    ps = opts.page_size
    states = []
    for spec, n in zip(specs, (exact_n, comp_n)):
        kw, vw = record_words(spec, d, seed, torch.bfloat16)
        pages_per = max(1, math.ceil(n / ps))
        num_pages = B * Hkv * pages_per
        st = TierState.allocate(B, Hkv, num_pages, ps, kw + vw, pages_per, device)
        sample_n = min(n if n else 1, 8192)
        ks = torch.randn(1, 1, sample_n, d, device=device, generator=gen, dtype=torch.bfloat16)
        vs = torch.randn(1, 1, sample_n, d, device=device, generator=gen, dtype=torch.bfloat16)
        rec = kencode.encode_records(spec, ks, vs, seed, torch.bfloat16).view(sample_n, kw + vw)
        flat = st.pool.view(-1, kw + vw)
        reps = math.ceil(flat.shape[0] / sample_n)
        flat.copy_(rec.repeat(reps, 1)[: flat.shape[0]])
        perm = torch.randperm(num_pages, device=device, generator=gen).to(torch.int32)
        st.pages.copy_(perm.view(B, Hkv, pages_per))
        st.count.fill_(n)
        st.free_top.zero_()
        states.append(st)
    return states, comp_n, exact_n


def decode_point(name, B, T, opts: SphkvOptions, device, gen):
    """(q, k_new, specs, states, row) of one decode point: a default-tier store of T - 1 tokens
    (build_store), the new token's K/V, and a row holding cuDNN's time on a dense cache of the
    same shape."""
    Hq, Hkv, d = SHAPES[name]
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
    row = {"shape": name, "B": B, "T": T, "cudnn_ms": dense_decode(q, k, torch.randn_like(k), "cudnn")}
    del k
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, opts.seed, device, gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    return q, kn, specs, states, row


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def dense_decode(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    run()
    # replayed from a CUDA graph, as sphkv is timed: timed eagerly, a small call measures the
    # host's launch (session 16: 0.065-0.08 ms floors on a slow host, 0.012-0.05 in session 15)
    return median_ms(graph_of(run).replay)


def check_against_reference(name, seed, device, gen) -> float:
    """Relative error of the kernels vs the float64 reference on a small ragged store with every
    default tier (the timed configuration must compute the right thing)."""
    from sphkv_compile.store import attend as reference_attend
    from sphkv_compile.tiers import DEFAULT_TIERS

    Hq, Hkv, d = SHAPES[name]
    B, T = 2, 3000
    specs = list(DEFAULT_TIERS)
    states = []
    for spec in specs:
        kw, vw = record_words(spec, d, seed, torch.bfloat16)
        n = T // len(specs)
        pages = math.ceil(n / 64)
        st = TierState.allocate(B, Hkv, B * Hkv * pages, 64, kw + vw, pages, device)
        k = torch.randn(B, Hkv, n, d, device=device, generator=gen, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, n, d, device=device, generator=gen, dtype=torch.bfloat16)
        valid = torch.rand(B, Hkv, n, device=device, generator=gen) < 0.9
        from sphkv_compile.store import append_records
        append_records(st, kencode.encode_records(spec, k, v, seed, torch.bfloat16), None, valid, spec.name)
        states.append(st)
    q = torch.randn(B, Hq, 1, d, device=device, generator=gen, dtype=torch.bfloat16)
    kn = torch.randn(B, Hkv, 1, d, device=device, generator=gen, dtype=torch.bfloat16)
    vn = torch.randn_like(kn)
    out, _ = kattend.attend(q, states, specs, seed=seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=vn)
    ref, _ = reference_attend(q.double(), states, specs, seed=seed, kv_dtype=torch.bfloat16, k_new=kn.double(),
                              v_new=vn.double())
    return float((out.double() - ref).norm() / ref.norm())


def sweep_configs(name, B, T, opts, seed, device, gen, configs):
    """sphkv decode time (CUDA graph replay) per (BLOCK_T, warps, stages, precision)."""
    Hq, Hkv, d = SHAPES[name]
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, T - 1, specs, opts, seed, device, gen)
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    vn = torch.randn_like(kn)
    out = []
    for bt, warps, stages, prec in configs:
        def run():
            return kattend.attend(q, states, specs, seed=seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=vn,
                                  block_t=bt, num_warps=warps, num_stages=stages, precision=prec)
        try:
            run()
            torch.cuda.synchronize()
            g = graph_of(run)
            out.append({"shape": name, "B": B, "T": T, "block_t": bt, "warps": warps, "stages": stages,
                        "precision": prec, "ms": median_ms(g.replay)})
        except Exception as err:  # a config that does not compile (shared memory) is reported, not fatal
            out.append({"block_t": bt, "warps": warps, "stages": stages, "precision": prec, "error": repr(err)[:200]})
    del states
    torch.cuda.empty_cache()
    return out


def bench_decode_row(name, B, T, opts, value_codec, seed, device, gen, log):
    Hq, Hkv, d = SHAPES[name]
    row = {"shape": name, "B": B, "T": T, "value_codec": value_codec}
    dense_bytes = 2 * B * Hkv * T * d * 2
    row["dense_MB"] = dense_bytes / 1e6
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    if value_codec == "polar":
        k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        for be in ("cudnn", "flash"):
            try:
                ms = dense_decode(q, k, v, be)
                row[f"{be}_ms"] = ms
                row[f"{be}_GBs"] = dense_bytes / (ms * 1e-3) / 1e9
            except RuntimeError as err:
                row[f"{be}_ms"] = None
                log.write(f"{name} B={B} T={T} {be}: {err}\n")
        del k, v
        torch.cuda.empty_cache()
    bits = opts.bits
    specs = [TierSpec("exact"), TierSpec("uniform", float(bits), value_codec,
                                         float(bits) if value_codec == "polar" else int(bits))]
    states, comp_n, exact_n = build_store(B, Hkv, d, T - 1, specs, opts, seed, device, gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    vn = torch.randn_like(kn)
    kw, vw = record_words(specs[1], d, seed, torch.bfloat16)
    ew = sum(record_words(specs[0], d, seed, torch.bfloat16))
    comp_bytes = B * Hkv * (comp_n * (kw + vw) * 4 + exact_n * ew * 4 + 2 * d * 2)
    comp_bytes += sum(s.pages.numel() * 4 for s in states)
    row["compressed_MB"] = comp_bytes / 1e6

    def run():
        return kattend.attend(q, states, specs, seed=seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=vn)

    run()
    torch.cuda.synchronize()
    row["sphkv_eager_ms"] = median_ms(run)
    g = graph_of(run)
    row["sphkv_ms"] = median_ms(g.replay)
    row["sphkv_GBs"] = comp_bytes / (row["sphkv_ms"] * 1e-3) / 1e9
    dense = [row.get(f"{b}_ms") for b in ("cudnn", "flash") if row.get(f"{b}_ms")]
    if dense:
        row["best_dense_ms"] = min(dense)
        row["speedup"] = row["best_dense_ms"] / row["sphkv_ms"]
        row["target_speedup"] = 0.75 * dense_bytes / comp_bytes
    del states, g
    torch.cuda.empty_cache()
    return row


def bench_encode(opts, seed, device, gen, T=32768):
    Hq, Hkv, d = SHAPES["llama3-8b"]
    spec = TierSpec("uniform", float(opts.bits), opts.value_codec, float(opts.bits))
    k = torch.randn(1, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    enc_ms = median_ms(lambda: kencode.encode_records(spec, k, v, seed, torch.bfloat16), rep=50)
    q = torch.randn(1, Hq, T, d, device=device, dtype=torch.bfloat16, generator=gen)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def prefill(be):
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    best = None
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            prefill(be)
            ms = median_ms(lambda: prefill(be), rep=50)
            best = ms if best is None else min(best, ms)
        except RuntimeError:
            pass
    tokens = Hkv * T
    return {"T": T, "encode_ms": enc_ms, "encode_Mtok_per_s": tokens / (enc_ms * 1e-3) / 1e6,
            "input_GBs": 2 * k.numel() * 2 / (enc_ms * 1e-3) / 1e9, "prefill_ms": best,
            "encode_over_prefill": None if best is None else enc_ms / best}


def compile_in_parallel(script: str, flag: str, values) -> None:
    """Run `script flag value` for every value in parallel processes and wait: Triton compiles
    serially in a process, and its disk cache then serves the timing process."""
    import subprocess
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, script, flag, str(v)]) for v in values]
    print(f"warm compile: exit codes {[p.wait() for p in procs]} in {time.time() - t0:.0f} s", flush=True)


def sweep_setup(script: str, settings: int, warm, parser: argparse.ArgumentParser | None = None):
    """The command line of a settings sweep (sweep_coded.py, sweep_encode.py): --out, and a hidden
    --warm I with which a child process compiles setting I (warm(I)) and the run ends (None is
    returned). Otherwise every setting is compiled in parallel children first, and the parsed
    arguments are returned for the timing."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--warm", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm is not None:
        warm(args.warm)
        return None
    compile_in_parallel(script, "--warm", range(settings))
    return args


def warm_compile(shapes) -> None:
    """Compile every kernel the run needs first, one process per shape (plus the scalar-value tier)."""
    compile_in_parallel(__file__, "--warm-shape", shapes)


def _warm_shape(name: str) -> None:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    check_against_reference(name, opts.seed, device, gen)
    Hq, Hkv, d = SHAPES[name]
    for codec, bits in (("polar", float(opts.bits)), ("scalar", int(opts.bits))):
        specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), codec, bits)]
        states, _, _ = build_store(1, Hkv, d, 300, specs, opts, opts.seed, device, gen)
        q = torch.randn(1, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        kn = torch.randn(1, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
        kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm-shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--encode-only", action="store_true", help="only the encode measurement")
    ap.add_argument("--sweep", action="store_true", help="time kernel configurations first")
    ap.add_argument("--scalar-points", default="llama3-8b:8:32768,llama3-8b:32:131072",
                    help="shape:B:T points also timed with scalar values")
    args = ap.parse_args()
    if args.warm_shape:
        return _warm_shape(args.warm_shape)
    warm_compile(list(SHAPES))
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    seed = opts.seed
    log = open(os.path.join(args.out, "bench_log.txt"), "w")
    name = torch.cuda.get_device_name(device)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "options": {"bits": opts.bits, "value_codec": opts.value_codec, "sink": opts.sink,
                          "recent": opts.recent, "page_size": opts.page_size}}
    result["copy_GBs"] = copy_bandwidth(device) / 1e9
    result["rel_err_vs_float64"] = {s: check_against_reference(s, seed, device, gen) for s in SHAPES}
    print("relative error vs float64 reference:", result["rel_err_vs_float64"])
    if args.sweep:
        configs = [(bt, w, 1, "tf32") for bt in (32, 64) for w in (4, 8)]
        result["sweep"] = sweep_configs("llama3-8b", 8, 32768, opts, seed, device, gen, configs)
        result["sweep"] += sweep_configs("smollm2", 8, 32768, opts, seed, device, gen, configs)
        for r in result["sweep"]:
            print("sweep", json.dumps(r))
    if args.encode_only:
        result["encode"] = bench_encode(opts, seed, device, gen)
        print(json.dumps(result, indent=1))
        with open(os.path.join(args.out, "bench_encode.json"), "w") as f:
            json.dump(result, f, indent=1)
        return
    Ts = [4096, 32768] if args.quick else [4096, 16384, 32768, 65536, 131072]
    Bs = [1, 8] if args.quick else [1, 8, 32]
    rows = []
    for shape in SHAPES:
        for B in Bs:
            for T in Ts:
                t0 = time.time()
                r = bench_decode_row(shape, B, T, opts, "polar", seed, device, gen, log)
                r["wall_s"] = time.time() - t0
                rows.append(r)
                print(json.dumps(r), flush=True)  # as it comes: a run cut short still says what it measured
                log.write(json.dumps(r) + "\n")
                log.flush()
    for point in args.scalar_points.split(","):
        if not point:
            continue
        shape, B, T = point.split(":")
        if args.quick and int(T) > 32768:
            continue
        r = bench_decode_row(shape, int(B), int(T), opts, "scalar", seed, device, gen, log)
        rows.append(r)
    result["decode"] = rows
    result["encode"] = bench_encode(opts, seed, device, gen)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(format_table(result))


def format_table(result) -> str:
    out = [f"device: {result['device']}  torch {result['torch']}  triton {result['triton']}  "
           f"copy {result['copy_GBs']:.0f} GB/s"]
    out.append(f"{'shape':10} {'vals':6} {'B':>3} {'T':>7} {'cudnn':>8} {'flash':>8} {'sphkv':>8} {'eager':>8} "
               f"{'GB/s':>6} {'speedup':>7} {'target':>6}")
    for r in result["decode"]:
        f = lambda k: f"{r[k]:8.3f}" if r.get(k) is not None else f"{'-':>8}"
        out.append(f"{r['shape']:10} {r['value_codec']:6} {r['B']:3d} {r['T']:7d} {f('cudnn_ms')} {f('flash_ms')} "
                   f"{f('sphkv_ms')} {f('sphkv_eager_ms')} {r['sphkv_GBs']:6.0f} "
                   f"{r.get('speedup', float('nan')):7.2f} {r.get('target_speedup', float('nan')):6.2f}")
    e = result["encode"]
    out.append(f"encode 32k tokens x 8 kv heads (K+V, d=128): {e['encode_ms']:.3f} ms "
               f"({e['encode_Mtok_per_s']:.0f} Mtok/s), dense prefill {e['prefill_ms']:.3f} ms, "
               f"ratio {e['encode_over_prefill']:.3f}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
