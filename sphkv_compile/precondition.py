"""Seeded randomized block-Hadamard preconditioning: y = H·D·x, orthonormal.

The same transform is applied to queries and keys, so q·k = q'·y exactly (before any
quantization). Head dims that are not powers of two are split into power-of-two blocks
(the binary expansion of d, largest first); an odd d is padded with one zero coordinate.
One block-Hadamard pass only mixes channels inside a block, so an outlier channel would
leave the blocks' energies far from the split the cross-block angle codebooks assume; with
more than one block a second pass runs after a seeded permutation and fresh random signs, which spreads every
block's energy over all blocks in proportion to their sizes. That second pass is what
non-power-of-two dims cost (docs/CODEC.md).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def padded_dim(head_dim: int) -> int:
    """The preconditioned dimension: head_dim rounded up to an even number."""
    return head_dim + (head_dim % 2)


@lru_cache(maxsize=None)
def block_sizes(head_dim: int) -> tuple[int, ...]:
    """Power-of-two block sizes covering padded_dim(head_dim), largest first."""
    n = padded_dim(head_dim)
    return tuple(1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1)


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """Seeded ±1 diagonal (float32, CPU). Deterministic across machines."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64)
    return (1 - 2 * bits).to(torch.float32)


def _fwht_(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n) * (1.0 / math.sqrt(n))


def _blockwise_fwht(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    parts = torch.split(x, list(sizes), dim=-1)
    return torch.cat([_fwht_(p) for p in parts], dim=-1)


class BlockHadamard:
    """y = H·D·pad(x) with H block-diagonal Walsh-Hadamard (orthonormal), D seeded ±1."""

    def __init__(self, head_dim: int, seed: int = 0):
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        self.head_dim = head_dim
        self.dim = padded_dim(head_dim)
        self.blocks = block_sizes(head_dim)
        self.seed = int(seed)
        self._signs = random_signs(self.dim, self.seed)
        self._perm = None
        if len(self.blocks) > 1:
            gen = torch.Generator(device="cpu").manual_seed(self.seed + 0x5EED)
            self._perm = torch.randperm(self.dim, generator=gen)
            self._inv_perm = torch.argsort(self._perm)
            # fresh signs too: a permuted constant vector (a Hadamard column) stays constant
            self._signs2 = random_signs(self.dim, self.seed + 0x5EED)

    def signs(self, like: torch.Tensor) -> torch.Tensor:
        return self._signs.to(device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] -> [..., dim] in the rotated domain."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"expected last dim {self.head_dim}, got {tuple(x.shape)}")
        if self.dim != self.head_dim:
            x = torch.nn.functional.pad(x, (0, self.dim - self.head_dim))
        y = _blockwise_fwht(x * self.signs(x), self.blocks)
        if self._perm is not None:
            y = _blockwise_fwht(y[..., self._perm.to(y.device)] * self._signs2.to(y), self.blocks)
        return y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., head_dim]; exact inverse of forward (H is symmetric)."""
        if self._perm is not None:
            y = (_blockwise_fwht(y, self.blocks) * self._signs2.to(y))[..., self._inv_perm.to(y.device)]
        x = _blockwise_fwht(y, self.blocks) * self.signs(y)
        return x[..., : self.head_dim]

    @property
    def permutation(self) -> torch.Tensor | None:
        """The seeded permutation between the two passes (None for power-of-two dims)."""
        return self._perm
