"""The RDR custom ops: sphkv::rdr_update (budget in bytes, for direct callers), and the
budgeting ops the compiled graph and the transformers cache insert (update_cache_rdr,
kv_budget; see the block comment above them).

  sphkv::rdr_update(state!, k, v, valid?, utility?, tiers, seed, kv_dtype, sink, recent, target_tier,
                    budget_bytes, rebudget_every)

The same arguments as sphkv::update_cache (sphkv_compile/ops.py), plus the per-layer, per-row
budget in token bytes and the re-budget interval. budget_bytes <= 0 means no budget (the
uniform policy into target_tier). See rdr/update.py for what it does and budget.py for the
up-front check and pool sizes.
"""
from __future__ import annotations

import torch

from ..eager_ops import custom_op
from ..ops import dtype_from_name, parse_tiers, unflatten_state
from .node import budget_step, current_budget, enter_chunk
from .update import rdr_update as _rdr_update
from .utility import query_key_gain


@custom_op("rdr_update", mutates_args=("state",))
def rdr_update(state: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
               utility: torch.Tensor | None, tiers: str, seed: int, kv_dtype: str, sink: int, recent: int,
               target_tier: int, budget_bytes: int, rebudget_every: int) -> None:
    specs = parse_tiers(tiers)
    _rdr_update(unflatten_state(state, tiers), list(specs), k, v, valid, utility, seed=seed,
                kv_dtype=dtype_from_name(kv_dtype), sink=sink, recent=recent, budget_bytes=budget_bytes,
                rebudget_every=rebudget_every, target=target_tier)


@rdr_update.register_fake
def _(state, k, v, valid, utility, tiers, seed, kv_dtype, sink, recent, target_tier, budget_bytes,
      rebudget_every) -> None:
    return None


# ---- the budgeting ops of the compiled graph and the transformers cache (node.py) ------------
#   sphkv::update_cache_rdr(state!, meter!, tokens, k, v, valid?, utility?, tiers, seed, kv_dtype, sink, recent,
#                           budget, max_tokens, rebudget_every, queries?, scale, obs_window)
#       the cache update under policy 'rdr' (node.enter_chunk); queries [B, Hq, Tq, d]: those
#       that attended this step, whose key gain (utility.query_key_gain over the last obs_window,
#       softmax scale `scale`) re-budgets price key errors with
#   sphkv::kv_budget(state!, meter!, tokens, tiers, seed, kv_dtype, head_dim, sink, recent, policy, budget,
#                    max_tokens, rebudget_every)
#       the budgeting node after every cache update (node.budget_step)
# budget: the option (a fraction of dense 16-bit KV; <= 0: none); max_tokens: the cache's
# maximum length (0: none, the budget grows with `tokens`, the tokens seen including this
# chunk, an int64 tensor so that no Python int changes from step to step).
def _budget(states, specs, tokens, head_dim, seed, dtype, policy, budget, max_tokens, sink, recent, every) -> int:
    return current_budget(states, specs, tokens, head_dim=head_dim, seed=seed, kv_dtype=dtype, policy=policy,
                          fraction=budget, max_tokens=max_tokens, sink=sink, recent=recent, rebudget_every=every)


@custom_op("update_cache_rdr", mutates_args=("state", "meter"))
def update_cache_rdr(state: list[torch.Tensor], meter: torch.Tensor, tokens: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, valid: torch.Tensor | None, utility: torch.Tensor | None, tiers: str, seed: int,
                     kv_dtype: str, sink: int, recent: int, budget: float, max_tokens: int,
                     rebudget_every: int, queries: torch.Tensor | None = None, scale: float = 1.0,
                     obs_window: int = 0) -> None:
    specs = list(parse_tiers(tiers))
    states = unflatten_state(state, tiers)
    dt = dtype_from_name(kv_dtype)
    nbytes = _budget(states, specs, tokens, k.shape[-1], seed, dt, "rdr", budget, max_tokens, sink, recent,
                     rebudget_every)
    gain = None if queries is None else query_key_gain(queries, k.shape[1], scale, obs_window)
    enter_chunk(states, specs, meter, k, v, valid, utility, seed=seed, kv_dtype=dt, sink=sink, recent=recent,
                budget_bytes=nbytes, rebudget_every=rebudget_every, key_gain=gain)


@update_cache_rdr.register_fake
def _(state, meter, tokens, k, v, valid, utility, tiers, seed, kv_dtype, sink, recent, budget, max_tokens,
      rebudget_every, queries=None, scale=1.0, obs_window=0) -> None:
    return None


@custom_op("kv_budget", mutates_args=("state", "meter"))
def kv_budget(state: list[torch.Tensor], meter: torch.Tensor, tokens: torch.Tensor, tiers: str, seed: int,
              kv_dtype: str, head_dim: int, sink: int, recent: int, policy: str, budget: float, max_tokens: int,
              rebudget_every: int) -> None:
    specs = list(parse_tiers(tiers))
    states = unflatten_state(state, tiers)
    dt = dtype_from_name(kv_dtype)
    nbytes = _budget(states, specs, tokens, head_dim, seed, dt, policy, budget, max_tokens, sink, recent,
                     rebudget_every)
    budget_step(states, specs, meter, head_dim=head_dim, seed=seed, kv_dtype=dt, sink=sink, recent=recent,
                policy=policy, budget_bytes=nbytes, rebudget_every=rebudget_every)


@kv_budget.register_fake
def _(state, meter, tokens, tiers, seed, kv_dtype, head_dim, sink, recent, policy, budget, max_tokens,
      rebudget_every) -> None:
    return None
