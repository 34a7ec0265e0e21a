"""Two 16-bit floats in one 32-bit register: the packed arithmetic of the tree decoders.

A polar-tree node's children are parent·(cos ψ, sin ψ). With (cos, sin) stored as one 32-bit
word of two 16-bit floats, one packed multiply (HMUL2) makes both children, and the pair is
also what the next level reads: its low half is child 2j, its high half child 2j+1, and a
child becomes a parent by broadcasting one half (a free operand swizzle in SASS). Per node
that is one 4-byte table load and one multiply instead of an 8-byte load and two float32
multiplies, and the leaves come out already packed as the dot's 16-bit operand.

The decoders work in unit radius (leaves are direction components in [-1, 1]); the radius
scales the logits or the softmax weights afterwards, so fp16's range never limits a key.

On the GPU these are PTX (mul.rn.f16x2 / mul.rn.bf16x2: one rounding per product). Under the
Triton interpreter (CPU tests), EMULATE computes the same correctly rounded products with
integer and float32 operations, so both give the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def to_float(bits, BF16: tl.constexpr):
    """16-bit float bits (low half of a uint32) -> float32, exactly."""
    if BF16:
        return (bits << 16).to(tl.float32, bitcast=True)
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def from_float(x, BF16: tl.constexpr):
    """float32 -> 16-bit float bits (round to nearest even) in the low half of a uint32."""
    if BF16:
        b = x.to(tl.uint32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return tl.where(x != x, (b >> 16) | 0x40, rounded)  # NaN stays NaN
    return x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def emulated_mul_half(pair, cs, HALF: tl.constexpr, BF16: tl.constexpr):
    """What mul_half computes on the GPU, for the interpreter: the pair's half HALF times both halves
    of cs, each product rounded once to the 16-bit format."""
    p = to_float((pair >> (16 * HALF)) & 0xFFFF, BF16)
    lo = from_float(p * to_float(cs & 0xFFFF, BF16), BF16)
    hi = from_float(p * to_float(cs >> 16, BF16), BF16)
    return lo | (hi << 16)


@triton.jit
def split_pairs(pairs, BF16: tl.constexpr, EMULATE: tl.constexpr):
    """uint32 pairs [..., N] -> the [..., 2N] tile of their halves, low half first. Under the
    interpreter the tile is float32 holding the same 16-bit values exactly."""
    if EMULATE:
        lo = to_float(pairs & 0xFFFF, BF16)
        hi = to_float(pairs >> 16, BF16)
    elif BF16:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    both = tl.join(lo, hi)
    return tl.reshape(both, (pairs.shape[0], 2 * pairs.shape[1]))


@triton.jit
def mul_half(pair, cs, HALF: tl.constexpr, BF16: tl.constexpr, EMULATE: tl.constexpr):
    """Both children of the node held in half HALF of `pair`: that half times (cos, sin) = cs."""
    if EMULATE:
        return emulated_mul_half(pair, cs, HALF, BF16)
    elif BF16:
        if HALF == 0:
            return tl.inline_asm_elementwise(
                "{.reg .b16 l, h; .reg .b32 t; mov.b32 {l, h}, $1; mov.b32 t, {l, l}; mul.rn.bf16x2 $0, t, $2;}",
                "=r,r,r", [pair, cs], dtype=tl.uint32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{.reg .b16 l, h; .reg .b32 t; mov.b32 {l, h}, $1; mov.b32 t, {h, h}; mul.rn.bf16x2 $0, t, $2;}",
                "=r,r,r", [pair, cs], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        if HALF == 0:
            return tl.inline_asm_elementwise(
                "{.reg .b16 l, h; .reg .b32 t; mov.b32 {l, h}, $1; mov.b32 t, {l, l}; mul.rn.f16x2 $0, t, $2;}",
                "=r,r,r", [pair, cs], dtype=tl.uint32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{.reg .b16 l, h; .reg .b32 t; mov.b32 {l, h}, $1; mov.b32 t, {h, h}; mul.rn.f16x2 $0, t, $2;}",
                "=r,r,r", [pair, cs], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def table_word(tab_ptr, index, EMULATE: tl.constexpr):
    """tab_ptr[index] for a uint32 index: one IMAD.WIDE for the address instead of the two LEAs
    a 64-bit pointer add takes (a decoder reads ~250 table words per token)."""
    if EMULATE:
        return tl.load(tab_ptr + index).to(tl.uint32, bitcast=True)
    else:
        return tl.inline_asm_elementwise(
            "{.reg .u64 a; mad.wide.u32 a, $1, 4, $2; ld.global.nc.b32 $0, [a];}", "=r,r,l",
            [index, tab_ptr], dtype=tl.uint32, is_pure=True, pack=1)
