"""A decoder in the style of Meta's Llama reference code: per layer a static cache laid out
[B, T, H, d], written by slice assignment at a Python-int start position,
`cache_k[:bsz, start:start + T] = k`, and read back as the prefix `cache_k[:bsz, :start + T]`;
GQA by expand + reshape; softmax written out by hand, with an additive causal mask at prefill
and no mask at decode. `read="window"` reads only the last `window` positions instead (a
pattern the store cannot follow: it must stay dense).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, max_seq, batch, read="prefix", window=4):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.read, self.window = read, window
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.register_buffer("cache_k", torch.zeros(batch, max_seq, kv_heads, self.head_dim))
        self.register_buffer("cache_v", torch.zeros(batch, max_seq, kv_heads, self.head_dim))

    def _repeat(self, x):
        B, T, H, d = x.shape
        rep = self.heads // H
        return x[:, :, :, None, :].expand(B, T, H, rep, d).reshape(B, T, H * rep, d)

    def forward(self, x, start: int, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.head_dim)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim)
        self.cache_k[:B, start:start + T] = k
        self.cache_v[:B, start:start + T] = v
        first = 0 if self.read == "prefix" else max(0, start + T - self.window)
        keys = self._repeat(self.cache_k[:B, first:start + T])
        values = self._repeat(self.cache_v[:B, first:start + T])
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = q @ keys.transpose(2, 3) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask[:, -scores.shape[-1]:]
        out = torch.softmax(scores.float(), dim=-1).type_as(q) @ values
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class LlamaReference(nn.Module):
    def __init__(self, vocab=97, dim=128, heads=4, kv_heads=2, layers=2, max_seq=64, batch=1, read="prefix"):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, heads, kv_heads, max_seq, batch, read) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, start: int):
        B, T = tokens.shape
        h = self.embed(tokens)
        mask = None
        if T > 1:  # causal over the chunk, every earlier position visible
            dev = tokens.device
            mask = torch.hstack([torch.zeros(T, start, device=dev), torch.full((T, T), float("-inf"), device=dev).triu(1)])
        for layer in self.layers:
            h = h + layer(h, start, mask)
        return self.head(h)


@torch.no_grad()
def generate(step, prompt, steps: int, forced=None):
    """Greedy decoding from position 0; returns (tokens [B, steps], logits [steps, B, vocab])."""
    logits = step(prompt, 0)[:, -1]
    toks, all_logits = [], []
    for i in range(steps):
        all_logits.append(logits)
        nxt = logits.argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
        toks.append(nxt)
        logits = step(nxt, prompt.shape[1] + i)[:, -1]
    return torch.cat(toks, 1), torch.stack(all_logits)
