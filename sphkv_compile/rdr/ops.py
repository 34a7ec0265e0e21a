"""The RDR cache update as a custom op, for the compiled graph (policy 'rdr').

  sphkv::rdr_update(state!, k, v, valid?, utility?, tiers, seed, kv_dtype, sink, recent, target_tier,
                    budget_bytes, rebudget_every)

The same arguments as sphkv::update_cache (sphkv_compile/ops.py), plus the per-layer, per-row
budget in token bytes and the re-budget interval. budget_bytes <= 0 means no budget (the
uniform policy into target_tier). See rdr/update.py for what it does and budget.py for the
up-front check and pool sizes.
"""
from __future__ import annotations

import torch

from ..ops import dtype_from_name, parse_tiers, unflatten_state
from .update import rdr_update as _rdr_update


@torch.library.custom_op("sphkv::rdr_update", mutates_args=("state",))
def rdr_update(state: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
               utility: torch.Tensor | None, tiers: str, seed: int, kv_dtype: str, sink: int, recent: int,
               target_tier: int, budget_bytes: int, rebudget_every: int) -> None:
    specs = parse_tiers(tiers)
    _rdr_update(unflatten_state(state, len(specs)), list(specs), k, v, valid, utility, seed=seed,
                kv_dtype=dtype_from_name(kv_dtype), sink=sink, recent=recent, budget_bytes=budget_bytes,
                rebudget_every=rebudget_every, target=target_tier)


@rdr_update.register_fake
def _(state, k, v, valid, utility, tiers, seed, kv_dtype, sink, recent, target_tier, budget_bytes,
      rebudget_every) -> None:
    return None
