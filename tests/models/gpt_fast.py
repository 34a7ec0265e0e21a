"""A gpt-fast-style decoder: RoPE, GQA via repeat_interleave (Config.gqa="repeat", as gpt-fast)
or SDPA's enable_gqa (gqa="sdpa"), SDPA with a boolean causal mask row per position, and a static KV buffer per layer written at `input_pos` the way
gpt-fast does, `k_out[:, :, input_pos] = k_val` (an index_put_), or with index_copy_ (the
StaticCache spelling)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab: int = 97
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_seq: int = 128
    rope_base: float = 10000.0
    gqa: str = "repeat"  # "repeat": repeat_interleave the KV heads (gpt-fast); "sdpa": enable_gqa=True

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class KVCache(nn.Module):
    """write: "index_put" (gpt-fast), "index_copy" (transformers' StaticCache), or "cache_pos"
    (torchtune's KVCache: its own position buffer, written at cache_pos[:n] and then advanced in
    place; reset() zeroes the buffers and rewinds it)."""

    def __init__(self, batch, kv_heads, max_seq, head_dim, dtype, write="index_put", device=None):
        super().__init__()
        self.write = write
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device))
        if write == "cache_pos":
            self.register_buffer("cache_pos", torch.arange(max_seq, device=device), persistent=False)

    def reset(self):
        self.k_cache.zero_()
        self.v_cache.zero_()
        if self.write == "cache_pos":
            self.cache_pos -= int(self.cache_pos[0])

    def update(self, input_pos, k, v):
        k_out, v_out = self.k_cache, self.v_cache
        if self.write == "cache_pos":
            n = k.shape[2]
            k_out[:, :, self.cache_pos[:n]] = k
            v_out[:, :, self.cache_pos[:n]] = v
            self.cache_pos.add_(n)
        elif self.write == "index_copy":
            k_out.index_copy_(2, input_pos, k)
            v_out.index_copy_(2, input_pos, v)
        else:
            k_out[:, :, input_pos] = k
            v_out[:, :, input_pos] = v
        return k_out, v_out


def rope(x, pos, base):
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    ang = pos.float()[:, None] * inv[None]  # [T, d/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, mask, input_pos):
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], -1)
        q = rope(q.view(B, T, c.heads, c.head_dim).transpose(1, 2), input_pos, c.rope_base)
        k = rope(k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2), input_pos, c.rope_base)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)
        if c.gqa == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, enable_gqa=True)
        else:
            rep = c.heads // c.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, c.dim))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim, bias=False), nn.SiLU(),
                                 nn.Linear(4 * cfg.dim, cfg.dim, bias=False))

    def forward(self, x, mask, input_pos):
        x = x + self.attn(self.norm1(x), mask, input_pos)
        return x + self.mlp(self.norm2(x))


class GPTFast(nn.Module):
    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(cfg.max_seq, cfg.max_seq, dtype=torch.bool)))

    def setup_caches(self, batch: int, dtype=torch.float32, write="index_put"):
        device = self.embed.weight.device
        for b in self.blocks:
            b.attn.kv_cache = KVCache(batch, self.cfg.kv_heads, self.cfg.max_seq, self.cfg.head_dim, dtype, write,
                                      device)

    def forward(self, idx, input_pos):
        mask = self.causal_mask[None, None, input_pos]
        x = self.embed(idx)
        for b in self.blocks:
            x = b(x, mask, input_pos)
        return self.head(self.norm(x))


@torch.no_grad()
def generate(model, prompt, steps: int, step_fn=None, forced=None, prefill_chunk=None):
    """Greedy decoding: prefill the prompt (in chunks of `prefill_chunk` tokens if given), then
    `steps` one-token steps. Returns (tokens [B, steps], logits of every step [steps, B, vocab]).
    `forced` [B, steps] feeds those tokens instead of the argmax (teacher forcing), so two runs
    see the same inputs."""
    step_fn = model if step_fn is None else step_fn
    B, T = prompt.shape
    chunk = prefill_chunk or T
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        logits = step_fn(prompt[:, start:end], torch.arange(start, end, device=prompt.device))[:, -1]
    toks, all_logits = [], []
    for i in range(steps):
        all_logits.append(logits)
        nxt = logits.argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
        toks.append(nxt)
        logits = step_fn(nxt, torch.tensor([T + i], device=prompt.device))[:, -1]
    return torch.cat(toks, 1), torch.stack(all_logits)
