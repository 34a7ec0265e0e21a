"""What the budgeting ops do, on one layer's fixed tier states (ops.py registers them).

    enter_chunk   policy 'rdr': the cache update. The chunk joins the exact tier when the layer
                  stays within budget; otherwise the whole layer is re-budgeted with the chunk
                  in it, so a prefill never has to be staged in pages the budget cannot hold.
    budget_step   the budgeting node after every cache update, both policies. It re-budgets
                  (rdr) once `rebudget_every` updates have passed since the last re-budget and
                  the layer has used its headroom, on the utility sphkv::attend accumulated; then
                  it measures the token bytes of every batch row against the budget, records
                  them in the meter, and raises if the budget was exceeded.

Inside a CUDA graph capture (generate()'s decode step replayed from graphs) nothing may be
decided on the host: enter_chunk appends the decode token to the exact tier on the device,
budget_step only records, and the re-budget check (rebudget_if_due) runs between steps,
outside the graph (SphkvCache.rebudget_due, from a logits processor that optimize()'s
generate() adds). After a re-budget the exact tier has room for `rebudget_every` tokens, and
the check runs after every step, so the layer ends each step as the eager path leaves it.

Both count in the meter tensor (meter.py), never in Python state, so compiled graphs do not
recompile per step.
"""
from __future__ import annotations

import torch

from ..store import TierState
from ..tiers import TierSpec
from . import meter as M
from .budget import SphkvBudgetError, budget_for, protected_count
from .costs import choice_table
from .utility import pooled
from .update import append_decode_token, headroom_bytes, page_slack_bytes, rdr_update, rebudget, token_bytes


def current_budget(states: list[TierState], specs: list[TierSpec], tokens: torch.Tensor, *, head_dim: int,
                   seed: int, kv_dtype: torch.dtype, policy: str, fraction: float, max_tokens: int, sink: int,
                   recent: int, rebudget_every: int) -> int:
    """budget.budget_for from the ops' arguments; `tokens`: seen so far, this chunk included."""
    if fraction <= 0:
        return 0
    H = states[0].count.shape[1]
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    floor = H * protected_count(policy, sink, recent, rebudget_every) * table.exact_bytes
    # a fixed budget (max_tokens) does not depend on the tokens seen: no read back to the host
    seen = 0 if max_tokens else int(tokens.reshape(-1)[0])
    return budget_for(fraction, seen, max_tokens, H, head_dim, floor)


def capturing() -> bool:
    """Is this call being captured into a CUDA graph (so that it must not read the device)?"""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def over_budget_error(held: int, budget_bytes: int, policy: str, calls: int) -> SphkvBudgetError:
    return SphkvBudgetError(
        f"sphkv: a batch row of this layer holds {held} token bytes, over its budget of {budget_bytes} "
        f"(policy {policy!r}, update {calls}). The up-front check should have refused this "
        f"configuration; please report it. Fix for now: raise the budget or use policy='rdr'.")


def _record_rebudget(meter: torch.Tensor, counted: bool = False) -> None:
    """counted: the meter already counts the update this re-budget follows (between steps)."""
    meter[M.LAST_REBUDGET] = meter[M.CALLS] - (1 if counted else 0)
    meter[M.REBUDGETS] += 1


def enter_chunk(states: list[TierState], specs: list[TierSpec], meter: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor | None, utility: torch.Tensor | None, *, seed: int, kv_dtype: torch.dtype,
                sink: int, recent: int, budget_bytes: int, rebudget_every: int,
                key_gain: torch.Tensor | None = None) -> None:
    """utility [B, Hkv, N]: the observation-window attention on the chunk, max-pooled along the
    chunk (utility.pooled) before it is stored. key_gain [B, Hkv]: of the queries that just
    attended (utility.query_key_gain), folded into the meter's running estimate, which every
    re-budget of this layer then prices key errors with (option distortion='logit')."""
    if budget_bytes <= 0:
        raise SphkvBudgetError("policy 'rdr' needs a byte budget. Fix: pass budget=<fraction of dense KV>.")
    M.count_entered(meter, k.shape[2], valid, k.shape[0])
    if utility is not None:
        utility = pooled(utility)
    # only distortion='logit' passes queries; 'unit' then never reads the meter's gain back
    gain = None if key_gain is None else M.observe_queries(meter, key_gain)
    if k.shape[2] == 1 and capturing():  # a decode step inside a CUDA graph: no host decision
        append_decode_token(states, specs, meter[M.LOST:M.LOST + 1], k, v, valid, utility, seed=seed,
                            kv_dtype=kv_dtype)
        return
    if rdr_update(states, specs, k, v, valid, utility, seed=seed, kv_dtype=kv_dtype, sink=sink, recent=recent,
                  budget_bytes=budget_bytes, rebudget_every=rebudget_every, key_gain=gain,
                  lost=meter[M.LOST:M.LOST + 1]):
        _record_rebudget(meter)


def budget_step(states: list[TierState], specs: list[TierSpec], meter: torch.Tensor, *, head_dim: int, seed: int,
                kv_dtype: torch.dtype, sink: int, recent: int, policy: str, budget_bytes: int,
                rebudget_every: int) -> None:
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    if budget_bytes > 0 and not capturing():
        _budget_step_eager(states, specs, meter, table, head_dim=head_dim, seed=seed, kv_dtype=kv_dtype, sink=sink,
                           recent=recent, policy=policy, budget_bytes=budget_bytes, rebudget_every=rebudget_every)
        return
    if budget_bytes <= 0:
        # nothing to check: no per-step byte count either (a dozen small kernels per layer and
        # decode step); measure() counts the bytes from the page tables when asked
        count_unbudgeted_step(meter)
        return
    # in place (fill_/copy_/add_): a Python number assigned by index is copied from the host,
    # which a CUDA graph capture refuses
    meter[M.BUDGET].fill_(budget_bytes)
    meter[M.CALLS].add_(1)
    # inside a CUDA graph the replays never reach the host: the bookkeeping stays on the device,
    # with the worst excess, which the cache checks after generate() (SphkvCache.raise_if_over_budget)
    held_t = _held(states, table, meter)
    meter[M.TOKEN_BYTES].copy_(held_t)
    meter[M.MAX_EXCESS].copy_(torch.maximum(meter[M.MAX_EXCESS], held_t - budget_bytes))


def count_unbudgeted_step(meter: torch.Tensor) -> None:
    """All the budgeting node does without a budget: the meter records none and counts the
    update. A layer that knows it has no budget (policy 'uniform', budget None) calls this in
    place of the node: two small in-place kernels instead of a custom op's dispatch, ~0.1 ms of
    host time per layer and eager decode step."""
    meter[M.BUDGET].fill_(0)
    meter[M.CALLS].add_(1)


def _held(states: list[TierState], table, meter: torch.Tensor) -> torch.Tensor:
    """Token bytes of the fullest batch row, an int64 scalar on the meter's device."""
    return token_bytes(states, table).max() if states[0].count.numel() else meter.new_zeros(())


def _budget_step_eager(states, specs, meter, table, *, head_dim, seed, kv_dtype, sink, recent, policy, budget_bytes,
                       rebudget_every) -> None:
    """budget_step outside a capture: the re-budget cadence, the bytes held and the worst excess
    so far come back in one read (a sync per layer and step on a GPU, where there were three)."""
    held_t = _held(states, table, meter)
    calls, last, held, excess = torch.stack((meter[M.CALLS], meter[M.LAST_REBUDGET], held_t.to(meter.dtype),
                                             meter[M.MAX_EXCESS])).tolist()
    if policy == "rdr" and rebudget_if_due(states, specs, meter, head_dim=head_dim, seed=seed, kv_dtype=kv_dtype,
                                           sink=sink, recent=recent, budget_bytes=budget_bytes,
                                           rebudget_every=rebudget_every, cadence=(calls, last), held=held):
        held_t = _held(states, table, meter)
        held = int(held_t)
    meter[M.BUDGET].fill_(budget_bytes)
    meter[M.CALLS].add_(1)
    meter[M.TOKEN_BYTES].copy_(held_t)
    meter[M.MAX_EXCESS] = max(excess, held - budget_bytes)
    if held > budget_bytes:
        raise over_budget_error(held, budget_bytes, policy, calls + 1)


def cadence_due(calls: int, last_rebudget: int, rebudget_every: int, counted: bool) -> bool:
    """Have `rebudget_every` updates passed since the last re-budget? counted: `calls` already
    counts the latest update (the check runs between steps, after the step's budgeting node)."""
    return calls - (1 if counted else 0) - last_rebudget >= rebudget_every


def cadence_counters(meter: torch.Tensor) -> torch.Tensor:
    """The meter's (calls, last re-budget) as a device view: read them back for cadence_due."""
    return meter[M.CALLS:M.LAST_REBUDGET + 1]


def rebudget_if_due(states: list[TierState], specs: list[TierSpec], meter: torch.Tensor, *, head_dim: int,
                    seed: int, kv_dtype: torch.dtype, sink: int, recent: int, budget_bytes: int,
                    rebudget_every: int, counted: bool = False, cadence: tuple[int, int] | None = None,
                    held: int | None = None) -> bool:
    """Re-budget (rdr) if `rebudget_every` updates have passed since the last re-budget and the
    layer holds more than the budget less its headroom. counted: the meter already counts the
    latest update, so the cadence is the one budget_step keeps inside the step. cadence: the
    meter's (calls, last re-budget) already read back (else one read here); held: the fullest
    row's token bytes, if read back with them (else they are read only when due)."""
    calls, last = cadence if cadence is not None else cadence_counters(meter).tolist()
    if not cadence_due(calls, last, rebudget_every, counted):
        return False
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    H = states[0].count.shape[1]
    target = max(budget_bytes - headroom_bytes(H, rebudget_every, table), 0)
    if (int(token_bytes(states, table).max()) if held is None else held) <= target:
        return False
    rebudget(states, specs, torch.full((states[0].count.shape[0],), float(target), dtype=torch.float64),
             head_dim=head_dim, seed=seed, kv_dtype=kv_dtype, sink=sink, recent=recent,
             headroom_tokens=rebudget_every, key_gain=M.key_gain(meter))
    _record_rebudget(meter, counted)
    if counted:  # what the budgeting node would have measured after it
        meter[M.TOKEN_BYTES].copy_(token_bytes(states, table).max())
    return True


def measure(states: list[TierState], specs, meter: torch.Tensor, *, head_dim: int, seed: int,
            kv_dtype: torch.dtype) -> dict:
    """What the budgeting node measured (meter.read) plus, recounted from the page tables: the
    token bytes of the fullest batch row now (the meter counts them per step only under a
    budget), the bytes of pages in use (token bytes + the unused tail of each last page), the most that tail
    can be (page_slack_bytes), the bytes reserved for records, and the tokens per tier."""
    table = choice_table(tuple(specs), head_dim, seed, kv_dtype)
    in_pages = sum(-(-int(c) // s.page_size) * s.page_size * table.bytes[t]
                   for t, s in enumerate(states) for c in s.count.flatten())
    held = int(token_bytes(states, table).max()) if states[0].count.numel() else 0
    return {**M.read(meter), "token_bytes": held, "page_bytes_in_use": in_pages,
            "page_slack_bytes": page_slack_bytes(states, table),
            "reserved_record_bytes": sum(s.record_bytes() for s in states),
            "tokens": {spec.name: int(s.count.sum()) for spec, s in zip(specs, states)}}
