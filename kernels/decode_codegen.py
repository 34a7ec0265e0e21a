"""Generated Triton decoders: one token per thread, every code read by a fixed shift.

A record's layout is known on the host (the codec's RecordLayout), so each code of each node
of the polar tree sits at a known word and bit. This module writes a Triton function per
codec that works on [BLOCK_T] vectors, one token per thread: it loads the record's words,
pulls every code out with a constant shift and mask, runs the angular recurrence top-down as
scalar multiplies (no cross-thread data movement), and only at the end joins the D values
into a [BLOCK_T, D] tile (tl.join keeps the new axis inside the thread) for tl.dot.

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
    """Lines of one generated body. Names get `prefix` (keys and values share a kernel);
    record word j is the variable w<word_offset + j>, loaded on first use unless the caller
    loads the words itself (preloaded=True: the kernel prefetches them a tile ahead)."""

    def __init__(self, word_offset: int, prefix: str = "", indent: int = 4, preloaded: bool = False):
        self.lines: list[str] = []
        self.words: set[int] = set()
        self.word_offset = word_offset
        self.prefix = prefix
        self.pad = " " * indent
        self.preloaded = preloaded
        self.leaf_dtype = None

    def word(self, j: int) -> str:
        name = f"w{self.word_offset + j}"
        if j not in self.words:
            self.words.add(j)
            if not self.preloaded:
                self.lines.append(f"{self.pad}{name} = {load_word(self.word_offset + j, 'base', 'valid')}")
        return name

    def name(self, base: str) -> str:
        return self.prefix + base

    def emit(self, line: str) -> None:
        self.lines.append(self.pad + line)


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


def _extract(w: _Writer, parts, name: str) -> str:
    name = w.name(name)
    terms = []
    for word, bit, width, shift in parts:
        src = w.word(word)
        val = f"({src} >> {bit})" if bit else src
        if bit + width < 32:
            val = f"({val} & {(1 << width) - 1})"
        if shift:
            val = f"({val} << {shift})"
        terms.append(val)
    w.emit(f"{name} = {' | '.join(terms)}")  # stays uint32
    return name


def _radius(w: _Writer, parts, inv_norm: float = 1.0) -> str:
    """16-bit log-radius code -> float32 (0 -> 0, all ones -> NaN), times inv_norm."""
    code = _extract(w, parts, "rc")
    r = w.name("r")
    scale = "" if inv_norm == 1.0 else f" * {inv_norm!r}"
    w.emit(f"{r} = tl.exp2(LOG2_MIN + ({code}.to(tl.int32) - 1).to(tl.float32) * STEP){scale}")
    w.emit(f"{r} = tl.where({code} == 0, 0.0, {r})")
    w.emit(f"{r} = tl.where({code} == 65535, float('nan'), {r})")
    return r


def _join_tile(w: _Writer, leaves: list[str], target: str | None) -> None:
    """[BLOCK_T] leaves in order -> [BLOCK_T, D] (returned, or assigned to target).
    join(even half, odd half) puts the leaf's lowest index bit on the last (in-thread) axis,
    so the row-major reshape restores the order. With w.leaf_dtype the leaves are cast as
    they are made (bf16 pairs share a register, which halves the tile's registers)."""
    counter = [0]
    if w.leaf_dtype:
        cast = []
        for x in leaves:
            w.emit(f"{x}h = {x}.to({w.leaf_dtype})")
            cast.append(f"{x}h")
        leaves = cast

    def build(items: list[str]) -> str:
        if len(items) == 1:
            return items[0]
        a, b = build(items[0::2]), build(items[1::2])
        counter[0] += 1
        name = w.name(f"j{counter[0]}")
        w.emit(f"{name} = tl.join({a}, {b})")
        return name

    tile = f"tl.reshape({build(leaves)}, (BLOCK_T, {len(leaves)}))"
    w.emit(f"return {tile}" if target is None else f"{target} = {tile}")


def _polar_body(w: _Writer, t: PolarTables, tab: str, target: str | None) -> None:
    trig = t.trig.double()
    parts = code_parts(t.fields.layout)
    nodes = [_radius(w, parts[(0, 0)])]
    size = t.table_size
    for f in range(t.levels, 0, -1):
        lev = f - 1
        bits = (t.bits >> (4 * lev)) & 15
        children = []
        for j, parent in enumerate(nodes):
            cos_name, sin_name = w.name(f"c{f}_{j}"), w.name(f"s{f}_{j}")
            if bits == 0:
                cos_v, sin_v = repr(float(trig[lev, 0, 0])), repr(float(trig[lev, 1, 0]))
            else:
                code = _extract(w, parts[(f, j)], f"k{f}_{j}")
                if bits <= SELECT_MAX_BITS:
                    w.emit(f"{cos_name} = tl.where({code} == 0, {float(trig[lev, 0, 0])!r}, {float(trig[lev, 0, 1])!r})")
                    w.emit(f"{sin_name} = tl.where({code} == 0, {float(trig[lev, 1, 0])!r}, {float(trig[lev, 1, 1])!r})")
                else:  # one 8-byte load of the (cos, sin) pair, read as an int64 and split in the thread
                    cs = w.name("cs")
                    w.emit(f"{cs} = tl.load({tab} + ({lev * size} + {code}))")
                    w.emit(f"{cos_name} = {cs}.to(tl.uint32).to(tl.float32, bitcast=True)")
                    w.emit(f"{sin_name} = ({cs} >> 32).to(tl.uint32).to(tl.float32, bitcast=True)")
                cos_v, sin_v = cos_name, sin_name
            a, b = w.name(f"n{f}_{2 * j}"), w.name(f"n{f}_{2 * j + 1}")
            w.emit(f"{a} = {parent} * {cos_v}")
            w.emit(f"{b} = {parent} * {sin_v}")
            children += [a, b]
        nodes = children
    _join_tile(w, nodes, target)


def _scalar_body(w: _Writer, t: ScalarTables, tab: str, target: str | None) -> None:
    parts = code_parts(t.fields.layout)
    r = _radius(w, parts[(0, 0)], inv_norm=t.dim ** -0.5)
    leaves = []
    for i in range(t.dim):
        code = _extract(w, parts[(1, i)], f"k{i}")
        x = w.name(f"x{i}")
        w.emit(f"{x} = tl.load({tab} + {code}) * {r}")
        leaves.append(x)
    _join_tile(w, leaves, target)


def _body(w: _Writer, tables, tab: str, target: str | None) -> None:
    if isinstance(tables, ScalarTables):
        _scalar_body(w, tables, tab, target)
    else:
        _polar_body(w, tables, tab, target)


_DECODER = '''"""Generated by sphkv_compile.kernels.decode_codegen; do not edit."""
import triton
import triton.language as tl


@triton.jit
def decode(pool_ptr, base, valid, tab_ptr, BLOCK_T: tl.constexpr, STEP: tl.constexpr, LOG2_MIN: tl.constexpr):
'''


def _split_words(first: int, count: int, pad: int) -> list[str]:
    """Lines that load words [first, first + count) of each record as one [BLOCK_T, pad] tile
    (coalesced, vectorized) and split it into per-word [BLOCK_T] vectors w<first + j>."""
    cols = f"tl.arange(0, {pad})"
    lines = [f"    wt = tl.load(pool_ptr + base[:, None] + {first} + {cols}[None, :], "
             f"mask=valid[:, None] & ({cols} < {count})[None, :], other=0).to(tl.uint32, bitcast=True)"]
    names = ["wt"]
    width = pad
    level = 0
    while width > 1:  # [T, width] -> [T, width/2, 2] -> two [T, width/2]: even and odd words
        level += 1
        nxt = []
        for n in names:
            a, b = f"{n}e", f"{n}o"
            lines.append(f"    {a}, {b} = tl.split(tl.reshape({n}, (BLOCK_T, {width // 2}, 2)))")
            nxt += [a, b]
        names = nxt
        width //= 2
    # names are in bit-reversed word order: name index i holds word bitrev(i)
    bits = level
    for i, n in enumerate(names):
        j = int(format(i, f"0{bits}b")[::-1], 2) if bits else 0
        if j < count:  # the last split leaves [BLOCK_T, 1]
            lines.append(f"    w{first + j} = tl.reshape({n}, (BLOCK_T,))")
    return lines


def _decoder_source(tables, word_offset: int, word_tile: bool = False, leaf_dtype: str | None = None) -> str:
    w = _Writer(word_offset, preloaded=word_tile)
    w.leaf_dtype = leaf_dtype
    _body(w, tables, "tab_ptr", None)
    head = []
    if word_tile:
        count = max(w.words) + 1
        head = _split_words(word_offset, count, 1 << (count - 1).bit_length())
    return _DECODER + "\n".join(head + w.lines) + "\n"


_KERNEL = '''"""Generated by sphkv_compile.kernels.decode_codegen; do not edit."""
import triton
import triton.language as tl


@triton.jit
def kernel(q_ptr, pool_ptr, pages_ptr, count_ptr, acc_ptr, m_ptr, l_ptr, ktab_ptr, vtab_ptr,
           M, max_pages, S, split_offset, S_total,
           PS: tl.constexpr, WT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
           STEP: tl.constexpr, LOG2_MIN: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_TILES: tl.constexpr):
    """attention_kernels.paged_coded_kernel with the decoders written in and every record word
    of the next tile loaded while this tile is decoded."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    count = tl.load(count_ptr + pid_bh)
    tiles = tl.cdiv(count, BLOCK_T)
    per = tl.cdiv(tiles, S) * BLOCK_T
    start = pid_s * per
    end = tl.minimum(count, start + per)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (pid_bh * M + rows)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    if BF16_TILES:
        q = q.to(tl.bfloat16)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    slots = start + tl.arange(0, BLOCK_T)
    valid = slots < end
    page = tl.load(pages_ptr + pid_bh * max_pages + slots // PS, mask=valid, other=0)
    base = (page.to(tl.int64) * PS + slots % PS) * WT
{first}
    for t0 in range(start, end, BLOCK_T):
        nslots = t0 + BLOCK_T + tl.arange(0, BLOCK_T)
        nvalid = nslots < end
        npage = tl.load(pages_ptr + pid_bh * max_pages + nslots // PS, mask=nvalid, other=0)
        nbase = (npage.to(tl.int64) * PS + nslots % PS) * WT
{prefetch}
{key}
        if BF16_TILES:
            s = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
{value}
        if BF16_TILES:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
        valid = nvalid
{advance}
    out = (pid_bh * S_total + split_offset + pid_s) * M + rows
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + out, m_i, mask=rmask)
    tl.store(l_ptr + out, l_i, mask=rmask)
'''


def _kernel_source(key_tables, value_tables, key_words: int) -> str:
    kw = _Writer(0, "k_", indent=8, preloaded=True)
    _body(kw, key_tables, "ktab_ptr", "k")
    vw = _Writer(key_words, "v_", indent=8, preloaded=True)
    _body(vw, value_tables, "vtab_ptr", "v")
    words = sorted({j for j in kw.words} | {key_words + j for j in vw.words})
    first = "\n".join(f"    w{j} = {load_word(j, 'base', 'valid')}" for j in words)
    prefetch = "\n".join(f"        nw{j} = {load_word(j, 'nbase', 'nvalid')}" for j in words)
    advance = "\n".join(f"        w{j} = nw{j}" for j in words)
    return _KERNEL.format(first=first, prefetch=prefetch, key="\n".join(kw.lines), value="\n".join(vw.lines),
                          advance=advance)


@lru_cache(maxsize=None)
def prefetch_kernel(key_tables, value_tables, key_words: int):
    """The generated paged decode kernel of one tier (same arguments and results as
    attention_kernels.paged_coded_kernel, without DECODE_K/DECODE_V)."""
    return load_generated(_kernel_source(key_tables, value_tables, key_words), "kernel")


def load_generated(source: str, attr: str = "decode"):
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = _cache_dir() / f"sphkv_decode_{digest}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"sphkv_decode_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


@lru_cache(maxsize=None)
def decoder(tables, word_offset: int = 0, word_tile: bool = False, leaf_dtype: str | None = None):
    """The generated Triton decode function of one codec's records (keys at word 0, values at
    the key record's length): decode(pool_ptr, base, valid, tab_ptr, BLOCK_T, STEP, LOG2_MIN) ->
    float32 [BLOCK_T, D] in the rotated domain. `base` is each token's first record word."""
    return load_generated(_decoder_source(tables, word_offset, word_tile, leaf_dtype))
