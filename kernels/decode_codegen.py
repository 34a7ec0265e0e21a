"""Generated Triton decoders: one token per thread, every code read by a fixed shift.

A record's layout is known on the host (the codec's RecordLayout), so each code of each node
of the polar tree sits at a known word and bit. This module writes a Triton function per
codec that works on [BLOCK_T] vectors, one token per thread: it loads the record's words,
pulls every code out with a constant shift and mask, runs the angular recurrence top-down as
scalar multiplies (no cross-thread data movement), and only at the end joins the D values
into a [BLOCK_T, D] tile (tl.join keeps the new axis inside the thread) for tl.dot.

The tiles are unit-radius: the tree starts from 1 at the root, and the decoder of the slice
that holds coordinate 0 also returns each token's radius [BLOCK_T], which the attention kernel
applies to the logits (keys) and to the probabilities (values). So a 16-bit tile never holds a
huge norm, and the packed decoders can run the whole tree in float16 pairs: with (cos, sin)
staged as one float16 pair per 4-byte entry, a node's two children are one f16x2 multiply of
the parent (in both halves) by the pair, and the leaves come out as float16 (x_2i, x_2i+1).

Written out rather than looped because a Triton function cannot hold a list of per-node
tensors; the generated source is cached on disk (Triton's JIT needs a real file) under a
name that hashes the source, so a different codec or an edit here never reuses a stale file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .host_math import next_power_of_2
from .layout import PolarTables, ScalarTables

# Levels with at most this many bits pick cos/sin with selects among constants instead of a
# table load (a load costs an address computation and an L1 round trip).
SELECT_MAX_BITS = 1


def _cache_dir() -> Path:
    root = os.environ.get("SPHKV_CODEGEN_DIR") or os.path.join(tempfile.gettempdir(), f"sphkv_codegen_{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Writer:
    """Lines of one generated body; record word j is the variable w<word_offset + j>, loaded on
    first use together with its aligned group of 4 (or 2) words inside the record's `words`
    (groups only as wide as the record stride keeps aligned: a 14-word record allows pairs)
    (one 16-byte load instead of four 4-byte ones: each load of a tile touches one L1 line per
    token, and the per-word loads kept the L1 tag stage 74% busy on the H200).
    leaf_dtype: the leaves are cast as they are made (see _join_tile)."""

    def __init__(self, word_offset: int, words: int, stride: int, leaf_dtype: str | None = None):
        self.lines: list[str] = []
        self.loaded: set[int] = set()
        self.word_offset = word_offset
        self.limit = word_offset + words
        # a group of n words is n-word aligned in every record only if the record stride is a multiple of n
        self.widest = 4 if stride % 4 == 0 else 2 if stride % 2 == 0 else 1
        self.leaf_dtype = leaf_dtype

    def word(self, j: int) -> str:
        a = self.word_offset + j
        if a not in self.loaded:
            self._load_group(a)
        return f"w{a}"

    def _load_group(self, a: int) -> None:
        for n in (4, 2, 1):
            start = a // n * n
            if n <= self.widest and start >= self.word_offset and start + n <= self.limit:
                break
        if n == 1:
            self.emit(f"w{a} = {load_word(a, 'base', 'valid')}")
            self.loaded.add(a)
            return
        g = f"g{start}"
        self.emit(f"{g} = tl.load(pool_ptr + base[:, None] + ({start} + tl.arange(0, {n}))[None, :], "
                  f"mask=valid[:, None], other=0).to(tl.uint32, bitcast=True)")
        if n == 2:
            self.emit(f"w{start}, w{start + 1} = tl.split({g})")
        else:  # [T, 2, 2]: [t, i, k] is word start + 2i + k; split k, then i
            self.emit(f"{g}e, {g}o = tl.split(tl.reshape({g}, (BLOCK_T, 2, 2)))")
            self.emit(f"w{start}, w{start + 2} = tl.split({g}e)")
            self.emit(f"w{start + 1}, w{start + 3} = tl.split({g}o)")
        self.loaded.update(range(start, start + n))

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)


def load_word(j: int, base: str, valid: str) -> str:
    return f"tl.load(pool_ptr + {base} + {j}, mask={valid}, other=0).to(tl.uint32, bitcast=True)"


def code_parts(layout) -> dict[tuple[int, int], list[tuple[int, int, int, int]]]:
    """(field, element) -> [(word, bit, width, value shift)] from the split-width components."""
    parts: dict[tuple[int, int], list] = {}
    for c in layout.components:
        for i in range(c.count):
            bit = c.offset + i * c.width
            parts.setdefault((c.field, i), []).append((bit // 32, bit % 32, c.width, c.shift))
    return parts


def _extract(w: _Writer, parts, name: str, scale_bits: int = 0) -> str:
    """The code as uint32, times 2**scale_bits (a byte offset into a table of 2**scale_bits-byte
    entries): a field at bit >= scale_bits is shifted and masked in place, one shift and one
    mask as for the bare code."""
    terms = []
    for word, bit, width, shift in parts:
        src = w.word(word)
        if scale_bits:
            up = shift + scale_bits - bit  # net left shift of the field's bits
            val = src if up == 0 else f"({src} << {up})" if up > 0 else f"({src} >> {-up})"
            # always masked: the scaled field keeps scale_bits of the word's bits below it
            val = f"({val} & {((1 << width) - 1) << (shift + scale_bits)})"
        else:
            val = f"({src} >> {bit})" if bit else src
            if bit + width < 32:
                val = f"({val} & {(1 << width) - 1})"
            if shift:
                val = f"({val} << {shift})"
        terms.append(val)
    w.emit(f"{name} = {' | '.join(terms)}")  # stays uint32
    return name


# Staged tables: the kernel copies the decoders' tables into one static shared-memory array
# (SHARED_TABLES) once per program, and each lookup is one LDS [offset + constant] instead of a
# 64-bit address computation and an LDG through L1 (sm_90 SASS: two fewer instructions per node).
# Triton has no shared-memory gather, so the array is declared and read through inline PTX.
SHARED_TABLES = "sphkv_tables"


def _shared_lookup(w: _Writer, offset: str, const_bytes: int, outputs: int, name: str) -> None:
    """name0[, name1] = float32 word(s) at SHARED_TABLES + offset + const_bytes. Marked pure (free
    to schedule, as a load): the offset comes from a record word loaded in the tile loop, after
    the stager's barrier, so no lookup can move above the fill."""
    regs = ", ".join(f"${i}" for i in range(outputs))
    vec = ".v2" if outputs == 2 else ""
    asm = (f"{{ .reg .u32 a; mov.u32 a, {SHARED_TABLES}; add.u32 a, a, ${outputs}; "
           f"ld.shared{vec}.f32 {{{regs}}}, [a+{const_bytes}]; }}")
    dtype = "(tl.float32, tl.float32)" if outputs == 2 else "tl.float32"
    targets = ", ".join(f"{name}{i}" for i in range(outputs)) if outputs == 2 else name
    w.emit(f'{targets} = tl.inline_asm_elementwise("{asm}", "{",".join(["=r"] * outputs)},r", [{offset}], '
           f"dtype={dtype}, is_pure=True, pack=1)")


def _shared_word(w: _Writer, offset: str, const_bytes: int, name: str) -> None:
    """name = the 32-bit word at SHARED_TABLES + offset + const_bytes, as int32 (a float16 pair)."""
    asm = f"{{ .reg .u32 a; mov.u32 a, {SHARED_TABLES}; add.u32 a, a, $1; ld.shared.b32 $0, [a+{const_bytes}]; }}"
    w.emit(f'{name} = tl.inline_asm_elementwise("{asm}", "=r,r", [{offset}], dtype=tl.int32, is_pure=True, pack=1)')


def _half_pair_constant(cos: float, sin: float) -> int:
    """(cos, sin) as one float16 pair in an int32, cos in the low half (as PolarTables.half_pairs)."""
    return int(torch.tensor([cos, sin], dtype=torch.float16).view(torch.int32).item())


# children = parent (in both halves) times the (cos, sin) pair: one HMUL2 on sm_90
_F16X2_CHILDREN = ("{ .reg .b32 p, d; mov.b32 p, {$2, $2}; mul.rn.f16x2 d, p, $3; mov.b32 {$0, $1}, d; }")
_F16X2_SPLIT = "mov.b32 {$0, $1}, $2;"


def _radius(w: _Writer, parts) -> str:
    """16-bit log-radius code -> float32 (0 -> 0, all ones -> NaN)."""
    code = _extract(w, parts, "rc")
    r = "r"
    w.emit(f"{r} = tl.exp2(LOG2_MIN + ({code}.to(tl.int32) - 1).to(tl.float32) * STEP)")
    w.emit(f"{r} = tl.where({code} == 0, 0.0, {r})")
    w.emit(f"{r} = tl.where({code} == 65535, float('nan'), {r})")
    return r


def join_tree(leaves: list[str], emit, join: str = "tl.join", prefix: str = "j") -> str:
    """Emit the joins that stack `leaves` (variable names, in leaf order) into one tensor whose
    new trailing axes are the leaf index's bits, highest first: join(even half, odd half) puts
    the lowest bit last. Returns the result's name. `join` is Triton's or Gluon's."""
    counter = [0]

    def build(items: list[str]) -> str:
        if len(items) == 1:
            return items[0]
        a, b = build(items[0::2]), build(items[1::2])
        counter[0] += 1
        name = f"{prefix}{counter[0]}"
        emit(f"{name} = {join}({a}, {b})")
        return name

    return build(leaves)


def _join_tile(w: _Writer, leaves: list[str], radius: str | None = None) -> None:
    """Return the [BLOCK_T] leaves, in order, as one [BLOCK_T, D] tile (and the radius after it,
    if given).
    join(even half, odd half) puts the leaf's lowest index bit on the last (in-thread) axis,
    so the row-major reshape restores the order. With w.leaf_dtype the leaves are cast as
    they are made (bf16 pairs share a register, which halves the tile's registers)."""
    if w.leaf_dtype:
        cast = []
        for x in leaves:
            w.emit(f"{x}h = {x}.to({w.leaf_dtype})")
            cast.append(f"{x}h")
        leaves = cast

    tile = f"tl.reshape({join_tree(leaves, w.emit)}, (BLOCK_T, {len(leaves)}))"
    w.emit(f"return {tile}" + (f", {radius}" if radius else ""))


def _polar_body(w: _Writer, t: PolarTables, tab: str, part: int | None = None, parts: int = 2,
                smem: int | None = None, packed: bool = False) -> None:
    """part: None for the whole tile, else the part-th of `parts` (a power of two) equal slices
    of the coordinates, the subtree below the root's top log2(parts) levels: 0 or 1 of 2 is the
    root's left or right subtree (the first or second D/2 coordinates). smem: the byte offset of
    the staged (cos, sin) pairs in SHARED_TABLES, or None to load them from tab. packed: the
    staged pairs are float16 (PolarTables.half_pairs) and the tree runs in f16x2 (GPU only)."""
    depth = parts.bit_length() - 1  # levels walked along one path only
    trig = t.trig.double()
    codes = code_parts(t.fields.layout)
    radius = _radius(w, codes[(0, 0)]) if part in (None, 0) else None
    nodes = [(0, None)]  # (index of the node in its level, variable); None: the unit root
    size = t.table_size
    entry = 4 if packed else 8
    for f in range(t.levels, 0, -1):
        lev = f - 1
        bits = (t.bits >> (4 * lev)) & 15
        children = []
        for j, parent in nodes:
            names = [f"n{f}_{2 * j}", f"n{f}_{2 * j + 1}"]
            consts = [(float(trig[lev, 0, c]), float(trig[lev, 1, c])) for c in range(2)]
            if bits == 0 or bits <= SELECT_MAX_BITS or smem is None:
                code = None if bits == 0 else _extract(w, codes[(f, j)], f"k{f}_{j}")
            if packed:
                cs = f"cs{f}_{j}"
                if bits == 0:
                    w.emit(f"{cs} = tl.full((BLOCK_T,), {_half_pair_constant(*consts[0])}, tl.int32)")
                elif bits <= SELECT_MAX_BITS:
                    w.emit(f"{cs} = tl.where({code} == 0, {_half_pair_constant(*consts[0])}, "
                           f"{_half_pair_constant(*consts[1])}).to(tl.int32)")
                else:
                    offset = _extract(w, codes[(f, j)], f"o{f}_{j}", scale_bits=2)
                    _shared_word(w, offset, smem + entry * lev * size, cs)
                if parent is None:
                    w.emit(f'{names[0]}, {names[1]} = tl.inline_asm_elementwise("{_F16X2_SPLIT}", "=h,=h,r", [{cs}], '
                           f"dtype=(tl.float16, tl.float16), is_pure=True, pack=1)")
                else:
                    w.emit(f'{names[0]}, {names[1]} = tl.inline_asm_elementwise("{_F16X2_CHILDREN}", "=h,=h,h,r", '
                           f"[{parent}, {cs}], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)")
            else:
                if bits == 0:
                    factors = [repr(consts[0][0]), repr(consts[0][1])]
                    if parent is None:  # a constant root angle: its children are constant tiles
                        factors = [f"tl.full((BLOCK_T,), {x}, tl.float32)" for x in factors]
                elif bits <= SELECT_MAX_BITS:
                    factors = [f"c{f}_{j}", f"s{f}_{j}"]
                    for i, name in enumerate(factors):
                        w.emit(f"{name} = tl.where({code} == 0, {consts[0][i]!r}, {consts[1][i]!r})")
                elif smem is not None:  # one 8-byte shared-memory load of the staged (cos, sin) pair
                    offset = _extract(w, codes[(f, j)], f"o{f}_{j}", scale_bits=3)
                    _shared_lookup(w, offset, smem + entry * lev * size, 2, f"cs{f}_{j}_")
                    factors = [f"cs{f}_{j}_0", f"cs{f}_{j}_1"]
                else:  # one 8-byte load of the (cos, sin) pair, read as an int64 and split in the thread
                    w.emit(f"cs = tl.load({tab} + ({lev * size} + {code}))")
                    w.emit(f"c{f}_{j} = cs.to(tl.uint32).to(tl.float32, bitcast=True)")
                    w.emit(f"s{f}_{j} = (cs >> 32).to(tl.uint32).to(tl.float32, bitcast=True)")
                    factors = [f"c{f}_{j}", f"s{f}_{j}"]
                for name, factor in zip(names, factors):
                    w.emit(f"{name} = {factor}" if parent is None else f"{name} = {parent} * {factor}")
            pair = [(2 * j, names[0]), (2 * j + 1, names[1])]
            if part is not None and t.levels - f < depth:  # on the path to the part: one child
                pair = [pair[(part >> (depth - 1 - (t.levels - f))) & 1]]
            children += pair
        nodes = children
    _join_tile(w, [name for _, name in nodes], radius)


def _scalar_body(w: _Writer, t: ScalarTables, tab: str, part: int | None = None, parts: int = 2,
                 smem: int | None = None) -> None:
    codes = code_parts(t.fields.layout)
    radius = _radius(w, codes[(0, 0)]) if part in (None, 0) else None
    leaves = []  # the table is ScalarTables.unit_centroids: a unit vector's coordinates
    span = range(t.dim) if part is None else range(part * t.dim // parts, (part + 1) * t.dim // parts)
    for i in span:
        x = f"x{i}"
        if smem is None:
            code = _extract(w, codes[(1, i)], f"k{i}")
            w.emit(f"{x} = tl.load({tab} + {code})")
        else:
            offset = _extract(w, codes[(1, i)], f"o{i}", scale_bits=2)
            _shared_lookup(w, offset, smem, 1, x)
        leaves.append(x)
    _join_tile(w, leaves, radius)


def _body(w: _Writer, tables, tab: str, part: int | None = None, parts: int = 2, smem: int | None = None,
          packed: bool = False) -> None:
    if isinstance(tables, ScalarTables):
        _scalar_body(w, tables, tab, part, parts, smem)
    else:
        _polar_body(w, tables, tab, part, parts, smem, packed)


def table_bytes(tables, packed: bool = False) -> int:
    """Bytes of one codec's lookup table as the kernels hold it (per level and code, an int64
    float32 (cos, sin) pair, or with packed an int32 float16 pair; or float32 scalar centroids)."""
    if isinstance(tables, ScalarTables):
        return 4 * tables.unit_centroids.numel()
    return (4 if packed else 8) * tables.levels * tables.table_size


def table_tensor(tables, packed: bool = False) -> torch.Tensor:
    """The host tensor a kernel reads (or stages) as this codec's table."""
    if isinstance(tables, ScalarTables):
        return tables.unit_centroids
    return tables.half_pairs if packed else tables.trig_pairs


_STAGER = '''"""Generated by sphkv_compile.kernels.decode_codegen; do not edit."""
import triton
import triton.language as tl


@triton.jit
def stage(ktab_ptr, vtab_ptr):
    # declared once per kernel: this function is called once, outside the tile loop
    tl.inline_asm_elementwise(".shared .align 16 .b8 {name}[{size}];\\n mov.u32 $0, $1;", "=r,r",
                              [tl.program_id(0)], dtype=tl.int32, is_pure=False, pack=1)
{fills}    tl.debug_barrier()
'''

_FILL = '''    i = tl.arange(0, {block})
    word = tl.load({ptr}.to(tl.pointer_type(tl.uint32), bitcast=True) + i, mask=i < {words}, other=0)
    tl.inline_asm_elementwise("{{ .reg .u32 a; .reg .pred p; setp.lt.u32 p, $2, {words}; mov.u32 a, {name}; "
                              "mad.lo.u32 a, $2, 4, a; @p st.shared.u32 [a+{offset}], $1; mov.u32 $0, 0; }}",
                              "=r,r,r", [word, i], dtype=tl.int32, is_pure=False, pack=1)
'''


@lru_cache(maxsize=None)
def stager(key_tables, value_tables, packed: bool = False):
    """A Triton function stage(ktab_ptr, vtab_ptr) that declares SHARED_TABLES, copies the key
    table to its byte 0 and the value table after it (see staged_offsets), and waits for the
    whole program at a barrier. Call it once at the top of the kernel."""
    kb, vb = table_bytes(key_tables, packed), table_bytes(value_tables, packed)
    voff = staged_offsets(key_tables, packed)[1]
    fills = "".join(_FILL.format(block=next_power_of_2(n // 4), ptr=ptr, words=n // 4, name=SHARED_TABLES,
                                 offset=off)
                    for ptr, n, off in (("ktab_ptr", kb, 0), ("vtab_ptr", vb, voff)))
    return load_generated(_STAGER.format(name=SHARED_TABLES, size=voff + vb, fills=fills), "stage")


def staged_offsets(key_tables, packed: bool = False) -> tuple[int, int]:
    """Byte offsets of the key and the value table in SHARED_TABLES (the value table 16-aligned)."""
    return 0, (table_bytes(key_tables, packed) + 15) // 16 * 16


_DECODER = '''"""Generated by sphkv_compile.kernels.decode_codegen; do not edit."""
import triton
import triton.language as tl


@triton.jit
def decode(pool_ptr, base, valid, tab_ptr, BLOCK_T: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr):
'''


def _decoder_source(tables, word_offset: int, stride: int, leaf_dtype: str | None = None,
                    part: int | None = None, parts: int = 2, smem: int | None = None, packed: bool = False) -> str:
    # packed leaves are float16 as made
    w = _Writer(word_offset, tables.fields.layout.words, stride, None if packed else leaf_dtype)
    _body(w, tables, "tab_ptr", part, parts, smem, packed)
    return _DECODER + "\n".join(w.lines) + "\n"


def load_generated(source: str, name: str | None = "decode"):
    """The function `name` of the module with this source (the module itself for None)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = _cache_dir() / f"sphkv_decode_{digest}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"sphkv_decode_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module if name is None else getattr(module, name)


@lru_cache(maxsize=None)
def decoder(tables, word_offset: int, stride: int, leaf_dtype: str | None = None, part: int | None = None,
            parts: int = 2, smem: int | None = None, packed: bool = False):
    """The generated Triton decode function of one codec's records (keys at word 0, values at
    the key record's length): decode(pool_ptr, base, valid, tab_ptr, BLOCK_T, STEP, LOG2_MIN) ->
    the unit-radius tile [BLOCK_T, D] in the rotated domain (float32, or leaf_dtype), followed
    by the radius [BLOCK_T] float32 when the tile holds coordinate 0 (part None or 0). `base`
    is each token's first record word. part=0 or 1: only the first or the second D/2
    coordinates ([BLOCK_T, D/2]); with parts=4, part 0..3: the four D/4 slices. smem: read the
    table staged by stager() at this byte offset of SHARED_TABLES instead of from tab_ptr (GPU
    only: inline PTX). packed (with smem, polar codecs): float16 pairs staged, the tree in f16x2,
    a float16 tile."""
    if part is not None and not (parts & (parts - 1) == 0 and 0 <= part < parts <= tables.dim // 2):
        raise ValueError(f"part {part} of {parts}: parts must be a power of two, at most D/2 = {tables.dim // 2}")
    if packed and smem is None:
        raise ValueError("packed decoders read float16 pairs staged in shared memory: pass smem")
    return load_generated(_decoder_source(tables, word_offset, stride, leaf_dtype, part, parts, smem, packed))
