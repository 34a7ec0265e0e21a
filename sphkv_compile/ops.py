"""torch.library custom ops over the paged store, traceable by Dynamo and AOT.

The store of one layer is passed as a flat list of tensors, six per tier, in the order of
TierState.tensors(): pool, utility, pages, count, free, free_top; or, packed, as one int32
tensor whose views those are (packed_state.py: a compiled step's host cost grows with its
tensor inputs). Tiers travel as their spec strings (TierSpec.to_string), joined by ';'; a
packed state's layout follows them after '@' (tiers_arg).

  sphkv::encode_append(state!, k, v, valid?, utility?, tier_index, tiers, seed, kv_dtype)
      encode K/V [B, Hkv, N, d] with the tier's codecs and append them to its pages.
  sphkv::attend(q, state!, k_new?, v_new?, valid_new?, tiers, seed, kv_dtype, scale, obs_window,
                accumulate) -> (out, new_mass)
      attention of q [B, Hq, Tq, d] over every stored (past) token read from its codes, plus
      the dense current chunk [B, Hkv, N, d] attended causally (decode: N = Tq = 1), GQA.
      new_mass: attention the last obs_window queries put on each chunk token (RDR utility);
      accumulate=True adds the same mass on stored tokens to their utility.

  sphkv::update_cache(state!, k, v, valid?, utility?, tiers, seed, kv_dtype, sink, recent, target_tier)
      the cache update with placement: sinks and the recent window stay exact, the rest is
      encoded into the target tier (placement.graduate).

The CPU implementations here are the reference; on CUDA, Triton kernels replace them
(sphkv_compile.kernels) where available.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import packed_state
from .eager_ops import custom_op
from .placement import graduate
from .store import UTILITY_DTYPE, TierState, append_records, attend as store_attend, encode_records
from .tiers import TierSpec, tiers_arg, tiers_string  # noqa: F401 - the ops' callers import them here

STATE_TENSORS_PER_TIER = 6


# Called with (tier specs, head dim, seed, KV dtype, device) whenever a store is created: the
# CUDA kernels register one that moves their constant tables to the device up front.
_store_preparers: list = []


def on_new_store(preparer) -> None:
    if preparer not in _store_preparers:
        _store_preparers.append(preparer)


@torch._dynamo.disable  # a store made inside a compiled forward: the tables are made eagerly all the same
def prepare_store(specs, head_dim: int, seed: int, kv_dtype: torch.dtype, device) -> None:
    for preparer in _store_preparers:
        preparer(specs, head_dim, seed, kv_dtype, torch.device(device))


def parse_tiers(tiers: str) -> tuple[TierSpec, ...]:
    return _parse_specs(tiers.partition("@")[0])


@lru_cache(maxsize=None)
def _parse_specs(specs: str) -> tuple[TierSpec, ...]:
    return tuple(TierSpec.from_string(t) for t in specs.split(";"))


def state_kv_heads(state: list[torch.Tensor], tiers: str) -> int:
    """KV heads of the store a state list holds (the fake implementations' output shapes)."""
    layout = tiers.partition("@")[2]
    return packed_state.parse_layout(layout)[1] if layout else state[2].shape[1]


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dt


def unflatten_state(state: list[torch.Tensor], tiers: str) -> list[TierState]:
    """The TierStates of a state list, for the tiers (and packed layout) of `tiers`."""
    num_tiers, layout = len(parse_tiers(tiers)), tiers.partition("@")[2]
    if layout:
        if len(state) != 1:
            raise ValueError(f"a packed store state is one tensor (its layout came with the tiers), got {len(state)}")
        states = packed_state.views_of(state[0], layout, UTILITY_DTYPE, TierState)
        if len(states) != num_tiers:
            raise ValueError(f"the packed layout {layout!r} has {len(states)} tiers; the specs name {num_tiers}")
        return states
    if len(state) != STATE_TENSORS_PER_TIER * num_tiers:
        raise ValueError(f"store state has {len(state)} tensors; {num_tiers} tiers need "
                         f"{STATE_TENSORS_PER_TIER * num_tiers}")
    return [TierState(*state[i:i + STATE_TENSORS_PER_TIER]) for i in range(0, len(state), STATE_TENSORS_PER_TIER)]


@custom_op("encode_append", mutates_args=("state",))
def encode_append(state: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                  utility: torch.Tensor | None, tier_index: int, tiers: str, seed: int, kv_dtype: str) -> None:
    specs = parse_tiers(tiers)
    states = unflatten_state(state, tiers)
    spec = specs[tier_index]
    records = encode_records(spec, k, v, seed, dtype_from_name(kv_dtype))
    B, H, N, _ = k.shape
    vmask = None if valid is None else valid.to(torch.bool)[:, None, :].expand(B, H, N)
    append_records(states[tier_index], records, utility, vmask, spec.name)


@encode_append.register_fake
def _(state, k, v, valid, utility, tier_index, tiers, seed, kv_dtype) -> None:
    return None


@custom_op("attend", mutates_args=("state",))
def attend(q: torch.Tensor, state: list[torch.Tensor], k_new: torch.Tensor | None, v_new: torch.Tensor | None,
           valid_new: torch.Tensor | None, tiers: str, seed: int, kv_dtype: str, scale: float,
           obs_window: int, accumulate: bool, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    specs = parse_tiers(tiers)
    states = unflatten_state(state, tiers)
    vn = None if valid_new is None else valid_new.to(torch.bool)
    out, mass = store_attend(q, states, list(specs), seed=seed, kv_dtype=dtype_from_name(kv_dtype), k_new=k_new,
                             v_new=v_new, valid_new=vn, scale=scale, obs_window=obs_window, accumulate=accumulate,
                             sinks=sinks)
    return out.contiguous(), mass.to(torch.float32).contiguous()


@attend.register_fake
def _(q, state, k_new, v_new, valid_new, tiers, seed, kv_dtype, scale, obs_window, accumulate, sinks=None):
    B, Hq, Tq, d = q.shape
    n = 0 if k_new is None else k_new.shape[2]
    hkv = state_kv_heads(state, tiers)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, hkv, n), dtype=torch.float32))


@custom_op("update_cache", mutates_args=("state",))
def update_cache(state: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                 utility: torch.Tensor | None, tiers: str, seed: int, kv_dtype: str, sink: int, recent: int,
                 target_tier: int) -> None:
    """The cache update: the chunk enters as the newest tokens; the exact tier keeps the sinks
    and the recent window; older tokens are encoded into tier `target_tier`."""
    specs = parse_tiers(tiers)
    graduate(unflatten_state(state, tiers), list(specs), k, v, valid, utility, seed=seed,
             kv_dtype=dtype_from_name(kv_dtype), sink=sink, recent=recent, target=target_tier)


@update_cache.register_fake
def _(state, k, v, valid, utility, tiers, seed, kv_dtype, sink, recent, target_tier) -> None:
    return None
