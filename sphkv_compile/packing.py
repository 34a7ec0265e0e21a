"""Dense split-width bit packing of one token's codes into 32-bit words.

A b-bit code is split into its power-of-two components (3 = 2 + 1, 5 = 4 + 1, ...). All
components of one width of one field sit in one run of the record, so every element starts at
a multiple of its own width and never straddles a 32-bit word: a kernel extracts any code with a
constant word index, shift and mask. A b-bit code costs exactly b bits; only the record's tail
is padded to a whole word.

Run order: where every run's size (count x width) is a power of two, as in the polar codecs of
power-of-two head dims, the runs go largest first (ties: widest first, then field order), so
each run starts at a multiple of its own size. Then the codes of any aligned 1/2^k of a run (a
subtree of the polar tree) sit at the same word offsets and shifts relative to a start that is a
multiple of min(32, chunk) bits: the fragment kernels (kernels/fragment_codegen.py), where the
lanes of a token each decode one subtree, rely on it. Elsewhere the runs go widest first.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

WIDTHS = (32, 16, 8, 4, 2, 1)


@dataclass(frozen=True)
class Component:
    field: int  # which field (radius, level 1, group ...)
    count: int  # elements in the field
    width: int  # bits of this component
    shift: int  # where these bits sit inside the field's code value
    offset: int  # bit offset of element 0 in the record

    def positions(self) -> torch.Tensor:
        return self.offset + self.width * torch.arange(self.count, dtype=torch.int64)


def split_widths(bits: int) -> list[tuple[int, int]]:
    """(width, shift) pairs, widest first: 3 -> [(2, 1), (1, 0)]."""
    out, shift = [], bits
    for w in WIDTHS:
        if bits & w:
            shift -= w
            out.append((w, shift))
    return out


@dataclass(frozen=True)
class RecordLayout:
    """Bit layout of one token's record for fields of (count, bits)."""

    fields: tuple[tuple[int, int], ...]

    @cached_property
    def components(self) -> tuple[Component, ...]:
        pieces = [(w, s, f, n) for f, (n, b) in enumerate(self.fields) if n and b for w, s in split_widths(b)]
        if self.subtree_aligned:
            pieces.sort(key=lambda t: (-t[0] * t[3], -t[0]))  # stable: field order among equals
        else:
            pieces.sort(key=lambda t: -t[0])  # stable: field order kept inside a width
        comps, offset = [], 0
        for w, s, f, n in pieces:
            comps.append(Component(f, n, w, s, offset))
            offset += n * w
        return tuple(comps)

    @cached_property
    def subtree_aligned(self) -> bool:
        """Are the runs laid out largest first, each at a multiple of its size (module docstring)?"""
        sizes = [n * w for n, b in self.fields if n and b for w, _ in split_widths(b)]
        return all(size & (size - 1) == 0 for size in sizes)

    @property
    def payload_bits(self) -> int:
        return sum(n * b for n, b in self.fields)

    @property
    def words(self) -> int:
        return max(1, -(-self.payload_bits // 32))

    def pack(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """codes[f]: int64 [..., count_f] -> int32 words [..., words]."""
        lead = codes[0].shape[:-1]
        acc = torch.zeros(*lead, self.words, dtype=torch.int64, device=codes[0].device)
        for c in self.components:
            pos = c.positions().to(acc.device)
            part = (codes[c.field] >> c.shift) & ((1 << c.width) - 1)
            acc.scatter_add_(-1, (pos // 32).expand(*lead, c.count), part << (pos % 32))
        # two's-complement view of the unsigned 32-bit words
        return torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)

    def _word_and_shift(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per component: (word index, bit shift) tensors, cached per device (hot in decode)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        key = torch.device(device)
        if key not in cache:
            cache[key] = [((c.positions() // 32).to(device), (c.positions() % 32).to(device)) for c in self.components]
        return cache[key]

    def unpack(self, words: torch.Tensor) -> list[torch.Tensor]:
        """int32 words [..., words] -> int64 codes per field."""
        return self._unpack_fields(words, range(len(self.fields)))

    def unpack_field(self, words: torch.Tensor, field: int) -> torch.Tensor:
        """Only field `field`'s codes (int64 [..., count]): the radius alone, without the angles."""
        return self._unpack_fields(words, (field,))[0]

    def _unpack_fields(self, words: torch.Tensor, fields) -> list[torch.Tensor]:
        if words.shape[-1] != self.words:
            raise ValueError(f"record has {words.shape[-1]} words, layout expects {self.words}")
        # word-major [words, ...]: each component's words are whole contiguous rows to gather
        # (gathered along the last dim they were single elements at a stride, slow on the CPU)
        w64 = (words.to(torch.int64) & 0xFFFFFFFF).movedim(-1, 0).contiguous()
        lead = (1,) * (words.dim() - 1)
        out = {f: torch.zeros(self.fields[f][0], *words.shape[:-1], dtype=torch.int64, device=words.device)
               for f in fields}
        for c, (word, shift) in zip(self.components, self._word_and_shift(words.device)):
            if c.field in out:
                out[c.field] |= ((w64.index_select(0, word) >> shift.view(-1, *lead)) & ((1 << c.width) - 1)) << c.shift
        return [out[f].movedim(0, -1) for f in fields]
