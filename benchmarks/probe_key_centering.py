"""Would subtracting each KV head's mean key before encoding help the key codec? A measurement,
not a feature: sphkv does not center keys.

Softmax is shift-invariant per query, so q·k = q·(k - μ) + q·μ where q·μ is one constant per
query and head: coding the centered key k - μ costs no bytes beyond μ (d floats per layer and KV
head) and, in the kernels, one per-query offset on the exact tier's logits. On real SmolLM2-135M
keys the mean over tokens carries half or more of ‖k‖² (RoPE leaves the slow dimensions' mean in
place), which the spherical codec otherwise spends angle bits on.

For every third layer: real post-RoPE q/k/v of the embedded model over a `--tokens` prompt; the
keys coded at each bit rate (the values left exact, so only the key codec shows), the first 4
tokens (sinks) and the last 64 (recent window) exact as in the default cache, μ the mean of the
first half's non-sink keys (what a prefill would see). Reported per bit rate: the median over
layers of the attention output's relative error (last 256 queries, causal) and of the mean
absolute logit error, plain and centered.

    python benchmarks/probe_key_centering.py [--tokens 2048] [--bits 2 3.5 4.5 6]
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from sphkv_compile.codec import SphericalCodec
from sphkv_compile.smollm2 import capture_qkv

SINKS, RECENT, QUERIES = 4, 64, 256


def attention(q, k, v, queries=QUERIES):
    """Causal attention of the last `queries` queries (float64), and their logits."""
    T, G = k.shape[1], q.shape[0] // k.shape[0]
    logits = q[:, -queries:] @ k.repeat_interleave(G, 0).transpose(-1, -2) / math.sqrt(k.shape[-1])
    visible = torch.arange(T - queries, T)[:, None] >= torch.arange(T)[None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, -1) @ v.repeat_interleave(G, 0), logits


def coded_keys(codec, k, mean):
    """k as the cache would hold it: coded (after subtracting `mean`), sinks and recent exact."""
    out = codec.decode(codec.encode((k - mean).float())).double() + mean
    out[:, :SINKS], out[:, -RECENT:] = k[:, :SINKS], k[:, -RECENT:]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.5, 4.5, 6.0])
    args = ap.parse_args()
    cap = capture_qkv(args.tokens, layers=range(0, 30, 3))
    d = cap.keys[cap.layers[0]].shape[-1]
    shares = []
    print(f"SmolLM2-135M, {args.tokens} tokens, layers {list(cap.layers)}; keys coded, values exact")
    print("| key bits | output rel. error, plain | centered | ratio | mean abs. logit error, plain | centered | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        codec = SphericalCodec(d, bits=bits, seed=0)
        out_plain, out_centered, logit_plain, logit_centered = [], [], [], []
        for layer in cap.layers:
            q, k, v = (t.double() for t in (cap.queries[layer], cap.keys[layer], cap.values[layer]))
            mean = k[:, SINKS:args.tokens // 2].mean(1, keepdim=True)
            shares.append((mean.norm(dim=-1) ** 2 / (k[:, SINKS:] ** 2).sum(-1).mean(1, keepdim=True)).mean().item())
            ref, ref_logits = attention(q, k, v)
            seen = torch.isfinite(ref_logits)
            for centered, outs, logits in ((False, out_plain, logit_plain), (True, out_centered, logit_centered)):
                out, lg = attention(q, coded_keys(codec, k, mean if centered else torch.zeros_like(mean)), v)
                outs.append(((out - ref).norm() / ref.norm()).item())
                logits.append((lg - ref_logits)[seen].abs().mean().item())
        a, b = statistics.median(out_plain), statistics.median(out_centered)
        c, e = statistics.median(logit_plain), statistics.median(logit_centered)
        print(f"| {bits:g} | {a:.4f} | {b:.4f} | {b / a:.2f} | {c:.4f} | {e:.4f} | {e / c:.2f} |")
    print(f"the mean key's share of ||k||^2 (non-sink tokens), median over layers and heads' means: "
          f"{statistics.median(shares):.2f} (range {min(shares):.2f}-{max(shares):.2f})")


if __name__ == "__main__":
    main()
