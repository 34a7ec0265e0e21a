"""Would decoding straight into the tensor cores' operand fragments make decode faster? A speed
probe in Gluon (Triton's explicit-layout dialect), on the GPU:

    python benchmarks/probe_gluon_fragments.py [--out DIR] [--compile-only]

Session 23's probe_fragment_layouts.py proved that a decoded tile can be built per lane in
mma_v2's operand layouts (no shared-memory round trip). This probe times a whole decode kernel
built that way, with each warp running its own online softmax over its own tokens (a batched
mma, warps on the batch axis, no cross-warp barrier in the loop; the warps' states merge once at
the end), against today's kernel (attend(), CUDA-graph replay) and cuDNN bf16 in the same run.

The fragments fix which coordinates a lane decodes: for keys (the B operand of q @ k^T) a lane
holds 32 coordinates of a token, one quarter subtree of the polar tree (4 lanes per token); for
values (the B operand of p @ v) 16 coordinates, one octant subtree (8 lanes per token). Each lane
must then find its subtree's codes at a place that depends on its lane. Today's record layout
(split-width packing, level-major) does not allow that, so the probe uses a synthetic record of
the same 28 words (112 bytes, K and V) where each subtree's codes sit in its own words:
- K: words 3s, 3s+1: quarter s's 16 level-1 codes (4 bits); word 3s+2: its levels 2-5 (2 bits
  each; level 2 at bit 0, 3 at 16, 4 at 24, 5 at 28); word 12: the radius (float32); word 13:
  level 6 (bits 0-3) and the root (bits 4-5).
- V: word 14+o: octant o's 8 level-1 codes; half-word o%2 of word 22+o//2: its levels 2-4
  (bits 0, 8, 12); word 26: levels 5 (bits 0-7), 6 (bits 8-11) and the root (bits 12-13); word
  27: the radius.
So the codec is (4,2,2,2,2,2,2) bits per level, about what the default 3.5-bit tier's trees cost
per node (its 3-bit codes are split in two fields, one more extraction each). The (cos, sin)
tables sit in shared memory as float16 pairs and the trees run in f16x2, as today. The output
is checked against a float64 decode of the same records. A probe, not a kernel: it answers
whether a format change and a Gluon kernel are worth building.

Results (docs/PERFORMANCE_HISTORY.md, session 24): 1.22-1.48x today's kernel at Llama-3-8B decode points,
0.86-0.95x cuDNN. A kernel built this way on the real records (commits c04e68f..81acd00) was
slower than today's and was removed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from sphkv_compile.kernels.decode_codegen import join_tree, load_generated
from sphkv_compile.kernels.fragment_codegen import DECODER_HEADER as FRAGMENT_HEADER, FRAGMENT_TABLES, _lookup_source

D = 128
KEY_RADIUS, KEY_TOP = 12, 13
# polar values, relative to the first value word
VALUE_LEVEL1, VALUE_UPPER, VALUE_TOP, VALUE_RADIUS = 0, 8, 12, 13
# the words each half of a record takes: polar 14 (112 bytes K+V), int4 16 codes + 1 radius
HALF_WORDS = {"polar": 14, "int4": 17}
KEY_UPPER_BIT = {2: 0, 3: 16, 4: 24, 5: 28}
VALUE_UPPER_BIT = {2: 0, 3: 8, 4: 12}
LEVELS = 7


def table_offset(level: int) -> int:
    """Byte offset of a level's (cos, sin) pairs in the shared table: 16 pairs for level 1, 4 above."""
    return 0 if level == 1 else 64 + 16 * (level - 2)


TABLE_WORDS = (64 + 16 * (LEVELS - 1)) // 4


def angles(level: int) -> torch.Tensor:
    if level == 1:
        return 2 * math.pi * (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    spread = 0.5 / level  # narrower higher up, as the real codebooks
    return math.pi / 4 + spread * torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)


def table_words() -> torch.Tensor:
    words = []
    for level in range(1, LEVELS + 1):
        a = angles(level)
        pairs = torch.stack([a.cos(), a.sin()], -1).to(torch.float16).contiguous()
        words.append(pairs.view(torch.int32).view(-1))
    return torch.cat(words)


# --- where each code sits (host side, for the reference) ---------------------------------------

def key_position(level: int, node: int) -> tuple[int, int, int]:
    """(word, bit, width) of the key tree's node (level, index from the left)."""
    if level == 1:
        s, p = divmod(node, 16)
        return 3 * s + p // 8, 4 * (p % 8), 4
    if level <= 5:
        s, i = divmod(node, 1 << (5 - level))
        return 3 * s + 2, KEY_UPPER_BIT[level] + 2 * i, 2
    if level == 6:
        return KEY_TOP, 2 * node, 2
    return KEY_TOP, 4, 2


def value_position(level: int, node: int, vb: int = HALF_WORDS["polar"]) -> tuple[int, int, int]:
    if level == 1:
        o, p = divmod(node, 8)
        return vb + VALUE_LEVEL1 + o, 4 * p, 4
    if level <= 4:
        o, i = divmod(node, 1 << (4 - level))
        return vb + VALUE_UPPER + o // 2, 16 * (o % 2) + VALUE_UPPER_BIT[level] + 2 * i, 2
    return vb + VALUE_TOP, {5: 0, 6: 8, 7: 12}[level] + 2 * node, 2


def decode_int4_reference(records: torch.Tensor, first: int) -> torch.Tensor:
    """float64 [..., D] of int4 codes: coordinate c is nibble c % 8 of word first + c // 8, minus 8."""
    words = records[..., first:first + D // 8].to(torch.int64) & 0xFFFFFFFF
    nib = (words[..., :, None] >> (4 * torch.arange(8, device=records.device))) & 15
    return nib.reshape(*records.shape[:-1], D).double() - 8


class Format:
    """Which codec each half of the synthetic record uses, and where its words sit."""

    def __init__(self, key: str, value: str):
        self.key, self.value = key, value
        self.vb = HALF_WORDS[key]
        self.words = self.vb + HALF_WORDS[value]
        self.key_radius = KEY_RADIUS if key == "polar" else D // 8
        self.value_radius = self.vb + (VALUE_RADIUS if value == "polar" else D // 8)
        self.name = f"{key}-{value}"

    def decode_keys(self, rec: torch.Tensor) -> torch.Tensor:
        unit = decode_reference(rec, key_position) if self.key == "polar" else decode_int4_reference(rec, 0)
        return unit * rec[:, self.key_radius].view(torch.float32).double()[:, None]

    def decode_values(self, rec: torch.Tensor) -> torch.Tensor:
        if self.value == "polar":
            unit = decode_reference(rec, lambda level, node: value_position(level, node, self.vb))
        else:
            unit = decode_int4_reference(rec, self.vb)
        return unit * rec[:, self.value_radius].view(torch.float32).double()[:, None]


def decode_reference(records: torch.Tensor, position) -> torch.Tensor:
    """float64 unit vectors [..., D] of the records' trees (tree coordinate order)."""
    words = records.to(torch.int64) & 0xFFFFFFFF
    out = torch.ones(*records.shape[:-1], D, dtype=torch.float64, device=records.device)
    for level in range(1, LEVELS + 1):
        a = angles(level).to(records.device)
        for node in range(D >> level):
            word, bit, width = position(level, node)
            code = (words[..., word] >> bit) & ((1 << width) - 1)
            lo = node << level
            half = 1 << (level - 1)
            out[..., lo:lo + half] *= a[code].cos()[..., None]
            out[..., lo + half:lo + 2 * half] *= a[code].sin()[..., None]
    return out


# --- the generated Gluon source -----------------------------------------------------------------

def _offset(word: str, bit: int, width: int) -> str:
    """code * 4 (a byte offset into 4-byte table entries) of the field at word, bit."""
    mask = ((1 << width) - 1) << 2
    if bit >= 2:
        return f"(({word} >> {bit - 2}) & {mask})"
    return f"(({word} << {2 - bit}) & {mask})"


def _subtree(lines: list[str], prefix: str, root_level: int, root: str, position) -> list[str]:
    """Emit the nodes of a subtree from its root's value down; return the leaves in order."""
    values = [root]
    for level in range(root_level, 0, -1):
        nxt = []
        for i, v in enumerate(values):
            word, bit, width = position(level, i)
            a, b = f"{prefix}{level}_{2 * i}", f"{prefix}{level}_{2 * i + 1}"
            lines.append(f"    {a}, {b} = children({v}, lookup({_offset(word, bit, width)} + {table_offset(level)}))")
            nxt += [a, b]
        values = nxt
    return values


def _join(lines: list[str], leaves: list[str], prefix: str) -> str:
    return join_tree(leaves, lambda line: lines.append("    " + line), "gl.join", f"{prefix}j")


def key_decoder_source() -> str:
    lines = ["@gluon.jit", "def key_quarter(pool_ptr, base, s, valid):",
             "    # base: each token's first record word; s: the lane's quarter (0-3)",
             "    qa = base + 3 * s",
             "    a0 = word(pool_ptr, qa, valid)",
             "    a1 = word(pool_ptr, qa + 1, valid)",
             "    a2 = word(pool_ptr, qa + 2, valid)",
             f"    top = word(pool_ptr, base + {KEY_TOP}, valid)",
             f"    c7, s7 = halves(lookup(((top >> 2) & 12) + {table_offset(7)}))",
             "    x = gl.where(s >= 2, s7, c7)",
             "    sh = ((s >> 1) * 2).to(gl.uint32)",
             f"    c6, s6 = halves(lookup((((top >> sh) & 3) << 2) + {table_offset(6)}))",
             "    x = x * gl.where((s & 1) == 1, s6, c6)"]

    def position(level, i):
        if level == 1:
            return ("a0" if i < 8 else "a1"), 4 * (i % 8), 4
        return "a2", KEY_UPPER_BIT[level] + 2 * i, 2

    leaves = _subtree(lines, "k", 5, "x", position)
    lines.append(f"    return {_join(lines, leaves, 'k')}")
    return "\n".join(lines) + "\n"


def value_decoder_source(vb: int) -> str:
    lines = ["@gluon.jit", "def value_octant(pool_ptr, base, o, valid):",
             f"    la = word(pool_ptr, base + {vb + VALUE_LEVEL1} + o, valid)",
             f"    ua = word(pool_ptr, base + {vb + VALUE_UPPER} + (o >> 1), valid)",
             "    ua = ua >> ((o & 1) * 16).to(gl.uint32)",
             f"    top = word(pool_ptr, base + {vb + VALUE_TOP}, valid)",
             f"    c7, s7 = halves(lookup(((top >> 10) & 12) + {table_offset(7)}))",
             "    x = gl.where(o >= 4, s7, c7)",
             "    sh6 = (6 + 2 * (o >> 2)).to(gl.uint32)",
             f"    c6, s6 = halves(lookup(((top >> sh6) & 12) + {table_offset(6)}))",
             "    x = x * gl.where(((o >> 1) & 1) == 1, s6, c6)",
             "    sh5 = (2 * (o >> 1)).to(gl.uint32)",
             f"    c5, s5 = halves(lookup((((top >> sh5) & 3) << 2) + {table_offset(5)}))",
             "    x = x * gl.where((o & 1) == 1, s5, c5)"]

    def position(level, i):
        if level == 1:
            return "la", 4 * i, 4
        return "ua", VALUE_UPPER_BIT[level] + 2 * i, 2

    leaves = _subtree(lines, "v", 4, "x", position)
    lines.append(f"    return {_join(lines, leaves, 'v')}")
    return "\n".join(lines) + "\n"


def int4_decoder_source(name: str, lane_arg: str, first: str, lane_words: int) -> str:
    """A lane's coordinates from int4 codes: lane_words consecutive words per lane, 8 codes each."""
    lines = ["@gluon.jit", f"def {name}(pool_ptr, base, {lane_arg}, valid):",
             f"    a = base + {first} + {lane_words} * {lane_arg}"]
    leaves = []
    for i in range(lane_words):
        lines.append(f"    w{i} = word(pool_ptr, a + {i}, valid)")
        names = [f"n{i}_{j}" for j in range(8)]
        lines.append(f"    {', '.join(names)} = nibbles(w{i})")
        leaves += names
    lines.append(f"    return {_join(lines, leaves, name[0])}")
    return "\n".join(lines) + "\n"


# int4 -> float16 without a table: OR the nibble under the exponent of 1024.0 (0x6400), then
# subtract 1032.0: (1024 + n) - 1032 = n - 8 exactly. One LOP3 and one HADD2 per two codes.
NIBBLES = '''
@gluon.jit
def nibbles(w):
    return gl.inline_asm_elementwise(
        "{ .reg .b32 t, u, m; mov.b32 m, 0x64086408; "
        "lop3.b32 t, $8, 0x000f000f, 0x64006400, 0xea; sub.rn.f16x2 t, t, m; mov.b32 {$0, $4}, t; "
        "shr.u32 u, $8, 4; lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea; sub.rn.f16x2 t, t, m; mov.b32 {$1, $5}, t; "
        "shr.u32 u, $8, 8; lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea; sub.rn.f16x2 t, t, m; mov.b32 {$2, $6}, t; "
        "shr.u32 u, $8, 12; lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea; sub.rn.f16x2 t, t, m; mov.b32 {$3, $7}, t; }",
        "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(gl.float16,) * 8, is_pure=True, pack=1)
'''


# lookup, halves and children: the production decoders' (fragment_codegen), on this probe's table
# (lookup: the table-offset-0 load, each call adding its table's offset to the code's)
HEADER = FRAGMENT_HEADER + _lookup_source(0) + f'''from triton.experimental.gluon.language.nvidia.ampere import mma_v2

lookup = lookup_at_0

from sphkv_compile.kernels.fragment_kernels import fragment_queries


@gluon.jit
def stage_tables(tab_ptr, layout: gl.constexpr, THREADS: gl.constexpr):
    i = gl.arange(0, THREADS, layout=layout)
    gl.inline_asm_elementwise(".shared .align 16 .b8 {FRAGMENT_TABLES}[{TABLE_WORDS * 4}];\\n mov.u32 $0, $1;", "=r,r",
                              [i], dtype=gl.int32, is_pure=False, pack=1)
    w = gl.load(tab_ptr + i, mask=i < {TABLE_WORDS}, other=0)
    gl.inline_asm_elementwise("{{ .reg .u32 a; .reg .pred p; setp.lt.u32 p, $2, {TABLE_WORDS}; mov.u32 a, {FRAGMENT_TABLES}; "
                              "mad.lo.u32 a, $2, 4, a; @p st.shared.u32 [a], $1; mov.u32 $0, 0; }}",
                              "=r,r,r", [w, i], dtype=gl.int32, is_pure=False, pack=1)
    # every lane's lookups wait for the whole table (gl.thread_barrier is not in every Triton)
    gl.inline_asm_elementwise("bar.sync 0; mov.u32 $0, $1;", "=r,r", [i], dtype=gl.int32, is_pure=False, pack=1)


'''

# Records read straight from global memory, each lane its own words.
GLOBAL_RECORDS = '''
@gluon.jit
def word(pool_ptr, addr, valid):
    return gl.load(pool_ptr + addr, mask=valid, other=0).to(gl.uint32, bitcast=True)


@gluon.jit
def tile_records(t0, end, pages_ptr, pid_bh, max_pages, w, t, PS: gl.constexpr, WT: gl.constexpr,
                 CT: gl.constexpr, W: gl.constexpr, stage_at):
    """Each token's first record word and validity: warp w takes tokens t0 + w*CT + [0, CT)."""
    slot = t0 + w * CT + t
    valid = slot < end
    page = gl.load(pages_ptr + pid_bh * max_pages + slot // PS, mask=valid, other=0)
    return (page.to(gl.int64) * PS + slot % PS) * WT, valid
'''

# Records staged in shared memory: each warp copies its own 32 tokens (half a page, contiguous)
# with 16-byte cp.async, one tile ahead, then its lanes read their words from shared memory.
STAGED_RECORDS = '''
@gluon.jit
def word(pool_ptr, addr, valid):
    return gl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, probe_records; mad.lo.u32 a, $1, 4, a; ld.shared.b32 $0, [a]; }",
        "=r,r", [addr.to(gl.int32)], dtype=gl.int32, is_pure=True, pack=1).to(gl.uint32, bitcast=True)


@gluon.jit
def tile_records(t0, end, pages_ptr, pid_bh, max_pages, w, t, PS: gl.constexpr, WT: gl.constexpr,
                 CT: gl.constexpr, W: gl.constexpr, stage_at):
    """Each token's first word in the staged tile and its validity."""
    return (w * CT + t) * WT + stage_at, t0 + w * CT + t < end


@gluon.jit
def copy_tile(pool_ptr, pages_ptr, pid_bh, max_pages, t0, end, stage, PS: gl.constexpr, WT: gl.constexpr,
              CT: gl.constexpr, W: gl.constexpr, NCH: gl.constexpr):
    CL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [W, 1], [1, 0])
    wc = gl.arange(0, W, layout=gl.SliceLayout(1, CL))
    c = gl.arange(0, NCH, layout=gl.SliceLayout(0, CL))
    slot0 = t0 + wc * CT
    ok = slot0 < end
    page = gl.load(pages_ptr + pid_bh * max_pages + slot0 // PS, mask=ok, other=0)
    src = pool_ptr + ((page.to(gl.int64) * PS + slot0 % PS) * WT)[:, None] + 4 * c[None, :]
    dst = ((stage * W + wc[:, None]) * (CT * WT) + 4 * c[None, :]) * 4
    pred = (ok[:, None] & (c[None, :] < CT * WT // 4)).to(gl.int32)
    gl.inline_asm_elementwise(
        "{ .reg .u32 a; .reg .pred p; setp.ne.u32 p, $3, 0; mov.u32 a, probe_records; add.u32 a, a, $1; "
        "@p cp.async.cg.shared.global [a], [$2], 16; mov.u32 $0, 0; }",
        "=r,r,l,r", [dst, src, pred], dtype=gl.int32, is_pure=False, pack=1)
    gl.inline_asm_elementwise("cp.async.commit_group; mov.u32 $0, $1;", "=r,r", [t0], dtype=gl.int32,
                              is_pure=False, pack=1)
'''

KERNEL = '''
@gluon.jit
def probe_kernel(q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, tab_ptr, M, max_pages, S,
                 PS: gl.constexpr, WT: gl.constexpr, D: gl.constexpr, CT: gl.constexpr, W: gl.constexpr):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    AOP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BOP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    # keys: (warp, token, quarter), lane bits 0-1 the quarter, 2-4 the token within an n8 tile
    KL: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 8, 4], [W, 1, 1], [2, 1, 0])
    # values: (warp, token, octant), token bit 0 in registers, bits 1-2 lane bits 0-1, octant lane bits 2-4
    VL: gl.constexpr = gl.BlockedLayout([1, 2, 1], [1, 4, 8], [W, 1, 1], [1, 2, 0])
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    stage_tables(tab_ptr, ONE, 32 * W)
    pid_bh = gl.program_id(0)
    {declare}
    pid_s = gl.program_id(1)
    count = gl.load(count_ptr + pid_bh)
    BLOCK: gl.constexpr = W * CT
    per = gl.cdiv(gl.cdiv(count, BLOCK), S) * BLOCK
    start = pid_s * per
    end = gl.minimum(count, start + per)

    qop, qs_c = fragment_queries(q_ptr, pid_bh * M, 0, M, D, W, MMA, AOP)

    m_i = gl.full([W, 16], float("-inf"), gl.float32, gl.SliceLayout(2, MMA))
    l_i = gl.zeros([W, 16], gl.float32, gl.SliceLayout(2, MMA))
    acc = gl.zeros([W, 16, D], gl.float32, MMA)

    wk = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, KL)))
    tk = gl.arange(0, CT, layout=gl.SliceLayout(0, gl.SliceLayout(2, KL)))
    sk = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, KL)))
    wv = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, VL)))
    tv = gl.arange(0, CT, layout=gl.SliceLayout(0, gl.SliceLayout(2, VL)))
    ov = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, VL)))
    wc = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(1, MMA)))
    tc = gl.arange(0, CT, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    {prologue}
    for t0 in range(start, end, BLOCK):
        {loop_top}
        kbase, kvalid = tile_records(t0, end, pages_ptr, pid_bh, max_pages, wk[:, None], tk[None, :], PS, WT, CT, W, stage_at)
        s3 = sk[None, None, :] + 0 * tk[None, :, None]
        j = key_quarter(pool_ptr, kbase[:, :, None] + 0 * s3, s3 + 0 * wk[:, None, None],
                        kvalid[:, :, None] & (s3 >= 0))
        k = gl.reshape(gl.permute(j, 0, 1, 3, 4, 5, 6, 2, 7), [W, CT, D])
        kt = gl.convert_layout(gl.permute(k, 0, 2, 1), BOP, assert_trivial=True)
        s = mma_v2(qop, kt, gl.zeros([W, 16, CT], gl.float32, MMA))

        cbase, cvalid = tile_records(t0, end, pages_ptr, pid_bh, max_pages, wc[:, None], tc[None, :], PS, WT, CT, W, stage_at)
        kr = word(pool_ptr, cbase + {key_radius}, cvalid).to(gl.float32, bitcast=True)
        vr = word(pool_ptr, cbase + {value_radius}, cvalid).to(gl.float32, bitcast=True)
        bias = gl.where(cvalid, 0.0, float("-inf"))
        s = s * gl.where(cvalid, kr, 0.0)[:, None, :] + bias[:, None, :]
        m_new = gl.maximum(m_i, gl.max(s, 2) * qs_c[None, :])
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp past the end has seen nothing yet
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s * qs_c[None, :, None] - m_safe[:, :, None])
        l_i = l_i * alpha + gl.sum(p, 2)
        wgt = p * gl.where(cvalid, vr, 0.0)[:, None, :]
        top = gl.max(wgt, 2)
        top = gl.where(top > 0, top, 1.0)
        pa = gl.convert_layout((wgt * (1.0 / top)[:, :, None]).to(gl.float16), AOP)

        vbase, vvalid = tile_records(t0, end, pages_ptr, pid_bh, max_pages, wv[:, None], tv[None, :], PS, WT, CT, W, stage_at)
        o3 = ov[None, None, :] + 0 * tv[None, :, None]
        jv = value_octant(pool_ptr, vbase[:, :, None] + 0 * o3, o3 + 0 * wv[:, None, None],
                          vvalid[:, :, None] & (o3 >= 0))
        v = gl.reshape(gl.permute(jv, 0, 1, 3, 4, 5, 6, 2), [W, CT, D])
        vb = gl.convert_layout(v, BOP, assert_trivial=True)
        acc = acc * alpha[:, :, None] + mma_v2(pa, vb, gl.zeros([W, 16, D], gl.float32, MMA)) * top[:, :, None]
        m_i = m_new

    # merge the warps' states once
    m_all = gl.max(m_i, 0)
    f = gl.exp2(m_i - gl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
    l_all = gl.sum(l_i * f, 0)
    acc_all = gl.sum(acc * f[:, :, None], 0)
    OUT: gl.constexpr = gl.SliceLayout(0, MMA)
    ro = gl.arange(0, 16, layout=gl.SliceLayout(1, OUT))
    no = gl.arange(0, D, layout=gl.SliceLayout(0, OUT))
    coord = (no & 7) * 16 + (no >> 3)  # value fragment column -> tree coordinate
    out = (pid_bh * S + pid_s) * M + ro
    gl.store(acc_ptr + out[:, None] * D + coord[None, :], acc_all, mask=ro[:, None] < M)
    r1 = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    out1 = (pid_bh * S + pid_s) * M + r1
    gl.store(m_ptr + out1, m_all, mask=r1 < M)
    gl.store(l_ptr + out1, l_all, mask=r1 < M)
'''


def kernel_source(fmt: Format, staged: bool, ct: int, warps: int) -> str:
    keys = key_decoder_source() if fmt.key == "polar" else int4_decoder_source("key_quarter", "s", "0", 4)
    values = (value_decoder_source(fmt.vb) if fmt.value == "polar"
              else int4_decoder_source("value_octant", "o", str(fmt.vb), 2))
    kernel = KERNEL.replace("{key_radius}", str(fmt.key_radius)).replace("{value_radius}", str(fmt.value_radius))
    if staged:
        chunks = ct * fmt.words // 4
        nch = 1 << (max(chunks, 32) - 1).bit_length()
        copy = f"pool_ptr, pages_ptr, pid_bh, max_pages, {{t}}, end, {{stage}}, PS, WT, CT, W, {nch}"
        kernel = kernel.replace("{declare}", (
            'gl.inline_asm_elementwise(".shared .align 16 .b8 probe_records['
            f'{2 * warps * ct * fmt.words * 4}]; mov.u32 $0, $1;", "=r,r", [pid_bh], dtype=gl.int32, '
            'is_pure=False, pack=1)'))
        kernel = kernel.replace("{prologue}", "copy_tile(" + copy.format(t="start", stage=0) + ")")
        kernel = kernel.replace("{loop_top}", "\n        ".join([
            "stage = ((t0 - start) // BLOCK) % 2",
            "# every lane is done with the other stage's words before they are overwritten",
            'gl.inline_asm_elementwise("bar.warp.sync -1; mov.u32 $0, $1;", "=r,r", [t0], dtype=gl.int32, '
            'is_pure=False, pack=1)',
            "copy_tile(" + copy.format(t="t0 + BLOCK", stage="1 - stage") + ")",
            "# this tile's copies have landed (the next tile's may be in flight); the reads depend on",
            "# the returned 0, so they cannot move above the wait",
            'dep = gl.inline_asm_elementwise("cp.async.wait_group 1; bar.warp.sync -1; mov.u32 $0, 0;", '
            '"=r,r", [t0], dtype=gl.int32, is_pure=False, pack=1)',
            "stage_at = stage * (W * CT * WT) + dep"]))
        records = STAGED_RECORDS
    else:
        kernel = kernel.replace("{declare}", "").replace("{prologue}", "").replace("{loop_top}", "stage_at = 0")
        records = GLOBAL_RECORDS
    return HEADER + records + NIBBLES + "\n" + keys + "\n\n" + values + kernel


def load_kernel(fmt: Format, staged: bool, ct: int, warps: int):
    """The generated probe_kernel (decode_codegen's hash-named source cache: Gluon's JIT needs a file)."""
    return load_generated(kernel_source(fmt, staged, ct, warps), "probe_kernel")


SIGNATURE = {"q_ptr": "*fp32", "pool_ptr": "*i32", "pages_ptr": "*i32", "count_ptr": "*i32", "acc_ptr": "*fp32",
             "m_ptr": "*fp32", "l_ptr": "*fp32", "tab_ptr": "*i32", "M": "i32", "max_pages": "i32", "S": "i32"}


def compile_only(fmt: Format, staged: bool, ct: int, warps: int) -> None:
    """sm_90 compile without a GPU: registers, spills, shared memory and the SASS mix."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton.experimental.gluon import GluonASTSource
    except ImportError:  # Triton 3.6
        from triton.experimental.gluon._runtime import GluonASTSource
    sys.path.insert(0, os.path.dirname(__file__))
    from compile_check import sass_summary

    kernel = load_kernel(fmt, staged, ct, warps)
    consts = {"PS": 64, "WT": fmt.words, "D": D, "CT": ct, "W": warps}
    k = triton.compile(GluonASTSource(kernel, SIGNATURE, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    print(f"probe_kernel {fmt.name}{' staged' if staged else ''} CT={ct} W={warps}: Triton {triton.__version__}, shared {k.metadata.shared} bytes")
    sass_summary(k)


# --- the GPU run ---------------------------------------------------------------------------------

def random_store(fmt, B, Hkv, T, device, gen):
    """(pool int32 [pages, 64, words], pages [B*Hkv, per], count [B*Hkv]): random codes, radii in [0.5, 2]."""
    ps = 64
    per = math.ceil(T / ps)
    n = B * Hkv * per
    pool = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, ps, fmt.words), device=device, dtype=torch.int64,
                         generator=gen).to(torch.int32)
    for word in (fmt.key_radius, fmt.value_radius):
        pool[..., word] = (0.5 + 1.5 * torch.rand(n, ps, device=device, generator=gen)).view(torch.int32)
    pages = torch.randperm(n, device=device, generator=gen).to(torch.int32).view(B * Hkv, per)
    count = torch.full((B * Hkv,), T, device=device, dtype=torch.int32)
    return pool, pages, count


def allow_static_shared(kernel, args, consts) -> None:
    """The staged records sit in a static .shared array that Triton does not know of. Where
    static + Triton's dynamic shared memory pass 48 KiB, the launch needs the opt-in that Triton
    sets only when its own dynamic part passes 48 KiB; set it here (driver API, ctypes)."""
    import ctypes

    compiled = kernel.warmup(*args, grid=(1,), **consts)
    compiled._init_handles()
    cuda = ctypes.CDLL("libcuda.so.1")
    static = ctypes.c_int()
    function = ctypes.c_void_p(compiled.function)
    assert cuda.cuFuncGetAttribute(ctypes.byref(static), 1, function) == 0  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
    if static.value + compiled.metadata.shared > 48 * 1024:
        # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        assert cuda.cuFuncSetAttribute(function, 8, ctypes.c_int(compiled.metadata.shared)) == 0


def launch(kernel, q, pool, pages, count, tab, M, S, ct, warps):
    words = pool.shape[-1]
    bh = count.numel()
    acc = torch.empty(bh, S, M, D, device=q.device, dtype=torch.float32)
    m = torch.empty(bh, S, M, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)

    args = (q, pool, pages, count, acc, m, l, tab, M, pages.shape[1], S)
    consts = dict(PS=64, WT=words, D=D, CT=ct, W=warps, num_warps=warps)
    allow_static_shared(kernel, args, consts)

    def run():
        kernel[(bh, S)](*args, **consts)

    return run, acc, m, l


def combine(acc, m, l):
    mx = m.amax(1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    f = torch.exp2(m - mx)
    return (acc * f[..., None]).sum(1) / (l * f).sum(1)[..., None]


def reference(fmt, q, pool, pages, count):
    """float64 attention over the decoded records; q already scaled for base-2 softmax."""
    bh, M, _ = q.shape
    outs = []
    for i in range(bh):
        n = int(count[i])
        slots = torch.arange(n, device=q.device)
        rec = pool[pages[i, slots // 64].long(), slots % 64]
        k, v = fmt.decode_keys(rec), fmt.decode_values(rec)
        s = q[i].double() @ k.T
        p = torch.exp2(s - s.amax(1, keepdim=True))
        outs.append((p @ v) / p.sum(1, keepdim=True))
    return torch.stack(outs)


def check(fmt, kernel, device, gen, ct, warps) -> float:
    B, Hkv, M = 2, 2, 4
    pool, pages, count = random_store(fmt, B, Hkv, 1000, device, gen)
    count.copy_(torch.tensor([1000, 7, 513, 1], device=device, dtype=torch.int32))
    q = torch.randn(B * Hkv, M, D, device=device, generator=gen) * (0.2 if fmt.key == "polar" else 0.02)
    q[0, 0] *= 50  # a large row
    q[1, 1] = 0    # a zero row
    tab = table_words().to(device)
    run, acc, m, l = launch(kernel, q, pool, pages, count, tab, M, 3, ct, warps)
    run()
    got = combine(acc.double(), m.double(), l.double())
    ref = reference(fmt, q, pool, pages, count)
    return float((got - ref).abs().max() / ref.abs().max())


POINTS = [("llama3-8b", 1, 32768), ("llama3-8b", 8, 32768), ("llama3-8b", 32, 32768), ("llama3-8b", 8, 131072)]


def variant_name(fmt: Format, staged: bool, ct: int, warps: int) -> str:
    return f"{fmt.name}{'_staged' if staged else ''}_{ct}x{warps}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--configs", default="32x4", help="tokens per warp x warps, comma-separated")
    parser.add_argument("--formats", default="polar-polar,polar-int4,int4-int4",
                        help="key-value codecs of the synthetic record, comma-separated")
    parser.add_argument("--staged", default="0,1", help="records read from global (0) or staged by cp.async (1)")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    formats = [Format(*f.split("-")) for f in args.formats.split(",")]
    variants = [(fmt, bool(int(st)), ct, warps) for fmt in formats for st in args.staged.split(",")
                for ct, warps in configs]
    if args.compile_only:
        for variant in variants:
            compile_only(*variant)
        return 0

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_decode import SHAPES, decode_point, graph_of, median_ms
    from sphkv_compile.kernels import attend as kattend
    from sphkv_compile.options import SphkvOptions

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    kernels = {variant_name(*v): load_kernel(*v) for v in variants}
    result = {"device": torch.cuda.get_device_name(device), "checks": {}, "rows": [],
              "record_bytes": {fmt.name: 4 * fmt.words for fmt in formats}}
    for fmt, staged, ct, warps in variants:
        name = variant_name(fmt, staged, ct, warps)
        err = check(fmt, kernels[name], device, gen, ct, warps)
        result["checks"][name] = err
        print(f"check {name}: max error / max |out| = {err:.2e}", flush=True)
    opts = SphkvOptions()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tab = table_words().to(device)
    for name, B, T in POINTS:
        Hq, Hkv, d = SHAPES[name]
        G = Hq // Hkv
        q, kn, specs, states, row = decode_point(name, B, T, opts, device, gen)

        def today():
            return kattend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kn, v_new=kn)[0]

        row["today_ms"] = median_ms(graph_of(today).replay)
        del states
        torch.cuda.empty_cache()
        qp = torch.randn(B * Hkv, G, D, device=device, generator=gen) * 0.2
        for fmt in formats:
            pool, pages, count = random_store(fmt, B, Hkv, T, device, gen)
            for _, staged, ct, warps in [v for v in variants if v[0] is fmt]:
                key = variant_name(fmt, staged, ct, warps)
                best = None
                for waves in (1, 2, 4):
                    S = max(1, min(T // (ct * warps), round(waves * sms * 2 / (B * Hkv))))
                    run, *_ = launch(kernels[key], qp, pool, pages, count, tab, G, S, ct, warps)
                    ms = median_ms(run)
                    if best is None or ms < best[0]:
                        best = (ms, S)
                row[f"{key}_ms"], row[f"{key}_S"] = best
                row[f"{key}_records_gb_per_s"] = B * Hkv * T * fmt.words * 4 / (best[0] * 1e-3) / 1e9
                row[f"{key}_x_cudnn"] = row["cudnn_ms"] / best[0]
            del pool, pages
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    with open(os.path.join(args.out, "probe_gluon_fragments.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
