"""One attention layer with its own KV cache, built from a point of the detection space.

The fuzz test (tests/test_fuzz_pass.py) and the fallback tests build these; each call
takes the new chunk's q, k, v directly (no projections), so the attention and the cache
update are all there is in the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Spec:
    attn: str = "manual"  # "manual" (matmul), "bmm" (flattened heads), "sdpa"
    layout: str = "BHTd"  # cache layout: "BHTd" or "BTHd"
    scale: str = "mul"  # "mul", "div", "sdpa_default"
    mask: str = "masked_fill"  # "additive", "masked_fill", "where", "bool", "none" (decode only), "is_causal"
    softmax: str = "plain"  # "plain", "fp32_cast", "dtype_kwarg"
    heads: int = 4
    kv_heads: int = 2
    gqa: str = "repeat_kv"  # "repeat_kv" (expand + reshape), "repeat_interleave", "enable_gqa" (sdpa)
    cache: str = "cat"  # "cat", "index_copy", "slice_assign"
    head_dim: int = 32
    max_seq: int = 32
    batch: int = 1
    # variants that must stay dense
    extra: str = ""  # "", "alibi", "softcap", "dropout", "window", "square_scores"


class Attention(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        s = spec
        shape = (s.batch, s.max_seq, s.kv_heads, s.head_dim) if s.layout == "BTHd" else \
            (s.batch, s.kv_heads, s.max_seq, s.head_dim)
        if s.cache != "cat":
            self.register_buffer("k_cache", torch.zeros(shape))
            self.register_buffer("v_cache", torch.zeros(shape))
        self.register_buffer("tril", torch.tril(torch.ones(s.max_seq, s.max_seq, dtype=torch.bool)))
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / s.heads) for h in range(s.heads)])
        self.register_buffer("slopes", slopes)

    # ---- cache ------------------------------------------------------------------------------
    def _update(self, k, v, past, pos):
        """k, v in cache layout; returns the whole cache (cache layout) and the new past."""
        s = self.spec
        seq = 1 if s.layout == "BTHd" else 2
        if s.cache == "cat":
            pk, pv = past
            k, v = torch.cat([pk, k], dim=seq), torch.cat([pv, v], dim=seq)
            return k, v, (k, v)
        if s.cache == "index_copy":
            self.k_cache.index_copy_(seq, pos, k)
            self.v_cache.index_copy_(seq, pos, v)
        elif seq == 2:
            self.k_cache[:, :, pos] = k
            self.v_cache[:, :, pos] = v
        else:
            self.k_cache[:, pos] = k
            self.v_cache[:, pos] = v
        return self.k_cache, self.v_cache, None

    def _repeat(self, x):
        s = self.spec
        g = s.heads // s.kv_heads
        if g == 1 or s.gqa == "enable_gqa":
            return x
        if s.gqa == "repeat_interleave":
            return x.repeat_interleave(g, dim=1)
        B, H, T, d = x.shape
        return x[:, :, None, :, :].expand(B, H, g, T, d).reshape(B, H * g, T, d)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, q, k, v, pos, key_valid, past=None):
        """q [B, Hq, N, d]; k, v in cache layout with N new tokens; pos [N] their positions;
        key_valid [B, Tk] bool (False: padding) over every column the attention sees."""
        s = self.spec
        k_all, v_all, present = self._update(k, v, past, pos)
        if s.layout == "BTHd":
            k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
        k_all, v_all = self._repeat(k_all), self._repeat(v_all)
        N, Tk = q.shape[2], k_all.shape[2]
        qpos = pos[:, None] if s.cache != "cat" else torch.arange(Tk - N, Tk)[:, None]
        cols = torch.arange(Tk)[None, :]
        allowed = (cols <= qpos)[None, None] & key_valid[:, None, None, :]  # [B, 1, N, Tk]
        if s.extra == "window":
            allowed = allowed & (cols > qpos - 3)[None, None]
        if s.attn == "sdpa":
            return self._sdpa(q, k_all, v_all, allowed, qpos, cols), present
        return self._manual(q, k_all, v_all, allowed, qpos, cols), present

    def _sdpa(self, q, k, v, allowed, qpos, cols):
        s = self.spec
        kw = {"enable_gqa": True} if s.gqa == "enable_gqa" and s.heads != s.kv_heads else {}
        if s.scale != "sdpa_default":
            kw["scale"] = 1.0 / math.sqrt(s.head_dim)
        if s.extra == "dropout":
            kw["dropout_p"] = 0.5
        if s.mask == "is_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        if s.mask == "none":
            return F.scaled_dot_product_attention(q, k, v, **kw)
        if s.mask == "bool" and s.extra != "alibi":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kw)
        add = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
        if s.extra == "alibi":
            add = add + self.slopes[None, :, None, None] * (cols - qpos)[None, None].to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=add, **kw)

    def _manual(self, q, k, v, allowed, qpos, cols):
        s = self.spec
        B, H, N, d = q.shape
        if s.attn == "bmm":
            Tk = k.shape[2]
            scores = torch.bmm(q.reshape(B * H, N, d), k.reshape(B * H, Tk, d).transpose(1, 2)).view(B, H, N, Tk)
        else:
            scores = torch.matmul(q, k.transpose(2, 3))
        scores = scores * (1.0 / math.sqrt(d)) if s.scale == "mul" else scores / math.sqrt(d)
        if s.extra == "softcap":
            scores = torch.tanh(scores / 5.0) * 5.0
        if s.extra == "square_scores":
            scores = scores * scores
        if s.extra == "alibi":
            scores = scores + self.slopes[None, :, None, None] * (cols - qpos)[None, None].to(q.dtype)
        if s.mask == "additive":
            scores = scores + torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
        elif s.mask == "masked_fill":
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif s.mask == "where":
            scores = torch.where(allowed, scores, torch.finfo(q.dtype).min)
        if s.softmax == "fp32_cast":
            p = F.softmax(scores.float(), dim=-1).to(q.dtype)
        elif s.softmax == "dtype_kwarg":
            p = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(q)
        else:
            p = scores.softmax(-1)
        if s.extra == "dropout":
            p = F.dropout(p, 0.5, training=True)
        if s.attn == "bmm":
            return torch.bmm(p.reshape(B * H, N, -1), v.reshape(B * H, v.shape[2], d)).view(B, H, N, d)
        return p @ v


def chunk(spec: Spec, n: int, gen: torch.Generator):
    """Random q [B, Hq, n, d] and k, v [.., n, ..] in cache layout."""
    s = spec
    q = torch.randn(s.batch, s.heads, n, s.head_dim, generator=gen)
    kv_shape = (s.batch, n, s.kv_heads, s.head_dim) if s.layout == "BTHd" else (s.batch, s.kv_heads, n, s.head_dim)
    return q, torch.randn(kv_shape, generator=gen), torch.randn(kv_shape, generator=gen)


def empty_past(spec: Spec):
    s = spec
    shape = (s.batch, 0, s.kv_heads, s.head_dim) if s.layout == "BTHd" else (s.batch, s.kv_heads, 0, s.head_dim)
    return torch.zeros(shape), torch.zeros(shape)


def run(module, step, spec: Spec, lengths, pad: int, seed: int):
    """Prefill lengths[0] tokens then each later length; batch row 0 is left-padded by `pad`.
    Returns [(output, real-query mask [B, N], q, k, v)] per call. `step` is module or its compiled form."""
    gen = torch.Generator().manual_seed(seed)
    past = empty_past(spec) if spec.cache == "cat" else None
    outs, start = [], 0
    for n in lengths:
        q, k, v = chunk(spec, n, gen)
        pos = torch.arange(start, start + n)
        tk = start + n if spec.cache == "cat" else spec.max_seq
        key_valid = torch.ones(spec.batch, tk, dtype=torch.bool)
        key_valid[0, :pad] = False
        out, past = step(q, k, v, pos, key_valid, past)
        real = key_valid[:, start:start + n]
        outs.append((out, real, q, k, v))
        start += n
    return outs
