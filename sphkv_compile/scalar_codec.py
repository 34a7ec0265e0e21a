"""RotatedScalarCodec: block-Hadamard rotation, one radius, then a b-bit Lloyd-Max code per
coordinate (TurboQuant's MSE stage). Used as a value codec candidate and as a baseline.

After rotation the unit vector's coordinates follow the exact sphere marginal
f(x) ∝ (1 - x²/d)^((d-3)/2) (scaled by sqrt(d)); the codebook is Lloyd-Max for it.
Shares the record format (split-width packing, log-domain radius) with SphericalCodec.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch

from .codebooks import sphere_coordinate_codebook
from .codec import Codes, _float_work_dtype, check_head_dim
from .packing import RecordLayout
from .precondition import BlockHadamard
from .radius import decode_radius, encode_radius, unit_and_log2_norm


class RotatedScalarCodec:
    def __init__(self, head_dim: int, bits: int = 3, seed: int = 0, radius_bits: int = 16):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"RotatedScalarCodec takes an int of bits per coordinate in [1, 16], got {bits!r}")
        self.head_dim = int(head_dim)
        self.bits = bits
        self.seed = int(seed)
        self.radius_bits = int(radius_bits)
        self.hadamard = BlockHadamard(self.head_dim, self.seed)
        self.dim = self.hadamard.dim
        self.layout = RecordLayout(((1, self.radius_bits), (self.dim, bits)))

    @property
    def words(self) -> int:
        return self.layout.words

    @property
    def bits_per_element(self) -> float:
        return 32 * self.layout.words / self.head_dim

    def __repr__(self) -> str:
        return f"RotatedScalarCodec(head_dim={self.head_dim}, bits={self.bits}, bits_per_element={self.bits_per_element:.3f})"

    @cached_property
    def _book64(self):
        # Block-wise rotation: each coordinate is a sphere marginal of its own block size,
        # but the unit is the whole vector; the sqrt(dim) scaling matches the largest block
        # well and the others approximately (documented cost of non-power-of-two dims).
        b = sphere_coordinate_codebook(self.dim, self.bits)
        return torch.from_numpy(b.centroids.copy()), torch.from_numpy(b.thresholds.copy())

    def tables(self, device, dtype):
        cache = self.__dict__.setdefault("_table_cache", {})
        key = (torch.device(device), dtype)
        if key not in cache:
            cache[key] = tuple(t.to(device=device, dtype=dtype) for t in self._book64)
        return cache[key]

    def encode(self, x: torch.Tensor) -> Codes:
        check_head_dim(x, self.head_dim, "input")
        y = self.hadamard.forward(x.to(_float_work_dtype(x)))
        return Codes(self.encode_rotated(y), self)

    def encode_rotated(self, y: torch.Tensor) -> torch.Tensor:
        _, thr = self.tables(y.device, y.dtype)
        unit, log2_r = unit_and_log2_norm(y)
        u = unit * math.sqrt(self.dim)
        codes = torch.searchsorted(thr, u.contiguous())
        return self.layout.pack([encode_radius(log2_r, self.radius_bits).unsqueeze(-1), codes])

    def norm2(self, words: torch.Tensor) -> torch.Tensor:
        """‖decoded vector‖² float32 [...]: the centroids do not keep the norm, so this decodes."""
        return self.decode_rotated(words).pow(2).sum(-1)

    def decode_rotated(self, words: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        fields = self.layout.unpack(words)
        radius = decode_radius(fields[0].squeeze(-1), self.radius_bits, dtype)
        cent, _ = self.tables(words.device, dtype)
        return cent[fields[1]] * (radius / math.sqrt(self.dim)).unsqueeze(-1)

    def decode(self, codes, dtype=torch.float32) -> torch.Tensor:
        words = codes.words if isinstance(codes, Codes) else codes
        return self.hadamard.inverse(self.decode_rotated(words, dtype))
