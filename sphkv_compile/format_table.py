"""Print the storage cost of every default tier: `python -m sphkv_compile.format_table`."""
from __future__ import annotations

import argparse

import torch

from .store import UTILITY_DTYPE
from .tiers import DEFAULT_TIERS, record_words, tier_codecs


def rows(head_dim: int, kv_dtype=torch.bfloat16, seed: int = 0):
    dense = 2 * head_dim * 2  # K and V in 16 bits
    meta = torch.empty((), dtype=UTILITY_DTYPE).element_size()
    for spec in DEFAULT_TIERS:
        kw, vw = record_words(spec, head_dim, seed, kv_dtype)
        if spec.exact:
            kdesc = vdesc = str(kv_dtype).replace("torch.", "")
        else:
            kc, vc = tier_codecs(spec, head_dim, seed)
            kdesc = f"polar {kc.level_bits}"
            vdesc = f"{spec.value_codec} " + (str(vc.level_bits) if hasattr(vc, "level_bits") else f"{vc.bits} bits")
        rec = 4 * (kw + vw)
        yield spec.name, kdesc, vdesc, kw, vw, rec, rec + meta, dense / (rec + meta)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args(argv)
    for d in args.head_dims:
        print(f"\nhead_dim={d} (dense bf16 K+V: {4 * d} bytes per token per KV head)\n")
        print("| tier | K layout (bits per level) | V layout | K words | V words | record bytes | + utility | compression |")
        print("|---|---|---|---|---|---|---|---|")
        for name, kd, vd, kw, vw, rec, tot, ratio in rows(d):
            print(f"| {name} | {kd} | {vd} | {kw} | {vw} | {rec} | {tot} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
