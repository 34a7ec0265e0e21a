"""Generated Gluon decoders: each lane decodes one subtree of a token, straight into its share of
an mma_v2 operand fragment (kernels/fragment_kernels.py).

In mma_v2's operand layouts a token's D coordinates are spread over several lanes, each holding
a fixed set of them: for the keys (the B operand of q @ k^T) the lane with lane % 4 = s holds
the k indices whose bits 1-2 equal s; for the values (the B operand of p @ v) the lane with
lane // 4 = o holds the n indices whose low three bits equal o. The rotated domain lets the
kernel number the coordinates as it likes (q is permuted the same way, the output back), so
those sets can be subtrees of the polar tree: key lane s decodes quarter subtree s (D/4 leaves),
value lane o octant subtree o (D/8 leaves), each from its subtree's root value, which comes from
the few nodes on the path above it (decoded by every lane of the token).

A lane's codes then sit at places that depend on its subtree. With the record layout's
subtree-aligned run order (sphkv_compile.packing: runs largest first, each at a multiple of its
size) the codes of subtree s of a run are one aligned chunk: for a chunk of 32 bits or more,
whole words at a word index linear in s with the same bits inside; for a smaller chunk, one word
shifted right by a lane-dependent amount, after which every code sits at a constant bit. So a
lane's loads and shifts depend on its subtree, every extraction after them is constant. (A layout
whose chunks may straddle two words, such as whole 3-bit codes, gets one funnel shift per chunk
instead; today's packing never makes one: benchmarks/probe_whole_codes_compile.py counts what it
would save.)

The generated source is cached on disk like decode_codegen's (Gluon's JIT needs a real file).
"""
from __future__ import annotations

import math
from functools import lru_cache

from .decode_codegen import load_generated
from .layout import PolarTables, Unsupported

# The key and value tables sit in one static shared-memory array of this many bytes (the kernel
# stages them once per program).
FRAGMENT_TABLES = "sphkv_fragment_tables"
FRAGMENT_TABLE_BYTES = 8192
# The records are staged in a second static array: two tiles (the one decoded, the one in flight)
# of warps x tokens_per_warp records. ptxas allows 48 KiB of static shared memory per kernel, so
# a tier whose staging needs more than what the tables leave runs the Triton kernels.
FRAGMENT_RECORDS = "sphkv_fragment_records"
FRAGMENT_RECORD_BYTES_MAX = 48 * 1024 - FRAGMENT_TABLE_BYTES


class _Body:
    """The lines of one generated function and the record words it has loaded."""

    def __init__(self, record_offset: int):
        self.lines: list[str] = []
        self.words: dict[str, str] = {}
        self.record_offset = record_offset

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)

    def word(self, index: str) -> str:
        """The record word at `index` (an expression in `sub`, or a constant) past the codec's
        offset, as uint32, read once from the staged tile (`base`: the token's first word there)."""
        if index not in self.words:
            name = f"w{len(self.words)}"
            # the byte offset of a constant index is the load's immediate; a lane-dependent one is
            # added to the token's byte address (base4: hoisted out of the decoders)
            if index.isdigit():
                self.emit(f"{name} = word_at_{4 * (self.record_offset + int(index))}(base4)")
            else:
                self.emit(f"{name} = word_at_{4 * self.record_offset}(base4 + ({index}) * 4)")
            self.words[index] = name
        return self.words[index]


def _field_parts(layout, field: int):
    return [c for c in layout.components if c.field == field]


def _scaled(value: str, bit: int, width: int, shift: int) -> str:
    """(value >> bit & mask) << (shift + 2): the component's contribution to code * 4, the byte
    offset of a 4-byte table entry, in one shift and one mask."""
    up = shift + 2 - bit
    moved = value if up == 0 else f"({value} << {up})" if up > 0 else f"({value} >> {-up})"
    return f"({moved} & {((1 << width) - 1) << (shift + 2)})"


def _chunk_source(body: _Body, c, parts: int, cache: dict) -> tuple[str, int]:
    """(word expression, first bit) of subtree `sub`'s chunk of component c, for element i at
    bit first + i·width (a word index relative to the chunk's first word for chunks of 32 bits
    or more: see _element)."""
    chunk = c.count * c.width // parts
    if chunk >= 32:
        if c.offset % 32 or 32 % c.width:
            raise Unsupported("record runs of chunks over 32 bits not word-aligned whole words for the fragment kernels")
        return "", chunk
    key = (c.offset, chunk)
    if key not in cache:
        name = f"r{len(cache)}"
        if c.offset // 32 == (c.offset + parts * chunk - 1) // 32:  # every subtree's chunk in one word
            w = body.word(str(c.offset // 32))
            body.emit(f"{name} = {w} >> ({c.offset % 32} + sub * {chunk}).to(gl.uint32)")
        elif 32 % chunk == 0 and c.offset % chunk == 0:  # each chunk inside its own word
            w = body.word(f"(({c.offset} + sub * {chunk}) >> 5)")
            body.emit(f"{name} = {w} >> (({c.offset} + sub * {chunk}) & 31).to(gl.uint32)")
        else:  # a chunk may straddle two words: one funnel shift brings it to bit 0
            lo = body.word(f"(({c.offset} + sub * {chunk}) >> 5)")
            hi = body.word(f"((({c.offset} + sub * {chunk}) >> 5) + 1)")
            body.emit(f"{name} = funnel({lo}, {hi}, (({c.offset} + sub * {chunk}) & 31))")
        cache[key] = name
    return cache[key], chunk


def _element(body: _Body, c, parts: int, i: int, cache: dict) -> str:
    """Component c of subtree `sub`'s element i, scaled as _scaled."""
    chunk = c.count * c.width // parts
    if chunk >= 32:
        bit = i * c.width
        w = body.word(f"({c.offset // 32} + sub * {chunk // 32} + {bit // 32})")
        return _scaled(w, bit % 32, c.width, c.shift)
    src, _ = _chunk_source(body, c, parts, cache)
    return _scaled(src, i * c.width, c.width, c.shift)


def _path_element(body: _Body, c, node: str, cache: dict) -> str:
    """Component c of element `node` (a lane-dependent index) of a run of at most 32 bits."""
    if c.offset // 32 != (c.offset + c.count * c.width - 1) // 32:
        raise Unsupported("a path run of the polar tree is not inside one word")
    w = body.word(str(c.offset // 32))
    key = ("path", c.offset, node)
    if key not in cache:
        name = f"p{len(cache)}"
        body.emit(f"{name} = {w} >> ({c.offset % 32} + {node} * {c.width}).to(gl.uint32)")
        cache[key] = name
    return _scaled(cache[key], 0, c.width, c.shift)


def _lookup(body: _Body, offset: str, table_bytes: int, name: str) -> None:
    # the table's offset travels as the load's immediate (lookup_at_<bytes>): added to the code's
    # offset in Gluon, it became an OR that ptxas did not fold into the address (one LOP3 a lookup)
    # a 0-bit level's offset is a constant: its pure lookup would depend on nothing and could be
    # hoisted above the barrier that ends the tables' staging, so it goes through the volatile form
    function = "lookup_fixed" if offset == "0" else "lookup"
    body.emit(f"{name} = {function}_at_{table_bytes}({offset})")


def _path_lookup(body: _Body, offset: str, table_bytes: int, side_bit: int, name: str) -> str:
    """A path node's factor for this lane as float16: its cos where bit side_bit of `sub` is 0,
    its sin where it is 1, read as one 16-bit load at byte 2·side of the pair (loading the pair
    and selecting cost a PRMT and a SEL per node and lane). Returns the variable's name."""
    side = f"(((sub >> {side_bit}) & 1) * 2)"
    at = side if offset == "0" else f"({offset} | {side}.to(gl.uint32))"
    function = "half_fixed" if offset == "0" else "half"
    body.emit(f"{name} = {function}_at_{table_bytes}({at})")
    return name


def _decoder_source(tables: PolarTables, record_offset: int, parts: int, table_base: int) -> str:
    """A Gluon function decode(base, sub) -> the leaves of subtree `sub` (one of
    `parts`, on axis 2 of [W, CT, parts] inputs) as float16, permuted by _permutation: reshaped to
    [W, CT, D] they are the operand's D index in order."""
    layout = tables.fields.layout
    levels = tables.levels
    below = int(math.log2(parts))  # path levels above the subtrees
    root = levels - below  # the subtrees' root level
    if root < 1:
        raise Unsupported(f"head dim {tables.dim} has no {parts} subtrees")
    body = _Body(record_offset)
    cache: dict = {}

    def code_offset(level: int, element) -> str:
        terms = [element(c) for c in _field_parts(layout, level)]
        if not terms:  # a 0-bit level: its one centroid, entry 0
            return "0"
        return f"({' | '.join(terms)})"  # parenthesised: the caller adds the table's offset

    # the path: the root, then one node per level down to the subtree's root
    x = None
    for level in range(levels, root, -1):
        nodes = tables.dim >> level
        node = "0" if nodes == 1 else f"(sub >> {level - root})"
        off = code_offset(level, lambda c: _path_element(body, c, node, cache) if nodes > 1
                          else _scaled(body.word(str(c.offset // 32)), c.offset % 32, c.width, c.shift))
        h = _path_lookup(body, off, _table_bytes(tables, table_base, level), level - root - 1, f"h{level}")
        body.emit(f"x = {h}" if x is None else f"x = x * {h}")
        x = "x"
    if x is None:
        raise Unsupported("the fragment kernels need at least one path level")
    values = [x]
    for level in range(root, 0, -1):
        nxt = []
        for i, v in enumerate(values):
            off = code_offset(level, lambda c: _element(body, c, parts, i, cache))
            _lookup(body, off, _table_bytes(tables, table_base, level), "t")
            a, b = f"n{level}_{2 * i}", f"n{level}_{2 * i + 1}"
            body.emit(f"{a}, {b} = children({v}, t)")
            nxt += [a, b]
        values = nxt
    counter = [0]

    def join(items):
        if len(items) == 1:
            return items[0]
        lo, hi = join(items[0::2]), join(items[1::2])
        counter[0] += 1
        body.emit(f"j{counter[0]} = gl.join({lo}, {hi})")
        return f"j{counter[0]}"

    # [.., subtree, leaf bits high..low] -> the row-major order of the operand's D index
    dims = ", ".join(str(i) for i in _permutation(parts, int(math.log2(len(values)))))
    body.emit(f"return gl.permute({join(values)}, {dims})")
    return "\n".join(["@gluon.jit", "def decode(base, sub):", "    base4 = base * 4"] + body.lines) + "\n"


def _permutation(parts: int, leaf_bits: int) -> tuple[int, ...]:
    """The permute of the joined leaves [W, CT, subtree, leaf bits high..low] into the order of
    the operand's D index. Keys (4 parts, the B operand of q @ k^T): k bit 0 = leaf bit 0, bits
    1-2 = the quarter, bits 3.. = leaf bits 1..; values (8 parts, the B operand of p @ v): n bits
    0-2 = the octant, bits 3.. = the leaf bits. (Written into the decoder: Triton 3.6's permute
    takes no constexpr tuple.)"""
    if parts == 4:
        return (0, 1) + tuple(range(3, 3 + leaf_bits - 1)) + (2, 2 + leaf_bits)
    return (0, 1) + tuple(range(3, 3 + leaf_bits)) + (2,)


def _radius_source(tables: PolarTables, record_offset: int) -> str:
    """radius(base, STEP, LOG2_MIN) -> float32 (0 for code 0, NaN for all ones)."""
    body = _Body(record_offset)
    terms = []
    for c in _field_parts(tables.fields.layout, 0):
        w = body.word(str(c.offset // 32))
        val = f"({w} >> {c.offset % 32})" if c.offset % 32 else w
        terms.append(f"(({val} & {(1 << c.width) - 1}) << {c.shift})")
    body.emit(f"code = ({' | '.join(terms)}).to(gl.int32)")
    body.emit("r = gl.exp2(LOG2_MIN + (code - 1).to(gl.float32) * STEP)")
    body.emit("r = gl.where(code == 0, 0.0, r)")
    body.emit("return gl.where(code == 65535, float('nan'), r)")
    return "\n".join(["@gluon.jit", "def radius(base, STEP: gl.constexpr, LOG2_MIN: gl.constexpr):",
                      "    base4 = base * 4"]
                     + body.lines) + "\n"


DECODER_HEADER = f'''"""Generated by sphkv_compile.kernels.fragment_codegen; do not edit."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def funnel(lo, hi, amount):
    """The 32 bits of hi:lo from bit `amount` up."""
    return gl.inline_asm_elementwise("shf.r.wrap.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, amount.to(gl.uint32)],
                                     dtype=gl.uint32, is_pure=True, pack=1)


# (cos, sin) of a lookup's pair: the probes' decoders (benchmarks/), not the generated ones
@gluon.jit
def halves(t):
    return gl.inline_asm_elementwise("mov.b32 {{$0, $1}}, $2;", "=h,=h,r", [t], dtype=(gl.float16, gl.float16),
                                     is_pure=True, pack=1)


@gluon.jit
def children(x, t):
    """A node's two children: its value times (cos, sin), one f16x2 multiply."""
    return gl.inline_asm_elementwise(
        "{{ .reg .b32 p, d; mov.b32 p, {{$2, $2}}; mul.rn.f16x2 d, p, $3; mov.b32 {{$0, $1}}, d; }}",
        "=h,=h,h,r", [x, t], dtype=(gl.float16, gl.float16), is_pure=True, pack=1)


'''


def _staging_source(record_words: int, tokens_per_warp: int, warps: int) -> str:
    """declare_records, word and copy_tile for records of record_words words.

    Why staged: read straight from global memory, each lane's words of its subtree are scattered
    4-byte loads over ~8 records per warp instruction. The speed probe
    (benchmarks/probe_gluon_fragments.py, session 25) ran 1.3x faster when each warp first copied
    its tokens' records (contiguous: CT tokens of one page) to shared memory with 16-byte
    cp.async, one tile ahead, and the lanes read their words from there."""
    chunks = tokens_per_warp * record_words // 4  # 16-byte pieces of one warp's tile
    if tokens_per_warp * record_words % 4:
        raise Unsupported("a warp's records are not a whole number of 16-byte pieces")
    size = 2 * warps * tokens_per_warp * record_words * 4
    if size > FRAGMENT_RECORD_BYTES_MAX:
        raise Unsupported(f"records of {record_words} words need {size} bytes of staging "
                          f"(at most {FRAGMENT_RECORD_BYTES_MAX})")
    lanes = 1 << (max(chunks, 32) - 1).bit_length()
    return "".join(_word_source(4 * i) for i in range(record_words)) + f'''
@gluon.jit
def declare_records(x):
    return gl.inline_asm_elementwise(".shared .align 16 .b8 {FRAGMENT_RECORDS}[{size}]; mov.u32 $0, $1;", "=r,r", [x],
                                     dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def copy_tile(pool_ptr, pages_ptr, row, t0, end, stage, PS: gl.constexpr):
    """Start copying the records of tokens t0 + w·{tokens_per_warp} + [0, {tokens_per_warp}) (one page's,
    contiguous) into warp w's part of staging tile `stage`, 16 bytes per cp.async, and commit them
    as one group."""
    CL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [{warps}, 1], [1, 0])
    w = gl.arange(0, {warps}, layout=gl.SliceLayout(1, CL))
    c = gl.arange(0, {lanes}, layout=gl.SliceLayout(0, CL))
    first = t0 + w * {tokens_per_warp}
    ok = first < end
    page = gl.load(pages_ptr + row + first // PS, mask=ok, other=0)
    src = pool_ptr + ((page.to(gl.int64) * PS + first % PS) * {record_words})[:, None] + 4 * c[None, :]
    dst = ((stage * {warps} + w[:, None]) * {tokens_per_warp * record_words} + 4 * c[None, :]) * 4
    pred = (ok[:, None] & (c[None, :] < {chunks})).to(gl.int32)
    gl.inline_asm_elementwise(
        "{{ .reg .u32 a; .reg .pred p; setp.ne.u32 p, $3, 0; mov.u32 a, {FRAGMENT_RECORDS}; add.u32 a, a, $1; "
        "@p cp.async.cg.shared.global [a], [$2], 16; mov.u32 $0, 0; }}",
        "=r,r,l,r", [dst, src, pred], dtype=gl.int32, is_pure=False, pack=1)
    gl.inline_asm_elementwise("cp.async.commit_group; mov.u32 $0, $1;", "=r,r", [t0], dtype=gl.int32,
                              is_pure=False, pack=1)
'''


def _shared_load(array: str, byte: int, bits: int = 32) -> str:
    """PTX of a load of `bits` bits from static shared array `array` at byte $1 + `byte`, the
    constant carried as the load's immediate (ptxas folds it into the address: no instruction)."""
    return "{ .reg .u32 a; mov.u32 a, %s; add.u32 a, a, $1; ld.shared.b%d $0, [a+%d]; }" % (array, bits, byte)


def _word_source(byte: int) -> str:
    """word_at_<byte>(address): the staged record word at byte `address` + `byte`, as uint32."""
    asm = _shared_load(FRAGMENT_RECORDS, byte)
    return f'''
@gluon.jit
def word_at_{byte}(address):
    return gl.inline_asm_elementwise("{asm}", "=r,r", [address], dtype=gl.int32, is_pure=True,
                                     pack=1).to(gl.uint32, bitcast=True)

'''


def _lookup_source(table_bytes: int) -> str:
    """lookup_at_<table_bytes>(off): the float16 (cos, sin) pair at byte table_bytes + off of the
    staged tables, as int32; half_at_<table_bytes>(off): the float16 there. Their _fixed forms,
    for an offset known before the loop, stay in program order (volatile) after the tables'
    barrier."""
    asm = _shared_load(FRAGMENT_TABLES, table_bytes)
    half = _shared_load(FRAGMENT_TABLES, table_bytes, 16)
    return "".join(f'''
@gluon.jit
def lookup{fixed}_at_{table_bytes}(off):
    return gl.inline_asm_elementwise("{asm}", "=r,r", [off], dtype=gl.int32, is_pure={pure}, pack=1)


@gluon.jit
def half{fixed}_at_{table_bytes}(off):
    return gl.inline_asm_elementwise("{half}", "=h,r", [off], dtype=gl.float16, is_pure={pure}, pack=1)

''' for fixed, pure in (("", True), ("_fixed", False)))


def _table_bytes(tables: PolarTables, table_base: int, level: int) -> int:
    """Byte offset of level `level`'s table (levels 1..) in the staged tables, the codec's first
    at table_base."""
    return table_base + (level - 1) * 4 * tables.table_size


def _table_offsets(tables: PolarTables, table_base: int) -> list[int]:
    return [_table_bytes(tables, table_base, level) for level in range(1, tables.levels + 1)]


def table_words(tables: PolarTables) -> int:
    return tables.levels * tables.table_size


@lru_cache(maxsize=None)
def fragment_decoders(key: PolarTables, value: PolarTables, key_words: int, record_words: int, tokens_per_warp: int,
                      warps: int):
    """(key quarter decoder, value octant decoder, key radius, value radius, declare_records,
    copy_tile) Gluon functions for a tier whose K record is followed by its V record (key_words
    words in), records of record_words words."""
    if key.dim != value.dim:
        raise Unsupported("key and value head dims differ")
    if 4 * (table_words(key) + table_words(value)) > FRAGMENT_TABLE_BYTES:
        raise Unsupported("the fragment kernels stage at most "
                          f"{FRAGMENT_TABLE_BYTES} bytes of tables")
    for t in (key, value):
        if not t.fields.layout.subtree_aligned:
            raise Unsupported("record layout not subtree-aligned")
    vbase = 4 * table_words(key)
    lookups = "".join(_lookup_source(b) for b in _table_offsets(key, 0) + _table_offsets(value, vbase))
    src = (DECODER_HEADER + lookups + _staging_source(record_words, tokens_per_warp, warps) + "\n\n"
           + _decoder_source(key, 0, 4, 0).replace("def decode(", "def key_quarter(") + "\n\n"
           + _decoder_source(value, key_words, 8, vbase).replace("def decode(", "def value_octant(") + "\n\n"
           + _radius_source(key, 0).replace("def radius(", "def key_radius(") + "\n\n"
           + _radius_source(value, key_words).replace("def radius(", "def value_radius("))
    mod = load_generated(src, None)
    return mod.key_quarter, mod.value_octant, mod.key_radius, mod.value_radius, mod.declare_records, mod.copy_tile
