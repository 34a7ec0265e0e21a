"""The recursive polar tree over the rotated coordinates.

Leaves are coordinate pairs (level 1: a full-circle angle theta in [0, 2pi)). Every inner
node joins two subtrees holding `a` and `b` coordinates into one radius and an angle
psi = atan2(r_right, r_left) in [0, pi/2]. Nodes that join subtrees of the same sizes share
one angle distribution (density ∝ cos^(a-1) psi · sin^(b-1) psi for isotropic inputs), so
they form one *group* with one codebook and one bit width.

Inside each power-of-two block this is the classic level structure (a = b = 2^(l-1) at
level l). Blocks of different sizes (non-power-of-two head dims) are joined afterwards,
smallest first, by nodes with a != b.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .precondition import block_sizes, padded_dim


@dataclass(frozen=True)
class NodeGroup:
    """Nodes sharing one angle distribution. `left`/`right`/`out` index the node array."""

    left_size: int  # coordinates under the left child (a)
    right_size: int  # coordinates under the right child (b)
    left: tuple[int, ...]
    right: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.out)

    @property
    def key(self) -> tuple[int, int]:
        return (self.left_size, self.right_size)


@dataclass(frozen=True)
class PolarTree:
    """Node ids 0..P-1 are the level-1 pair radii; inner nodes follow; the last is the root."""

    dim: int  # padded rotated dimension
    pairs: int  # P = dim // 2, the level-1 angles
    groups: tuple[NodeGroup, ...]  # bottom-up order: children are computed before parents
    num_nodes: int

    @property
    def num_angles(self) -> int:
        return self.pairs + sum(g.count for g in self.groups)

    @property
    def root(self) -> int:
        return self.num_nodes - 1


@lru_cache(maxsize=None)
def build_tree(head_dim: int) -> PolarTree:
    dim = padded_dim(head_dim)
    pairs = dim // 2
    next_id = pairs
    # Per block: the list of current node ids (each covering `size` coordinates).
    blocks = []
    start = 0
    for size in block_sizes(head_dim):
        blocks.append((list(range(start // 2, (start + size) // 2)), 2))
        start += size
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    order: list[tuple[int, int]] = []

    def add(a: int, b: int, left: int, right: int) -> int:
        nonlocal next_id
        if (a, b) not in groups:
            groups[(a, b)] = []
            order.append((a, b))
        groups[(a, b)].append((left, right, next_id))
        next_id += 1
        return next_id - 1

    # In-block levels: all blocks advance together so equal-level nodes share a group.
    roots = []
    for ids, size in blocks:
        while len(ids) > 1:
            ids = [add(size, size, ids[i], ids[i + 1]) for i in range(0, len(ids), 2)]
            size *= 2
        roots.append((ids[0], size))
    # Cross-block joins, smallest blocks first, so subtrees stay as balanced as possible.
    roots.sort(key=lambda t: t[1])
    while len(roots) > 1:
        (small, s_size), (big, b_size) = roots[0], roots[1]
        joined = add(b_size, s_size, big, small)
        roots = sorted([(joined, s_size + b_size)] + roots[2:], key=lambda t: t[1])
    # Groups must be ordered bottom-up: sort by the subtree size they produce.
    order.sort(key=lambda k: (k[0] + k[1], k))
    built = tuple(
        NodeGroup(a, b, tuple(l for l, _, _ in groups[(a, b)]), tuple(r for _, r, _ in groups[(a, b)]),
                  tuple(o for _, _, o in groups[(a, b)]))
        for a, b in order
    )
    return PolarTree(dim=dim, pairs=pairs, groups=built, num_nodes=next_id)
