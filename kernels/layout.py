"""Kernel constants derived from the codecs (never typed in).

Everything a kernel needs to read or write one tier's records comes from the codec objects:
component descriptors from the RecordLayout (bit offset, width, value shift per split-width
component), cos/sin tables of the Lloyd-Max centroids, cos/sin of the decision thresholds
(encode compares against them without atan2), the log-radius step, and the dense matrices
of the block-Hadamard rotation.

A codec the kernels do not handle raises Unsupported with the reason; callers fall back to
the reference implementation and log that reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from sphkv_compile.codec import SphericalCodec
from sphkv_compile.radius import LOG2_MAX, LOG2_MIN
from sphkv_compile.scalar_codec import RotatedScalarCodec
from sphkv_compile.tiers import TierSpec, record_words, tier_codecs

MAX_KERNEL_BITS = 8  # per-angle bits the kernels table (2^8-entry trig tables)
COMP_FIELDS = 3  # offset, width, value shift


class Unsupported(ValueError):
    """The kernels do not handle this configuration; the message says why."""


@dataclass(frozen=True)
class FieldTables:
    """Split-width component descriptors of one codec's record.

    comps: int32 [fields, max_comps, 3] = (bit offset of element 0, width, shift of these
    bits inside the code value). counts: components per field packed 4 bits per field into
    one int, so kernels unroll over them as constexpr.
    """

    comps: torch.Tensor
    counts: int
    max_comps: int
    widths: int  # log2 of each component's width, 3 bits at position 3·(field·max_comps + component)
    layout: object = None  # the codec's RecordLayout (the generated decoders read it directly)


def field_tables(layout) -> FieldTables:
    per_field = [[] for _ in layout.fields]
    for c in layout.components:
        if c.width >= 32:
            raise Unsupported("a 32-bit component (radius_bits=32) is not handled by the kernels")
        per_field[c.field].append((c.offset, c.width, c.shift))
    max_comps = max(1, max(len(p) for p in per_field))
    if max_comps > 15 or len(per_field) > 15:
        raise Unsupported(f"record layout with {len(per_field)} fields / {max_comps} components per field")
    comps = torch.zeros(len(per_field), max_comps, COMP_FIELDS, dtype=torch.int32)
    counts = widths = 0
    for f, parts in enumerate(per_field):
        counts |= len(parts) << (4 * f)
        for i, p in enumerate(parts):
            comps[f, i] = torch.tensor(p, dtype=torch.int32)
            widths |= (p[1].bit_length() - 1) << (3 * (f * max_comps + i))
    return FieldTables(comps, counts, max_comps, widths, layout)


def radius_step(bits: int) -> float:
    levels = (1 << bits) - 2
    return (LOG2_MAX - LOG2_MIN) / (levels - 1)


def radius_round_offset(bits: int) -> int:
    """-LOG2_MIN / step + 1/2 as an int (the encoder rounds as floor(log2 r / step) + this)."""
    off = -LOG2_MIN / radius_step(bits) + 0.5
    if abs(off - round(off)) > 1e-6:
        raise Unsupported("the log-radius grid is not symmetric around 0; the encoder's rounding needs it")
    return int(round(off))


def _check_radius(codec) -> None:
    if codec.radius_bits != 16:
        raise Unsupported(f"radius_bits={codec.radius_bits}: the kernels read 16-bit log radii only")


def _perfect_tree_levels(codec: SphericalCodec) -> int:
    """Number of angle levels if the polar tree is the plain binary tree over a power-of-two
    dim with children of node j at 2j, 2j+1 (what the kernels' interleave recurrence assumes)."""
    tree = codec.tree
    d = tree.dim
    if d != codec.head_dim or d & (d - 1) or d < 4:
        raise Unsupported(f"head_dim={codec.head_dim}: the kernels need a power-of-two head dim >= 4")
    levels = int(math.log2(d))
    if len(tree.groups) != levels - 1:
        raise Unsupported("unexpected polar tree shape")
    below = list(range(tree.pairs))
    for g in tree.groups:
        if list(g.left) != below[0::2] or list(g.right) != below[1::2]:
            raise Unsupported("polar tree children are not at 2j, 2j+1")
        below = list(g.out)
    return levels


@dataclass(frozen=True)
class PolarTables:
    """Constants of one SphericalCodec for the kernels (float32 unless noted)."""

    dim: int
    levels: int  # level 1 .. levels; field f of the record holds level f (field 0: radius)
    fields: FieldTables
    trig: torch.Tensor  # [levels, 2, 2^max_bits]: cos, sin of each level's centroids
    thresholds: torch.Tensor  # [levels, 2, 2^max_bits]: cos, sin of decision thresholds (encode)
    bits: int  # level bits packed 4 per level (level 1 in the low nibble)
    table_size: int
    radius_step: float

    @property
    def trig_pairs(self) -> torch.Tensor:
        """int64 [levels, 2^max_bits]: each centroid's float32 (cos, sin) side by side, cos in the
        low half (one 8-byte load per code)."""
        if "_pairs" not in self.__dict__:  # (setdefault would build the tensor at every call)
            self.__dict__["_pairs"] = self.trig.transpose(1, 2).contiguous().view(torch.int64)[..., 0]
        return self.__dict__["_pairs"]

    @property
    def half_pairs(self) -> torch.Tensor:
        """int32 [levels, 2^max_bits]: each centroid's (cos, sin) as a float16 pair, cos in the low
        half: one 4-byte shared-memory load per code, and the operand of one f16x2 multiply
        (decode_codegen's packed decoders). Rounding to float16 moves a cos or sin by at most
        2^-12 (half an ulp below 1)."""
        if "_half_pairs" not in self.__dict__:
            self.__dict__["_half_pairs"] = self.trig.transpose(1, 2).to(torch.float16).contiguous().view(torch.int32)[..., 0]
        return self.__dict__["_half_pairs"]


@lru_cache(maxsize=None)
def polar_tables(codec: SphericalCodec) -> PolarTables:
    _check_radius(codec)
    levels = _perfect_tree_levels(codec)
    if max(codec.level_bits) > MAX_KERNEL_BITS:
        raise Unsupported(f"level bits {codec.level_bits}: the kernels table at most {MAX_KERNEL_BITS} bits per angle")
    if codec.level_bits[0] < 1:
        raise Unsupported("level-1 angles with 0 bits")
    size = 1 << max(codec.level_bits)
    trig = torch.zeros(levels, 2, size, dtype=torch.float64)
    # Padding thresholds never test true: (cos, sin) = (0, 1) makes b·cos - a·sin = -a <= 0.
    thr = torch.zeros(levels, 2, size, dtype=torch.float64)
    thr[:, 1] = 1.0
    for lev, (cent, t) in enumerate(codec._tables64):
        trig[lev, 0, : len(cent)] = torch.cos(cent)
        trig[lev, 1, : len(cent)] = torch.sin(cent)
        if lev == 0:
            t = _half_circle_thresholds(t, codec.level_bits[0])
        thr[lev, 0, : len(t)] = torch.cos(t)
        thr[lev, 1, : len(t)] = torch.sin(t)
    bits = sum(b << (4 * i) for i, b in enumerate(codec.level_bits))
    return PolarTables(codec.tree.dim, levels, field_tables(codec.layout), trig.float(), thr.float(), bits, size,
                       radius_step(codec.radius_bits))


def _half_circle_thresholds(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Level-1 encode reduces theta to [0, pi) (the lower half-plane adds L/2 to the code), so it
    needs the thresholds inside (0, pi). That is only valid for a codebook symmetric under a
    half turn, which the uniform circle codebook is; anything else is refused."""
    half = 1 << (bits - 1)
    if bits == 1:
        ok = len(t) == 1 and abs(float(t[0]) - math.pi) < 1e-12
        if not ok:
            raise Unsupported("level-1 codebook is not half-turn symmetric")
        return t[:0]
    inner = t[: half - 1]
    ok = abs(float(t[half - 1]) - math.pi) < 1e-9 and torch.allclose(t[half:], inner + math.pi, atol=1e-9)
    if not ok:
        raise Unsupported("level-1 codebook is not half-turn symmetric")
    return inner


@dataclass(frozen=True)
class ScalarTables:
    dim: int
    bits: int
    fields: FieldTables
    # the decoders' table: the codec's centroids / sqrt(dim), the coordinates of a unit vector
    # (the codec's are those times sqrt(dim)), so a leaf is one lookup with no multiply
    unit_centroids: torch.Tensor  # [2^bits]
    thresholds: torch.Tensor  # [2^bits] (last entry +inf padding)
    radius_step: float


@lru_cache(maxsize=None)
def scalar_tables(codec: RotatedScalarCodec) -> ScalarTables:
    _check_radius(codec)
    d = codec.dim
    if d != codec.head_dim or d & (d - 1) or d < 4:
        raise Unsupported(f"head_dim={codec.head_dim}: the kernels need a power-of-two head dim >= 4")
    if codec.bits > MAX_KERNEL_BITS:
        raise Unsupported(f"scalar value bits {codec.bits} > {MAX_KERNEL_BITS}")
    cent, thr = codec._book64
    pad = torch.full((1 << codec.bits,), float("inf"), dtype=torch.float64)
    pad[: len(thr)] = thr
    return ScalarTables(d, codec.bits, field_tables(codec.layout), (cent * d ** -0.5).float(), pad.float(),
                        radius_step(codec.radius_bits))


@lru_cache(maxsize=None)
def under_interpreter() -> bool:
    """Do the kernels run under the Triton interpreter (CPU tests)? Asked of a kernel itself, so
    the answer is what triton.jit decided at import, fixed for the process (cached: launch code
    asks several times per call)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .encode_kernels import encode_kv_kernel

    return isinstance(encode_kv_kernel, InterpretedFunction)


@lru_cache(maxsize=None)
def _forward_float64(hadamard) -> torch.Tensor:
    """The forward rotation as a float64 [d, d] matrix, built from the transform itself."""
    return hadamard.forward(torch.eye(hadamard.head_dim, dtype=torch.float64))


@lru_cache(maxsize=None)
def rotation_matrices(hadamard) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, inverse) float32 [d, d] with y = x @ forward and x = y @ inverse (built in
    float64 from the transform itself)."""
    inv = hadamard.inverse(torch.eye(hadamard.dim, dtype=torch.float64))
    return _forward_float64(hadamard).float(), inv.float()


@lru_cache(maxsize=None)
def rotation_signs(hadamard, dtype: torch.dtype) -> tuple[torch.Tensor, float] | None:
    """The forward rotation as (S, c) with forward = c·S and S's entries in {-1, 0, +1}, stored
    in `dtype` (bf16 or fp16), or None when the entries do not share one magnitude. With 16-bit
    inputs x, x @ S is exact products summed in float32 on the tensor cores: one 16-bit MMA
    instead of three tf32 ones (and their operand splitting) for float32 accuracy."""
    fwd = _forward_float64(hadamard)
    mags = fwd.abs()[fwd != 0]
    c = float(mags.max())
    if not torch.allclose(mags, torch.full_like(mags, c), rtol=1e-12, atol=0):
        return None
    return torch.round(fwd / c).to(dtype), c


@dataclass(frozen=True)
class TierKernelInfo:
    """What a kernel launch needs to know about one tier."""

    spec: TierSpec
    key_words: int
    value_words: int
    key: PolarTables | None  # None: exact tier
    value: PolarTables | ScalarTables | None


@lru_cache(maxsize=None)
def tier_info(spec: TierSpec, head_dim: int, seed: int, kv_dtype: torch.dtype) -> TierKernelInfo:
    kw, vw = record_words(spec, head_dim, seed, kv_dtype)
    if spec.exact:
        if kv_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise Unsupported(f"exact tier in {kv_dtype}")
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise Unsupported(f"head_dim={head_dim}: the kernels need a power-of-two head dim >= 16")
        return TierKernelInfo(spec, kw, vw, None, None)
    kc, vc = tier_codecs(spec, head_dim, seed)
    key = polar_tables(kc)
    value = polar_tables(vc) if isinstance(vc, SphericalCodec) else scalar_tables(vc)
    return TierKernelInfo(spec, kw, vw, key, value)


class DeviceCache:
    """Host tensors moved to a device once."""

    def __init__(self):
        self._cache = {}

    def get(self, t: torch.Tensor, device) -> torch.Tensor:
        key = (id(t), str(device))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not t:
            hit = (t, t.to(device).contiguous())
            self._cache[key] = hit
        return hit[1]


DEVICE_TABLES = DeviceCache()


def prepare_device_tables(specs, head_dim: int, seed: int, kv_dtype: torch.dtype, device: torch.device) -> None:
    """Move every table the kernels read for these tiers to `device` now, when a store is made.
    Made lazily instead, the first decode step would allocate them inside the memory pool of
    generate()'s CUDA graphs and keep them, which the pool refuses ("tensors in the cudagraph
    pool not tracked as outputs", seen on the H200)."""
    if device.type != "cuda":
        return
    for spec in specs:
        try:
            info = tier_info(spec, head_dim, seed, kv_dtype)
        except Unsupported:  # the ops fall back to the reference for this tier
            continue
        if info.key is None:
            continue
        tables = []
        for codec in tier_codecs(spec, head_dim, seed):
            tables += rotation_matrices(codec.hadamard)
            for dtype in (torch.bfloat16, torch.float16):
                signs = rotation_signs(codec.hadamard, dtype)
                tables += [signs[0]] if signs else []
        for t in (info.key, info.value):
            tables += [t.fields.comps, t.thresholds]
            tables += [t.unit_centroids] if isinstance(t, ScalarTables) else [t.trig, t.trig_pairs, t.half_pairs]
        for t in tables:
            DEVICE_TABLES.get(t, device)
