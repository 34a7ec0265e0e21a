"""SphericalCodec: a key as one radius plus d-1 quantized angles (ADA, SPEC §2).

encode:  y = H·D·k/… (block Hadamard) -> recursive polar transform -> per-level Lloyd-Max
         codes -> split-width packing with a log-domain radius.
logits:  per query, a level-1 table LUT_p[c] = q'_2p cos(theta_c) + q'_2p+1 sin(theta_c);
         per key, the pair radii r·w_p from the angular recurrence over the upper-level
         codes (top-down products of cos/sin); logit = sum_p (r·w_p) · LUT_p[c_p].
         No dense key is ever formed.
decode:  for tests and debugging only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .bit_allocation import allocate_bits, predicted_direction_mse
from .codebooks import angle_codebook, circle_codebook
from .packing import RecordLayout
from .polar_tree import build_tree
from .precondition import BlockHadamard
from .radius import decode_radius, encode_radius, unit_and_log2_norm

# Keeps the [Tq, Tk_chunk, P] gather of the logits table under this many elements.
_LOGIT_CHUNK_ELEMS = 1 << 23


@dataclass
class Codes:
    """Packed records: int32 words [..., T, words] produced by one codec."""

    words: torch.Tensor
    codec: "SphericalCodec"

    @property
    def shape(self):
        return self.words.shape[:-1]


def _float_work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_head_dim(x: torch.Tensor, head_dim: int, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor, got {x.dtype}")
    if x.shape[-1] != head_dim:
        raise ValueError(f"{what} has last dim {x.shape[-1]}, but the codec was built for head_dim={head_dim}")


class SphericalCodec:
    """Radius + angle codes for vectors of size head_dim.

    bits: a float target of stored bits per coordinate (radius, codes and word padding all
    counted; allocated across levels by rate-distortion), an int number of bits for every
    angle, or a tuple of bits per slot (level 1, then each node group of the tree).
    """

    def __init__(self, head_dim: int, bits=3.0, seed: int = 0, radius_bits: int = 16):
        self.head_dim = int(head_dim)
        self.seed = int(seed)
        self.radius_bits = int(radius_bits)
        self.hadamard = BlockHadamard(self.head_dim, self.seed)
        self.tree = build_tree(self.head_dim)
        self.level_bits = self._resolve_bits(bits)
        self.layout = RecordLayout(((1, self.radius_bits), (self.tree.pairs, self.level_bits[0]))
                                   + tuple((g.count, b) for g, b in zip(self.tree.groups, self.level_bits[1:])))

    def _resolve_bits(self, bits) -> tuple[int, ...]:
        slots = 1 + len(self.tree.groups)
        if isinstance(bits, (bool, str)) or not isinstance(bits, (int, float, tuple, list)):
            raise TypeError(f"bits must be a float (bits per coordinate), an int (bits per angle) or a tuple "
                            f"of ints per level, got {bits!r}")
        if isinstance(bits, int):
            if not 0 <= bits <= 16:
                raise ValueError(f"bits per angle must be in [0, 16], got {bits}")
            return (bits,) * slots
        if isinstance(bits, float):
            # Spend whole 32-bit words: the record is padded to words anyway.
            words = math.floor(bits * self.head_dim / 32 + 1e-9)
            budget = 32 * words - self.radius_bits
            if budget < self.tree.pairs:
                raise ValueError(f"{bits} bits per coordinate leaves {budget} bits for {self.tree.num_angles} "
                                 f"angles of head_dim={self.head_dim}; use at least "
                                 f"{(self.radius_bits + self.tree.pairs) / self.head_dim:.2f}")
            return allocate_bits(self.tree, budget)
        bits = tuple(int(b) for b in bits)
        if len(bits) != slots:
            raise ValueError(f"head_dim={self.head_dim} has {slots} angle slots "
                             f"(level 1 + {[g.key for g in self.tree.groups]}), got {len(bits)} bits entries")
        if any(not 0 <= b <= 16 for b in bits):
            raise ValueError(f"bits per angle must be in [0, 16], got {bits}")
        return bits

    # ---- sizes -------------------------------------------------------------------------
    @property
    def words(self) -> int:
        return self.layout.words

    @property
    def bits_per_element(self) -> float:
        """Everything stored per token per head (radius, codes, padding), per coordinate."""
        return 32 * self.layout.words / self.head_dim

    @property
    def predicted_direction_mse(self) -> float:
        return predicted_direction_mse(self.tree, self.level_bits)

    def __repr__(self) -> str:
        return (f"SphericalCodec(head_dim={self.head_dim}, level_bits={self.level_bits}, "
                f"radius_bits={self.radius_bits}, bits_per_element={self.bits_per_element:.3f})")

    # ---- codebook tables (cached per device and dtype) ------------------------------------
    @cached_property
    def _tables64(self):
        """Per slot: (centroids, thresholds) as float64 CPU tensors."""
        books = [circle_codebook(self.level_bits[0])]
        books += [angle_codebook(g.left_size, g.right_size, b) for g, b in zip(self.tree.groups, self.level_bits[1:])]
        return [(torch.from_numpy(b.centroids.copy()), torch.from_numpy(b.thresholds.copy())) for b in books]

    def tables(self, device, dtype):
        cache = self.__dict__.setdefault("_table_cache", {})
        key = (torch.device(device), dtype)
        if key not in cache:
            cache[key] = [(c.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)) for c, t in self._tables64]
        return cache[key]

    # ---- encode ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Codes:
        """x [..., head_dim] (any float dtype) -> Codes with words [..., self.words]."""
        check_head_dim(x, self.head_dim, "input")
        work = _float_work_dtype(x)
        y = self.hadamard.forward(x.to(work))
        return Codes(self.encode_rotated(y), self)

    def encode_rotated(self, y: torch.Tensor) -> torch.Tensor:
        """Already-preconditioned y [..., dim] -> int32 words."""
        work = y.dtype
        tabs = self.tables(y.device, work)
        y, log2_r = unit_and_log2_norm(y)  # angles only need the direction
        pairs = y.reshape(*y.shape[:-1], self.tree.pairs, 2)
        theta = torch.atan2(pairs[..., 1], pairs[..., 0]) % (2 * math.pi)
        nodes = [torch.hypot(pairs[..., 0], pairs[..., 1])]
        node_r = torch.cat(nodes + [torch.zeros(*y.shape[:-1], self.tree.num_nodes - self.tree.pairs,
                                                dtype=work, device=y.device)], dim=-1)
        codes = [encode_radius(log2_r, self.radius_bits).unsqueeze(-1)]
        levels1 = 1 << self.level_bits[0]
        codes.append((theta * (levels1 / (2 * math.pi))).floor().to(torch.int64).clamp(0, levels1 - 1))
        for g, (_, thr) in zip(self.tree.groups, tabs[1:]):
            left = node_r[..., list(g.left)]
            right = node_r[..., list(g.right)]
            node_r[..., list(g.out)] = torch.hypot(left, right)
            psi = torch.atan2(right, left)
            codes.append(torch.searchsorted(thr, psi.contiguous()))
        return self.layout.pack(codes)

    # ---- shared decode pieces --------------------------------------------------------------
    def _unpack(self, words: torch.Tensor, dtype):
        fields = self.layout.unpack(words)
        radius = decode_radius(fields[0].squeeze(-1), self.radius_bits, dtype)
        return radius, fields[1:]

    def _group_index(self, device):
        """Per group: (left, right, out) node-index tensors, cached per device."""
        cache = self.__dict__.setdefault("_group_index_cache", {})
        key = torch.device(device)
        if key not in cache:
            cache[key] = [tuple(torch.tensor(ix, dtype=torch.int64, device=device) for ix in (g.left, g.right, g.out))
                          for g in self.tree.groups]
        return cache[key]

    def pair_radii(self, words: torch.Tensor, dtype=torch.float32):
        """The angular recurrence: r·w_p for every level-1 pair, top-down over the upper-level
        codes, plus the level-1 codes. Returns ([..., P] radii, [..., P] int64 codes)."""
        radius, codes = self._unpack(words, dtype)
        tabs = self.tables(words.device, dtype)
        # node-major [nodes, ...]: each node's values over all tokens are one contiguous row, so
        # the recurrence's gathers and scatters move whole rows (node-last, they moved single
        # elements at a stride: 3x slower on the CPU)
        node_r = torch.zeros(self.tree.num_nodes, *radius.shape, dtype=dtype, device=words.device)
        node_r[self.tree.root] = radius
        cos_sin = self.__dict__.setdefault("_cos_sin_cache", {})
        for i, (idx, code) in reversed(list(enumerate(zip(self._group_index(words.device), codes[1:])))):
            key = (torch.device(words.device), dtype, i)
            if key not in cos_sin:  # cos/sin of each centroid: a table lookup per code, no trig per token
                cent = tabs[i + 1][0]
                cos_sin[key] = (torch.cos(cent), torch.sin(cent))
            cos_t, sin_t = cos_sin[key]
            left, right, out = idx
            code = code.movedim(-1, 0)
            parent = node_r.index_select(0, out)
            node_r.index_copy_(0, left, parent * cos_t[code])
            node_r.index_copy_(0, right, parent * sin_t[code])
        return node_r[: self.tree.pairs].movedim(0, -1), codes[0]

    def norm2(self, words: torch.Tensor) -> torch.Tensor:
        """‖decoded vector‖² (a key's or a value's) float32 [...] from the radius field alone: the
        polar decode scales a unit direction (a product of cos/sin down every path), so its norm
        is the radius."""
        return decode_radius(self.layout.unpack_field(words, 0).squeeze(-1), self.radius_bits).pow(2)

    def decode_rotated(self, words: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        rho, c1 = self.pair_radii(words, dtype)
        theta = self.tables(words.device, dtype)[0][0][c1]
        y = torch.stack((rho * torch.cos(theta), rho * torch.sin(theta)), dim=-1)
        return y.reshape(*rho.shape[:-1], self.tree.dim)

    def decode(self, codes: Codes | torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Dense reconstruction [..., head_dim]. For tests and debugging only."""
        words = codes.words if isinstance(codes, Codes) else codes
        return self.hadamard.inverse(self.decode_rotated(words, dtype))

    # ---- logits from codes ---------------------------------------------------------------
    def level1_table(self, q: torch.Tensor) -> torch.Tensor:
        """LUT [..., Tq, P, 2^b1] = q'_2p cos(theta_c) + q'_2p+1 sin(theta_c)."""
        work = _float_work_dtype(q)
        qr = self.hadamard.forward(q.to(work)).reshape(*q.shape[:-1], self.tree.pairs, 2)
        theta = self.tables(q.device, work)[0][0]
        return qr[..., 0:1] * torch.cos(theta) + qr[..., 1:2] * torch.sin(theta)

    def logits_from_table(self, table: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """table [..., Tq, P, L] (from level1_table), words [..., Tk, W] -> [..., Tq, Tk]."""
        rho, c1 = self.pair_radii(words, table.dtype)
        lead = torch.broadcast_shapes(table.shape[:-3], rho.shape[:-2])
        tq, p, levels = table.shape[-3:]
        tk = rho.shape[-2]
        table = table.expand(*lead, tq, p, levels)
        rho = rho.expand(*lead, tk, p)
        c1 = c1.expand(*lead, tk, p)
        batch = max(1, math.prod(lead))
        chunk = max(1, _LOGIT_CHUNK_ELEMS // max(1, batch * tq * p))
        outs = []
        for s in range(0, tk, chunk):
            idx = c1[..., s:s + chunk, :]
            n = idx.shape[-2]
            picked = torch.gather(table.unsqueeze(-3).expand(*lead, tq, n, p, levels), -1,
                                  idx.unsqueeze(-3).expand(*lead, tq, n, p).unsqueeze(-1)).squeeze(-1)
            outs.append((picked * rho[..., s:s + chunk, :].unsqueeze(-3)).sum(-1))
        if not outs:
            return table.new_zeros(*lead, tq, 0)
        return torch.cat(outs, dim=-1)

    def logits(self, q: torch.Tensor, codes: Codes | torch.Tensor) -> torch.Tensor:
        """q [..., Tq, head_dim], codes [..., Tk] -> unscaled q·k logits [..., Tq, Tk]."""
        check_head_dim(q, self.head_dim, "query")
        words = codes.words if isinstance(codes, Codes) else codes
        return self.logits_from_table(self.level1_table(q), words)
