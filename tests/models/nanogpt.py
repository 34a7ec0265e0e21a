"""A nanoGPT-style decoder: manual attention (q @ k^T * scale, masked_fill from a tril
buffer, softmax, @ v), learned positions, and a cat cache passed in and returned as
`past` (one (k, v) pair per layer, [B, H, T, d])."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab: int = 89
    dim: int = 128
    layers: int = 2
    heads: int = 4
    block: int = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(cfg.block, cfg.block)).view(1, 1, cfg.block, cfg.block))

    def forward(self, x, past):
        B, T, C = x.shape
        h = self.cfg.heads
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, h, C // h).transpose(1, 2)
        k = k.view(B, T, h, C // h).transpose(1, 2)
        v = v.view(B, T, h, C // h).transpose(1, 2)
        pk, pv = past
        k = torch.cat((pk, k), dim=2)
        v = torch.cat((pv, v), dim=2)
        P = pk.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, P:P + T, :P + T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x, past):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class NanoGPT(nn.Module):
    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.block, cfg.dim)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def empty_past(self, batch: int):
        d = self.cfg.dim // self.cfg.heads
        z = torch.zeros(batch, self.cfg.heads, 0, d, dtype=self.wte.weight.dtype, device=self.wte.weight.device)
        return [(z.clone(), z.clone()) for _ in self.h]

    def forward(self, idx, past):
        T = idx.shape[1]
        start = past[0][0].size(2)
        x = self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device))
        presents = []
        for block, p in zip(self.h, past):
            x, present = block(x, p)
            presents.append(present)
        return self.lm_head(self.ln_f(x)), presents


@torch.no_grad()
def generate(model, prompt, steps: int, step_fn=None, forced=None):
    """Greedy decoding with the cat cache; returns (tokens [B, steps], logits [steps, B, V]);
    `forced` [B, steps] feeds those tokens instead of the argmax (teacher forcing)."""
    step_fn = model if step_fn is None else step_fn
    logits, past = step_fn(prompt, model.empty_past(prompt.shape[0]))
    logits = logits[:, -1]
    toks, all_logits = [], []
    for i in range(steps):
        all_logits.append(logits)
        nxt = logits.argmax(-1, keepdim=True) if forced is None else forced[:, i:i + 1]
        toks.append(nxt)
        logits, past = step_fn(nxt, past)
        logits = logits[:, -1]
    return torch.cat(toks, 1), torch.stack(all_logits)
