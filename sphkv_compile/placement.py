"""Where new tokens go: the exact tier keeps the attention sinks (the first `sink` tokens)
and the recent window (the last `recent` tokens); every other token graduates to a
compressed tier. This is the "uniform" policy (ADA at one configured tier, no RDR); the
retention policy (RDR) replaces the choice of tier per token and head.

Works in place on fixed-size tier states, so it runs inside the custom op as well as eagerly.
"""
from __future__ import annotations

import torch

from .store import TierState, append_records, encode_records, gather_tokens, rebuild, split_exact
from .tiers import TierSpec


def graduate(states: list[TierState], specs: list[TierSpec], k: torch.Tensor, v: torch.Tensor,
             valid: torch.Tensor | None, utility: torch.Tensor | None, *, seed: int, kv_dtype: torch.dtype,
             sink: int, recent: int, target: int, encode=encode_records) -> None:
    """Append the chunk k, v [B, Hkv, N, d] (valid [B, N]) as the newest tokens, keeping only
    sinks + the recent window in the exact tier; the rest goes to tier `target`.
    encode(spec, k, v, seed, kv_dtype) -> records of the graduating tokens (the reference codec
    here; the Triton encoder on the GPU)."""
    exact = next(i for i, s in enumerate(specs) if s.exact)
    if specs[target].exact:
        raise ValueError("the graduation target must be a compressed tier")
    B, H, N, d = k.shape
    dev = k.device
    vmask = torch.ones(B, H, N, dtype=torch.bool, device=dev) if valid is None else valid.to(torch.bool)[:, None, :].expand(B, H, N)
    util = torch.zeros(B, H, N, device=dev) if utility is None else utility
    old_rec, old_util, old_valid = gather_tokens(states[exact])
    new_rec = encode_records(specs[exact], k, v, seed, kv_dtype)
    rec = torch.cat((old_rec, new_rec), 2)
    utl = torch.cat((old_util.to(util.dtype), util), 2)
    ok = torch.cat((old_valid, vmask), 2)
    # rank among real tokens, oldest first; the tokens_total - recent oldest beyond the sinks graduate
    rank = torch.cumsum(ok.to(torch.int64), -1) - 1
    total = ok.sum(-1, keepdim=True)
    keep = ok & ((rank < sink) | (rank >= total - recent))
    leave = ok & ~keep
    if bool(leave.any()):
        # encode only the graduating tokens: sinks and the recent window stay exact, and in
        # decode they are almost all of the exact tier
        kk, vv = split_exact(rec[leave], d, kv_dtype)
        enc = encode(specs[target], kk, vv, seed, kv_dtype)
        grads = enc.new_zeros(*leave.shape, enc.shape[-1])
        grads[leave] = enc
        append_records(states[target], grads, utl, leave, specs[target].name)
    rebuild(states[exact], rec, utl, keep, specs[exact].name)
