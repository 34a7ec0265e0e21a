"""Probe (session 21, #4): what limits the coded decode kernel, the decode trees or the rest?

The real kernel (paged_coded_halves_kernel through kernels.attend.attend) on the default 3.5-bit
polar tier, then on copies of the same store whose records hold, instead of codes:
- fp8: the polar-decoded values (rotated domain) as float8 e4m3 with one float32 scale per
  token; the keys stay polar;
- fp8kv: the polar-decoded keys and values both as fp8 + scale, so no decode tree runs at all.
Not a product codec (no encoder, reference or RDR pricing): a timing experiment with the
kernels' decoders swapped. The fp8 decoder reads record words one token per thread, as the
polar decoders do, and turns each word into four float16 leaves with two cvt.rn.f16x2.e4m3x2,
so the tile reaches the dots the same way and the scale plays the radius.

    python benchmarks/probe_fp8_values.py --out DIR [--kinds polar,fp8kv] [--settings "stages=2;warps=1,programs_per_sm=8"]

Checks first (GPU): the decoder against torch's float8 conversion (max |error| must be 0). Each
row reports its output's relative difference from the polar tier at the default setting: the fp8
kinds differ from it by the fp8 rounding of the decoded values (~3%), a setting of the polar
kind by float16 reassociation only (~1e-3); a wrong byte order or scale would read ~1. Times are
CUDA-graph replays of the whole attend call, do_bench medians, against the faster of cuDNN and
flash SDPA in the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
import triton
import triton.language as tl

import bench_decode as bd
from coded_flags import parse
from sphkv_compile.kernels import attend as kattend
from sphkv_compile.kernels.decode_codegen import _DECODER, _join_tile, _Writer, load_generated
from sphkv_compile.kernels.layout import tier_info
from sphkv_compile.options import SphkvOptions
from sphkv_compile.store import TierState
from sphkv_compile.tiers import TierSpec, tier_codecs

FP8_MAX = 448.0
_CVT4 = ("{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
         "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }")


def fp8_layout(key_words: int, d: int) -> tuple[int, int, int]:
    """(scale word, first value word, record words): the scale in the key record's padding, the
    values 16-byte aligned after it (so a group of four words is one 16-byte load)."""
    scale_word = key_words
    voff = -(-(key_words + 1) // 4) * 4
    return scale_word, voff, voff + d // 4


def fp8_decoder(d: int, voff: int, scale_word: int, stride: int, part: int | None):
    """decode(pool_ptr, base, valid, tab_ptr, ...) -> float16 tile (values / scale) [, scale]."""
    w = _Writer(voff, d // 4, stride)
    span = range(d // 4) if part is None else range(part * d // 8, (part + 1) * d // 8)
    leaves = []
    for j in span:
        names = [f"x{4 * j + b}" for b in range(4)]
        w.emit(f'{", ".join(names)} = tl.inline_asm_elementwise("{_CVT4}", "=h,=h,=h,=h,r", [{w.word(j)}], '
               f"dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)")
        leaves += names
    scale = None
    if part in (None, 0):
        w.emit(f"s = tl.load(pool_ptr + base + {scale_word}, mask=valid, other=0).to(tl.float32, bitcast=True)")
        scale = "s"
    _join_tile(w, leaves, scale)
    return load_generated(_DECODER + "\n".join(w.lines) + "\n")


@triton.jit
def _decode_probe_kernel(pool_ptr, out_ptr, scale_ptr, n, DECODE0: tl.constexpr, DECODE1: tl.constexpr,
                         WT: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < n
    base = t.to(tl.int64) * WT
    a, s = DECODE0(pool_ptr, base, valid, pool_ptr, BLOCK_T, 1.0, 0.0)
    b = DECODE1(pool_ptr, base, valid, pool_ptr, BLOCK_T, 1.0, 0.0)
    H: tl.constexpr = D // 2
    cols = tl.arange(0, H)
    tl.store(out_ptr + t[:, None] * D + cols[None, :], a, mask=valid[:, None])
    tl.store(out_ptr + t[:, None] * D + H + cols[None, :], b, mask=valid[:, None])
    tl.store(scale_ptr + t, s, mask=valid)


def fp8_records(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] float values -> ([n, d/4] int32 words of fp8(values / scale), [n] float32 scale)."""
    amax = values.abs().amax(-1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q8 = (values.float() / scale[:, None]).to(torch.float8_e4m3fn)
    return q8.contiguous().view(torch.int32), scale


def check_decoder(d: int, device) -> float:
    """Largest |decoded - torch's fp8 -> float16| over random records (0 if the byte order holds)."""
    n, kw = 1000, 14
    scale_word, voff, wt = fp8_layout(kw, d)
    vals = torch.randn(n, d, device=device) * torch.rand(n, 1, device=device) * 100
    words, scale = fp8_records(vals)
    pool = torch.randint(-2**31, 2**31 - 1, (n, wt), dtype=torch.int32, device=device)
    pool[:, voff:] = words
    pool[:, scale_word] = scale.view(torch.int32)
    out = torch.empty(n, d, dtype=torch.float16, device=device)
    got_scale = torch.empty(n, dtype=torch.float32, device=device)
    _decode_probe_kernel[(triton.cdiv(n, 128),)](pool, out, got_scale, n, DECODE0=fp8_decoder(d, voff, scale_word, wt, 0),
                                                 DECODE1=fp8_decoder(d, voff, scale_word, wt, 1), WT=wt, D=d, BLOCK_T=128)
    want = words.view(torch.float8_e4m3fn).view(n, d).to(torch.float16)
    assert torch.equal(got_scale, scale), "scale word"
    return float((out.float() - want.float()).abs().max())


def fp8_layout_both(d: int) -> tuple[int, int, int, int, int]:
    """Keys and values both fp8: (key scale word, value scale word, key words start, value words
    start, record words)."""
    return d // 4, d // 4 + 1, 0, d // 4 + 4, d // 2 + 4


def widen_to_fp8(st: TierState, spec: TierSpec, d: int, seed: int, keys_too: bool = False):
    """A copy of a polar tier's state whose records carry the polar-decoded values (rotated
    domain) as fp8 with a scale, and the polar keys (keys_too: the polar-decoded keys as fp8 too).
    Returns (state, layout): layout maps "k"/"v" to (scale word, first word) of an fp8 part."""
    info = tier_info(spec, d, seed, torch.bfloat16)
    kw, vw = info.key_words, info.value_words
    kcodec, vcodec = tier_codecs(spec, d, seed)
    if keys_too:
        ks, vs, k0, v0, wt = fp8_layout_both(d)
        layout = {"k": (ks, k0), "v": (vs, v0)}
    else:
        vs, v0, wt = fp8_layout(kw, d)
        layout = {"v": (vs, v0)}
    recs = st.pool.view(-1, kw + vw)
    pool = torch.zeros(*st.pool.shape[:2], wt, dtype=torch.int32, device=st.pool.device)
    flat = pool.view(-1, wt)
    chunk = 1 << 20
    for i in range(0, recs.shape[0], chunk):
        r = recs[i:i + chunk]
        words, scale = fp8_records(vcodec.decode_rotated(r[:, kw:]))
        flat[i:i + chunk, vs] = scale.view(torch.int32)
        flat[i:i + chunk, v0:v0 + d // 4] = words
        if keys_too:
            words, scale = fp8_records(kcodec.decode_rotated(r[:, :kw]))
            flat[i:i + chunk, ks] = scale.view(torch.int32)
            flat[i:i + chunk, k0:k0 + d // 4] = words
        else:
            flat[i:i + chunk, :kw] = r[:, :kw]
    return TierState(pool, st.utility, st.pages, st.count, st.free, st.free_top), layout, wt


class Fp8Records:
    """Swap the coded kernels' value decoder (and with "k" in layout, the key decoder) for
    fp8_decoder while active."""

    def __init__(self, d, layout, wt):
        self.args = (d, layout, wt)
        self.original = kattend.decoder

    def __enter__(self):
        d, layout, wt = self.args
        original = self.original

        def patched(t, word_offset, stride, leaf=None, *part, smem=None, packed=False):
            kind = "k" if word_offset == 0 else "v"  # keys start at word 0 of a polar record
            if kind in layout:
                if stride != wt:
                    raise ValueError(f"record stride {stride}, expected {wt}")
                scale_word, first = layout[kind]
                return fp8_decoder(d, first, scale_word, wt, *(part[:1] or (None,)))
            return original(t, word_offset, stride, leaf, *part, smem=smem, packed=packed)

        kattend.decoder = patched
        return self

    def __exit__(self, *exc):
        kattend.decoder = self.original


class CodedSetting:
    """kernels.attend.CODED entries set from "key=value[,key=value]" while active ("" = defaults)."""

    def __init__(self, text: str):
        self.setting = parse(kv.split("=") for kv in text.split(",") if kv)
        self.saved = {}

    def __enter__(self):
        self.saved = {key: kattend.CODED[key] for key in self.setting}
        kattend.CODED.update(self.setting)
        return self

    def __exit__(self, *exc):
        kattend.CODED.update(self.saved)


def time_point(name, B, T, opts, seed, device, gen, kinds, settings) -> list[dict]:
    """One row per (setting, kind): CUDA-graph replay ms against the faster dense SDPA, and the
    output's relative difference from the polar tier at the default setting."""
    Hq, Hkv, d = bd.SHAPES[name]
    spec = TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))
    specs = [TierSpec("exact"), spec]
    q = torch.randn(B, Hq, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, T, d, device=device, dtype=torch.bfloat16, generator=gen)
    dense = {be: bd.dense_decode(q, k, torch.randn_like(k), be) for be in ("cudnn", "flash")}
    del k
    torch.cuda.empty_cache()
    states, comp_n, exact_n = bd.build_store(B, Hkv, d, T - 1, specs, opts, seed, device, gen)
    kn = torch.randn(B, Hkv, 1, d, device=device, dtype=torch.bfloat16, generator=gen)
    vn = torch.randn_like(kn)
    info = tier_info(spec, d, seed, torch.bfloat16)

    def run(sts):
        return lambda: kattend.attend(q, sts, specs, seed=seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=vn)

    reference = run(states)()[0].float()
    stores = {"polar": (states[1], None, info.key_words + info.value_words)}
    for kind in kinds:
        if kind != "polar":
            stores[kind] = widen_to_fp8(states[1], spec, d, seed, keys_too=kind == "fp8kv")
    rows = []
    for setting in settings:
        with CodedSetting(setting):
            for kind in kinds:
                tier, layout, wt = stores[kind]
                swap = Fp8Records(d, layout, wt) if layout else contextlib.nullcontext()
                with swap:
                    out = run([states[0], tier])()[0].float()
                    ms = bd.median_ms(bd.graph_of(run([states[0], tier])).replay)
                comp = B * Hkv * comp_n * wt * 4
                rows.append({"shape": name, "B": B, "T": T, "setting": setting or "defaults", "kind": kind,
                             **{f"{be}_ms": v for be, v in dense.items()}, "ms": ms,
                             "speedup": min(dense.values()) / ms, "GBs": comp / (ms * 1e-3) / 1e9,
                             "record_bytes": wt * 4, "dense_record_bytes": 4 * d,
                             "rel_diff_from_polar_defaults": float((out - reference).norm() / reference.norm())})
    del states, stores
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--points", default="llama3-8b:1:32768,llama3-8b:8:32768,llama3-8b:32:131072,"
                                        "smollm2:8:32768,llama3-8b:1:4096")
    ap.add_argument("--kinds", default="polar,fp8,fp8kv", help="polar (the tier as is), fp8 (fp8 values), "
                    "fp8kv (fp8 keys and values: no decode trees at all)")
    ap.add_argument("--settings", default="", help='";"-separated CODED settings, each "key=value[,key=value]"')
    ap.add_argument("--name", default="probe_fp8_values")
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    opts = SphkvOptions()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "decoder_max_abs_err": {d: check_decoder(d, device) for d in (64, 128)}, "rows": []}
    print("decoder check (max |err|, 0 expected):", result["decoder_max_abs_err"], flush=True)
    print(f"{'point':24} {'setting':28} {'kind':6} {'dense':>7} {'ms':>7} {'x dense':>8} {'GB/s':>6} {'B/token':>7} "
          f"{'diff vs polar':>13}", flush=True)
    for p in args.points.split(","):
        name, B, T = p.split(":")
        for row in time_point(name, int(B), int(T), opts, 0, device, gen, args.kinds.split(","),
                              args.settings.split(";")):
            result["rows"].append(row)
            print(f"{name + ' B=' + B + ' T=' + T:24} {row['setting']:28} {row['kind']:6} "
                  f"{min(row['cudnn_ms'], row['flash_ms']):7.3f} {row['ms']:7.3f} {row['speedup']:8.2f} "
                  f"{row['GBs']:6.0f} {row['record_bytes']:7} {row['rel_diff_from_polar_defaults']:13.2e}", flush=True)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
