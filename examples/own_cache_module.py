"""A module with its own KV cache, compiled with `backend="sphkv"`: what the backend rewrites,
what it reports, and how far its logits are from the dense module's.

    python examples/own_cache_module.py                 # CPU or the GPU when present
    python examples/own_cache_module.py --bits 12       # near-lossless codes

The decoder below keeps a static K/V buffer per layer and writes each step's keys and values
at their positions with `index_copy_` (transformers' StaticCache spelling), then calls SDPA
with a boolean causal mask. Nothing in it knows about sphkv. After `torch.compile(model,
backend="sphkv")`, every attention site reads a compressed store instead of the buffers, which
hold no memory after the first call; `sphkv_compile.report()` lists each site and why any stayed
dense. Run a prompt, then a few decode steps, next to an uncompiled copy of the same model.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import sphkv_compile


class CachedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int, batch: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        shape = (batch, kv_heads, max_len, self.head_dim)
        self.register_buffer("keys", torch.zeros(shape), persistent=False)
        self.register_buffer("values", torch.zeros(shape), persistent=False)

    def forward(self, x, positions, mask):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.keys.index_copy_(2, positions, k)
        self.values.index_copy_(2, positions, v)
        y = F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=mask, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=512, dim=256, layers=4, heads=8, kv_heads=2, max_len=1024, batch=1):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.attn = nn.ModuleList(CachedAttention(dim, heads, kv_heads, max_len, batch) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                 for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, tokens, positions):
        x = self.embed(tokens) + self.pos(positions)
        mask = self.causal[positions][None, None]  # each query sees the positions up to its own
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x, positions, mask)
            x = x + mlp(x)
        return self.head(x)


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--prompt", type=int, default=600)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    dense = TinyDecoder(max_len=args.prompt + args.steps).eval().to(device)
    model = copy.deepcopy(dense)
    compiled = torch.compile(model, backend="sphkv", options={"bits": args.bits})

    prompt = torch.randint(0, 512, (1, args.prompt), device=device)
    positions = torch.arange(args.prompt, device=device)
    want, got = dense(prompt, positions)[:, -1:], compiled(prompt, positions)[:, -1:]
    errors = []
    for step in range(args.steps):  # greedy on dense's tokens, so both see the same inputs
        errors.append(float((got - want).norm() / want.norm()))
        token = want.argmax(-1)
        position = torch.tensor([args.prompt + step], device=device)
        want, got = dense(token, position), compiled(token, position)

    report = sphkv_compile.report()
    dense_bytes = sum(b.numel() * b.element_size() for a in dense.attn for b in (a.keys, a.values))
    print(f"sites rewritten: {sum(s['rewritten'] for s in report['sites'])} of {len(report['sites'])}")
    for site in report["sites"]:
        if not site["rewritten"]:
            print(f"  dense: {site['details'].get('node')}: {site['reason']}")
    print(f"KV memory: {report['kv_bytes']:,} bytes in the compressed stores against {dense_bytes:,} in the "
          f"dense buffers ({report['kv_bytes'] / dense_bytes:.3f})")
    print(f"logits relative error against the dense module, over {args.steps} decode steps at {args.bits} bits: "
          f"median {sorted(errors)[len(errors) // 2]:.2e}, max {max(errors):.2e}")


if __name__ == "__main__":
    main()
