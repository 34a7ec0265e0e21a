"""Compile-only: the fragment kernel's sm_90 loop with whole 3-bit codes instead of split ones.

Today's records split each 3-bit code into a 2-bit and a 1-bit run (sphkv_compile.packing), so a
code takes two extractions and an OR. This builds the default tier's tables with a hypothetical
layout that keeps every code whole and contiguous (runs largest first, densely packed: the same
14 words at d=128) and compiles the kernel for sm_90 with it. The lanes' chunks of a run may then
straddle two words: fragment_codegen funnel-shifts them. Nothing here runs: the records of this
layout do not exist (the encoder, packing and the other decoders assume no code straddles a
word), so this only counts instructions.

    python benchmarks/probe_whole_codes_compile.py [d ...]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compile_check import sass_summary  # noqa: E402
from sphkv_compile.kernels import fragment_launch  # noqa: E402
from sphkv_compile.kernels.layout import tier_info  # noqa: E402
from sphkv_compile.packing import Component  # noqa: E402
from sphkv_compile.tiers import TierSpec  # noqa: E402


@dataclasses.dataclass(frozen=True)
class WholeCodeLayout:
    """Every field's codes in one run of full-width codes, runs largest first, packed densely."""

    fields: tuple[tuple[int, int], ...]
    subtree_aligned: bool = True  # (what fragment_codegen checks; its funnel shifts cover the rest)

    @property
    def components(self) -> tuple[Component, ...]:
        runs = sorted(((n * b, f, n, b) for f, (n, b) in enumerate(self.fields) if n and b), key=lambda r: -r[0])
        out, offset = [], 0
        for size, f, n, b in runs:
            out.append(Component(f, n, b, 0, offset))
            offset += size
        return tuple(out)


def whole(tables):
    layout = tables.fields.layout
    return dataclasses.replace(tables, fields=dataclasses.replace(tables.fields, layout=WholeCodeLayout(layout.fields)))


def main(dims):
    for d in dims:
        info = tier_info(TierSpec("uniform", 3.5, "polar", 3.5), d, 0, torch.bfloat16)
        for label, tier in (("split codes (today)", info),
                            ("whole codes", dataclasses.replace(info, key=whole(info.key), value=whole(info.value)))):
            print(f"d={d} {label}: runs", [(c.field, c.count, c.width, c.offset) for c in tier.key.fields.layout.components])
            sass_summary(fragment_launch.compile_for_target(tier, d))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [128, 64])
