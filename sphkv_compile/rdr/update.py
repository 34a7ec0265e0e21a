"""RDR on one layer's fixed tier states, in place (like placement.graduate).

rdr_update appends a chunk as the newest tokens. While the layer's token bytes stay within
the budget the chunk simply joins the exact tier (the recent window). When the chunk would
push a batch row over its budget, every token of the layer is re-budgeted: sinks and the
recent window stay exact, every other token takes the tier (or drop) the Lagrangian
allocation gives it, and each tier's pages are rebuilt densely (compaction), so pages stay
tier-homogeneous. The re-budget aims `rebudget_every` exact tokens per KV head below the
budget, so after it that many decode steps append without another re-budget: RDR runs once
at the end of prefill and then every `rebudget_every` decode steps, and the token bytes of a
batch row never exceed `budget_bytes` after any call.

"Token bytes" count every resident token's record and its per-token utility (costs.py). The
rest is documented metadata outside the budget: page tables, counts and free lists (fixed
size), and the unused tail slots of each (row, head, tier)'s last page — at most
page_size - 1 records per (row, head, tier); see `page_slack_bytes`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..placement import graduate
from ..report import record_rebudget
from ..store import (TierState, append_records, demand_fits, encode_records, fits, gather_tokens, page_demand_tensors,
                     rebuild)
from ..tiers import TierSpec
from .allocate import allocate, allocate_capped, within_capacity
from .capacity import row_capacities
from .convert import convert_records, decode_values, norms2
from .costs import ChoiceTable, choice_table, distortion

# an eager decode token on CUDA joins the exact tier by the device-side append (False: by
# append_records; the GPU test compares the two)
DEVICE_APPEND = True


@dataclass
class LayerTokens:
    """Every token of one layer before a re-budget, per source tier (ladder order)."""

    records: list[torch.Tensor]  # [B, H, n_s, W_s]
    utility: list[torch.Tensor]  # [B, H, n_s] float32
    valid: list[torch.Tensor]  # [B, H, n_s] bool
    distortion: torch.Tensor  # [B, H, n_total, choices]; +inf where a choice is not allowed

    def split(self, choice: torch.Tensor) -> list[torch.Tensor]:
        """choice [B, H, n_total] -> per source tier [B, H, n_s]."""
        return list(torch.split(choice, [r.shape[2] for r in self.records], dim=2))


def token_bytes(states: list[TierState], table: ChoiceTable) -> torch.Tensor:
    """Resident token bytes per batch row [B] (records + per-token utility, all heads)."""
    return sum(s.count.to(torch.int64).sum(-1) * table.bytes[t] for t, s in enumerate(states))


def page_slack_bytes(states: list[TierState], table: ChoiceTable) -> int:
    """The most bytes the unused tail slots of partly filled pages can hold (all rows)."""
    B, H = states[0].count.shape
    return sum(B * H * (s.page_size - 1) * table.bytes[t] for t, s in enumerate(states))


def protected_mask(valid: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Sinks (first `sink` real tokens) and the recent window (last `recent`), arrival order."""
    rank = torch.cumsum(valid.to(torch.int64), -1) - 1
    total = valid.sum(-1, keepdim=True)
    return valid & ((rank < sink) | (rank >= total - recent))


def collect(states: list[TierState], specs: list[TierSpec], table: ChoiceTable, k, v, valid, utility, *,
            head_dim: int, seed: int, kv_dtype: torch.dtype, sink: int, recent: int,
            key_gain: torch.Tensor | None = None) -> LayerTokens:
    """Gather every stored token plus the chunk k, v [B, H, N, d] (it joins the exact tier's end)
    and price each choice for each token (costs.distortion; key_gain [B, H] as there)."""
    e, C = table.exact_index, len(table.bytes)
    device = states[0].count.device
    cost = torch.tensor(table.bytes, device=device)
    compressed = torch.tensor([not sp.exact for sp in specs] + [True], device=device)  # drop counts as "compressed"
    # a one-hot row by comparison (F.one_hot checks its input's range: a read back on a GPU)
    only = lambda i: torch.arange(C, device=device) == i
    recs, utils, valids, allowed, r2, v2s, values = [], [], [], [], [], [], []
    for s, (spec, st) in enumerate(zip(specs, states)):
        rec, util, ok = gather_tokens(st)
        util = util.float()
        if s == e and k is not None:
            B, H, N, _ = k.shape
            vmask = torch.ones(B, H, N, dtype=torch.bool, device=k.device) if valid is None \
                else valid.to(torch.bool)[:, None, :].expand(B, H, N)
            rec = torch.cat((rec, encode_records(spec, k, v, seed, kv_dtype)), 2)
            new_u = torch.zeros(B, H, N, device=k.device) if utility is None else utility.float()
            util = torch.cat((util, new_u), 2)
            ok = torch.cat((ok, vmask), 2)
        if s == e:
            allow = torch.ones(*ok.shape, C, dtype=torch.bool, device=device)
            allow[protected_mask(ok, sink, recent)] = only(e)
        else:  # keep or demote, never promote: the finer values are gone
            allow = ((cost <= cost[s]) & compressed).expand(*ok.shape, C).clone()
        allow[~ok] = only(table.drop_index)
        recs.append(rec); utils.append(util); valids.append(ok); allowed.append(allow)
        k2, v2 = norms2(spec, rec, head_dim, seed, kv_dtype)
        r2.append(k2); v2s.append(v2)
        if key_gain is not None:  # the logit-aware price needs the values themselves (their mean)
            values.append(decode_values(spec, rec, head_dim, seed, kv_dtype))
    u = torch.cat(utils, 2).clamp(min=0)
    D = distortion(table, u, torch.cat(r2, 2), torch.cat(values, 2) if values else None, torch.cat(valids, 2),
                   key_gain, value_norm2=torch.cat(v2s, 2))
    D = torch.where(torch.cat(allowed, 2), D, torch.full_like(D, float("inf")))
    return LayerTokens(recs, utils, valids, D)


def apply_choice(states: list[TierState], specs: list[TierSpec], tokens: LayerTokens, choice: torch.Tensor, *,
                 head_dim: int, seed: int, kv_dtype: torch.dtype) -> None:
    """Rebuild every tier with the tokens that chose it (dropped ones vanish); arrival order is
    kept within each source, and the exact tier only ever receives exact tokens."""
    per_source = tokens.split(choice)
    tiers = torch.arange(len(specs), device=choice.device)
    # which (source, target) pairs move any token, in one read back to the host (not one per pair)
    moves = torch.stack([((c[..., None] == tiers) & ok[..., None]).flatten(0, -2).any(0)
                         for c, ok in zip(per_source, tokens.valid)]).tolist()  # [source][target]
    for t, (spec, st) in enumerate(zip(specs, states)):
        recs, utils, masks = [], [], []
        for s, src in enumerate(specs):
            if not moves[s][t]:
                continue
            sel = tokens.valid[s] & (per_source[s] == t)
            # convert only the selected tokens: encoding is the costly part of a re-budget
            out = torch.zeros(*sel.shape, st.pool.shape[-1], dtype=torch.int32, device=sel.device)
            out[sel] = convert_records(src, spec, tokens.records[s][sel], head_dim, seed, kv_dtype)
            recs.append(out)
            utils.append(tokens.utility[s]); masks.append(sel)
        B, H = st.count.shape
        if not recs:
            st.pages.fill_(-1); st.count.zero_()
            st.free.copy_(torch.arange(st.pool.shape[0] - 1, -1, -1, dtype=torch.int32, device=st.free.device))
            st.free_top.fill_(st.pool.shape[0])
            continue
        rebuild(st, torch.cat(recs, 2), torch.cat(utils, 2), torch.cat(masks, 2), spec.name)


def headroom_bytes(kv_heads: int, rebudget_every: int, table: ChoiceTable) -> int:
    """What a re-budget leaves free per batch row: `rebudget_every` exact tokens per KV head."""
    return kv_heads * rebudget_every * table.exact_bytes


# The allocation is a few dozen whole-tensor passes over [items, choices] with host-side
# decisions (a device sync each) between them, so small layers need not go to the device.
# Items per batch row (tokens x KV heads). H200, session 9 (benchmarks/results/
# h200_session9_rebudget.log): CPU and GPU took 13 ms each at 6,144 items, and 31 against 22 ms
# at 24,576; the threshold sits between the two measured sizes.
ALLOCATE_ON_DEVICE_MIN_ITEMS = 16384


def allocation_device(device: torch.device, items_per_row: int) -> torch.device:
    return device if items_per_row >= ALLOCATE_ON_DEVICE_MIN_ITEMS else torch.device("cpu")


def capped_choice(D: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, capacity: torch.Tensor,
                  exact: int) -> torch.Tensor:
    """The allocation within the budget and the pools' capacities [C] (tokens per row). Pools
    sized by pool_pages hold at most the budget, which the capacities then imply; larger pools
    (sized elsewhere) keep the budget as the binding constraint, capacities shrunk to fit it
    only if the budget's own allocation overflows one."""
    implied = float((capacity[:-1] * cost[:-1]).sum())
    if implied <= float(budget.min()):
        return allocate_capped(D, cost, budget, capacity)
    choice = allocate(D, cost, budget)
    if within_capacity(choice, capacity):
        return choice
    return allocate_capped(D, cost, budget, shrink_to_budget(capacity, cost, float(budget.min()), exact))


def shrink_to_budget(capacity: torch.Tensor, cost: torch.Tensor, budget: float, exact: int) -> torch.Tensor:
    """Scale the compressed tiers' capacities down, all by one factor, until together with the
    exact tier they hold at most `budget`. The exact tier keeps its capacity: it was sized for
    the protected tokens (sinks, recent window, re-budget headroom), which must stay exact."""
    priced = cost > 0
    others = priced.clone()
    others[exact] = False
    out = capacity.clone()
    # an exact pool larger than the whole budget (a budget that grows with the tokens seen is
    # still small) is cut to what the budget holds; the protected tokens fit if the budget is feasible
    out[exact] = min(float(capacity[exact]), math.floor(budget / float(cost[exact])))
    room = max(budget - float(out[exact] * cost[exact]), 0.0)
    held = float((capacity[others] * cost[others]).sum())
    if held > 0:
        out[others] = torch.floor(capacity[others] * min(1.0, room / held))
    return out


def rebudget(states: list[TierState], specs: list[TierSpec], budget: torch.Tensor, k=None, v=None, valid=None,
             utility=None, *, head_dim: int, seed: int, kv_dtype: torch.dtype, sink: int, recent: int,
             headroom_tokens: int = 0, key_gain: torch.Tensor | None = None) -> torch.Tensor:
    """Allocate every token of the layer (plus an optional new chunk) within budget [B] bytes and
    each tier's pool (its capacity; the exact tier keeps room for `headroom_tokens` more per KV
    head); returns the choice [B, H, n_total] (indices into the choice table; the last is drop)."""
    started = time.perf_counter()
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    tokens = collect(states, specs, table, k, v, valid, utility, head_dim=head_dim, seed=seed, kv_dtype=kv_dtype,
                     sink=sink, recent=recent, key_gain=key_gain)
    B, H, n, C = tokens.distortion.shape
    capacity = row_capacities(states)
    e = table.exact_index
    capacity[e] = max(float(capacity[e]) - H * headroom_tokens, 0.0)
    cost = torch.tensor(table.bytes, dtype=torch.float64)
    on = allocation_device(tokens.distortion.device, H * n)
    D = tokens.distortion.reshape(B, H * n, C).to(on)
    choice = capped_choice(D, cost.to(on), budget.to(on, torch.float64), capacity.to(on), e)
    choice = choice.reshape(B, H, n).to(tokens.distortion.device)
    apply_choice(states, specs, tokens, choice, head_dim=head_dim, seed=seed, kv_dtype=kv_dtype)
    # a chunk of more than one token is a prefill; a decode step re-budgets with its token or between steps
    record_rebudget("prefill" if k is not None and k.shape[2] > 1 else "decode", time.perf_counter() - started)
    return choice


def append_decode_token(states: list[TierState], specs: list[TierSpec], lost: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, valid: torch.Tensor | None, utility: torch.Tensor | None, *, seed: int,
                        kv_dtype: torch.dtype) -> None:
    """RDR's decode step inside a CUDA graph: the token k, v [B, Hkv, 1, d] joins the exact tier
    on the device (kernels.decode_update.append_token), with no re-budget and no host read; a
    token that finds no room is counted in `lost` (one int64 element) instead. The re-budgets
    that keep room for it run between steps (node.rebudget_if_due)."""
    e = next(i for i, s in enumerate(specs) if s.exact)
    if k.is_cuda:
        from sphkv_compile.kernels.decode_update import append_token

        append_token(states[e], specs[e], k, v, valid, utility, lost, seed=seed, kv_dtype=kv_dtype)
        return
    # graphs are captured on CUDA only; tests simulate a capture on the CPU, where the same
    # append runs with its host-side checks
    B, H, N, _ = k.shape
    arriving = torch.full((B, H), N, dtype=torch.int64) if valid is None \
        else valid.to(torch.int64).sum(-1)[:, None].expand(B, H)
    if not fits(states[e], arriving):
        lost.add_(arriving.sum())
        return
    vmask = None if valid is None else valid.to(torch.bool)[:, None, :].expand(B, H, N)
    append_records(states[e], encode_records(specs[e], k, v, seed, kv_dtype), utility, vmask, specs[e].name)


def _cuda_kernels_installed() -> bool:
    """Have the sphkv ops their Triton implementations (kernels.cuda_ops)? Not in a source tree
    whose kernels are not installed, nor where Triton does not import: then the torch path runs."""
    try:
        from sphkv_compile.kernels import cuda_ops
    except ImportError:
        return False
    return cuda_ops.registered()


def _within_budget_and_fits(exact: TierState, after: torch.Tensor, budget_bytes: int, arriving: torch.Tensor) -> bool:
    """Does every row stay within budget_bytes with the chunk appended (after [B]: its token bytes
    then), and do the chunk's tokens (arriving [B, H]) fit the exact tier's pages? One read back."""
    _, _, demand = page_demand_tensors(exact, exact.count.to(torch.int64) + arriving)
    within, needed, widest, free, _ = torch.cat(((after <= budget_bytes).all().to(torch.int64)[None], demand)).tolist()
    return bool(within) and demand_fits(exact, needed, widest, free)


def rdr_update(states: list[TierState], specs: list[TierSpec], k: torch.Tensor, v: torch.Tensor,
               valid: torch.Tensor | None, utility: torch.Tensor | None, *, seed: int, kv_dtype: torch.dtype,
               sink: int, recent: int, budget_bytes: int, rebudget_every: int, target: int | None = None,
               key_gain: torch.Tensor | None = None, lost: torch.Tensor | None = None) -> bool:
    """Append the chunk k, v [B, Hkv, N, d] (valid [B, N], utility [B, Hkv, N]) under a budget of
    `budget_bytes` token bytes per batch row for this layer. Returns True if it re-budgeted.
    key_gain [B, Hkv]: s²·E‖q‖²/d of the queries seen, for the logit-aware distortion
    (costs.distortion); None prices errors per unit norm. lost: the meter's lost-token count
    (one int64 element); given it, a decode token that fits joins on the device where the Triton
    kernels are installed (a token the kernel could not place would be counted there, and the
    cache raises it after generate()).

    budget_bytes <= 0 means no budget: the uniform policy (graduate to tier `target`)."""
    if budget_bytes <= 0:
        if target is None:
            raise ValueError("rdr_update without a budget needs a target tier for the uniform policy")
        graduate(states, specs, k, v, valid, utility, seed=seed, kv_dtype=kv_dtype, sink=sink, recent=recent,
                 target=target)
        return False
    B, H, N, d = k.shape
    table = choice_table(tuple(specs), d, seed, kv_dtype)
    arriving = torch.full((B,), N, dtype=torch.int64, device=k.device) if valid is None \
        else valid.to(torch.int64).sum(-1)
    after = token_bytes(states, table) + arriving * H * table.exact_bytes
    e = table.exact_index
    vmask = None if valid is None else valid.to(torch.bool)[:, None, :].expand(B, H, N)
    arriving_per_head = arriving[:, None].expand(B, H)
    if _within_budget_and_fits(states[e], after, budget_bytes, arriving_per_head):
        if lost is not None and k.is_cuda and N == 1 and DEVICE_APPEND and _cuda_kernels_installed():
            # a decode token, checked to fit: the device-side append of a captured step, which
            # reads nothing back (append_records reads its page demand)
            append_decode_token(states, specs, lost, k, v, valid, utility, seed=seed, kv_dtype=kv_dtype)
        else:
            append_records(states[e], encode_records(specs[e], k, v, seed, kv_dtype), utility, vmask, specs[e].name)
        return False
    target_bytes = budget_bytes - headroom_bytes(H, rebudget_every, table)
    budget = torch.full((B,), max(target_bytes, 0), dtype=torch.float64)
    rebudget(states, specs, budget, k, v, valid, utility, head_dim=d, seed=seed, kv_dtype=kv_dtype, sink=sink,
             recent=recent, headroom_tokens=rebudget_every, key_gain=key_gain)
    return True
