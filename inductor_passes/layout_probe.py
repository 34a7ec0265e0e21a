"""Prove that a chain of layout ops hands attention the cache in the order it assumes.

The rewrite reads keys/values from the store as [B, Hkv, T, d] and lets query head h use KV
head h // G. Instead of matching every spelling of repeat_kv, expand, repeat_interleave,
transposes and bmm flattening, we run the chain on a probe tensor whose entries are their
own indices and compare with the arrangement the rewrite assumes. Equal means equivalent
for every input, because layout ops move elements by position only.
"""
from __future__ import annotations

import torch
from torch import fx

from .graph_ops import concrete, kind

PROBE_DTYPE = torch.float64  # indices stay exact up to 2**53 elements


class NotALayoutChain(Exception):
    pass


def _concrete_arg(a, prev: fx.Node, value):
    if isinstance(a, fx.Node):
        if a is prev:
            return value
        c = concrete(a)
        if c is None:
            raise NotALayoutChain(f"argument {a.name} of the chain is not a size")
        return c
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete_arg(x, prev, value) for x in a)
    if isinstance(a, slice):
        return slice(*(_concrete_arg(x, prev, value) for x in (a.start, a.stop, a.step)))
    return a


def run_chain(chain: list[fx.Node], start: fx.Node, value: torch.Tensor) -> torch.Tensor:
    """Apply the layout nodes `chain` (each consuming the previous one) to `value`."""
    prev = start
    for node in chain:
        k = kind(node)
        if k == "cast":
            prev = node
            continue  # casts keep positions; the probe must stay exact
        args = _concrete_arg(node.args, prev, value)
        kwargs = _concrete_arg(dict(node.kwargs), prev, value)
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:
            raise NotALayoutChain(f"{node.op} {node.target}")
        prev = node
    return value


def probe(shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=PROBE_DTYPE).reshape(shape)


def canonical(cache_value: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """A cache laid out [B, T, H, d] or [B, H, T, d] -> [B, H, T, d]."""
    return cache_value.transpose(1, 2) if seq_dim == 1 else cache_value


def grouped_heads(chain_out: torch.Tensor, canon: torch.Tensor, transposed: bool) -> int | None:
    """If chain_out is canon with each KV head repeated G times in a row (query head h ->
    KV head h // G), in 4-D or batch*heads-flattened 3-D form, return G; else None."""
    B, Hkv, T, d = canon.shape
    if chain_out.numel() % canon.numel():
        return None
    G = chain_out.numel() // canon.numel()
    expected = canon.repeat_interleave(G, dim=1)
    if transposed:
        expected = expected.transpose(-1, -2)
    if chain_out.dim() == 3:
        expected = expected.reshape(B * Hkv * G, *expected.shape[2:])
    elif chain_out.dim() != 4:
        return None
    if tuple(expected.shape) != tuple(chain_out.shape) or not torch.equal(expected, chain_out):
        return None
    return G
