"""The budget meter: a small int64 tensor each layer's store carries next to its pages.

It lives in a tensor, not in Python, so a compiled graph can count decode steps and
re-budgets without Dynamo guarding on a changing int (no recompile per step), and so
tests and report() can read what the budgeting node measured.
"""
from __future__ import annotations

import torch

CALLS = 0  # cache updates since the sequence started (prefill = 1, then one per decode step)
LAST_REBUDGET = 1  # the call that last re-budgeted (-1: never)
REBUDGETS = 2  # re-budgets so far
BUDGET = 3  # the token-byte budget per batch row at the last call (0: no budget)
TOKEN_BYTES = 4  # token bytes of the fullest batch row after the last call
MAX_EXCESS = 5  # max over calls of (token bytes - budget); <= 0 means always within budget
BATCH = 6  # batch rows B
LOST = 7  # tokens a decode step replayed from a CUDA graph could not store (the exact tier was full)
SIZE = 8  # then B entries: real (non-padding) tokens that entered the store per batch row, dropped
# ones included (under RDR the pages hold fewer tokens than the model wrote; mask checks compare
# the mask's visible past with this count, not with the page counts); then B·Hkv entries: the
# key gain s²·E‖q‖²/d of each row and KV head (rdr.costs.distortion), in GAIN_UNITS, 0 = unknown.
GAIN_UNITS = 1e-6  # the key gain is a float kept in this int64 tensor as a multiple of this
GAIN_MEMORY = 0.9  # running estimate: new = memory·old + (1 - memory)·queries just seen

_NAMES = ("calls", "last_rebudget", "rebudgets", "budget_bytes", "token_bytes", "max_excess")


def new_meter(batch: int, kv_heads: int = 1, device="cpu") -> torch.Tensor:
    m = torch.zeros(SIZE + batch + batch * kv_heads, dtype=torch.int64, device=device)
    m[BATCH] = batch
    reset(m)
    return m


def reset(meter: torch.Tensor) -> None:
    """A new sequence: every count and the key gain back to their start (the layout stays)."""
    batch = int(meter[BATCH])
    meter.zero_()
    meter[LAST_REBUDGET] = -1
    meter[MAX_EXCESS] = torch.iinfo(torch.int64).min
    meter[BATCH] = batch


def fresh(meter: torch.Tensor) -> torch.Tensor:
    """What reset() would make of this meter, as a new tensor, without reading it on the host
    (runtime_ops.advance_on_device resets on the device where a write starts at position 0)."""
    out = torch.zeros_like(meter)
    # fill_ on one-element views: `out[i] = -1` copies a host scalar to the GPU, which waits for
    # it (seen on the H200, session 41) and so stops a CUDA graph capture
    out.narrow(0, LAST_REBUDGET, 1).fill_(-1)
    out.narrow(0, MAX_EXCESS, 1).fill_(torch.iinfo(torch.int64).min)
    out.narrow(0, BATCH, 1).copy_(meter.narrow(0, BATCH, 1))
    return out


def entered(meter: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """[B]: tokens that entered the store per batch row (a view). Pass `batch` where the meter
    must not be read back to the host (inside a CUDA graph capture)."""
    return meter[SIZE:SIZE + (int(meter[BATCH]) if batch is None else batch)]


def select_rows(meter: torch.Tensor, rows: torch.Tensor) -> None:
    """Batch row i takes row rows[i]'s per-row entries (tokens entered, key gain), in place:
    the store's select_rows (beam search) moved that row's tokens. rows has one entry per
    batch row, so nothing is read back."""
    select_rows_of([meter], rows)


def select_rows_of(meters: list[torch.Tensor], rows: torch.Tensor) -> None:
    """select_rows for many layers' meters at once (a beam reorder moves every layer's rows):
    meters alike (size, device) are stacked, reordered in a few whole-stack ops and copied back
    in one multi-tensor copy, where each meter took four small kernels."""
    B = rows.shape[0]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for meter in meters:
        groups.setdefault((meter.numel(), meter.device), []).append(meter)
    for (size, device), group in groups.items():
        r = rows.to(device=device, dtype=torch.int64)
        stacked = torch.stack(group)  # [L, size]
        moved_entered = stacked[:, SIZE:SIZE + B][:, r]
        moved_gain = stacked[:, SIZE + B:].reshape(len(group), B, -1)[:, r].reshape(len(group), -1)
        torch._foreach_copy_(group, list(torch.cat((stacked[:, :SIZE], moved_entered, moved_gain), 1).unbind(0)))


def key_gain(meter: torch.Tensor) -> torch.Tensor | None:
    """[B, Hkv] float32: the running key gain, or None before any query was seen."""
    B = int(meter[BATCH])
    raw = meter[SIZE + B:]
    if not bool((raw > 0).any()):
        return None
    return raw.reshape(B, -1).to(torch.float32) * GAIN_UNITS


def observe_queries(meter: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Fold the key gain of the queries just seen [B, Hkv] into the running estimate; returns
    the estimate (what key_gain reads back, without a host-side check)."""
    B = gain.shape[0]
    raw = meter[SIZE + B:].view(B, -1)
    new = gain.to(device=raw.device, dtype=torch.float64) / GAIN_UNITS
    old = raw.to(torch.float64)
    mixed = torch.where(old > 0, GAIN_MEMORY * old + (1 - GAIN_MEMORY) * new, new).round().clamp(min=1)
    raw.copy_(mixed.to(torch.int64))
    return mixed.to(torch.float32) * GAIN_UNITS


def count_entered(meter: torch.Tensor, n: int, valid: torch.Tensor | None, batch: int) -> None:
    entered(meter, batch).add_(n if valid is None else valid.to(torch.int64).sum(-1))


def read(meter: torch.Tensor) -> dict:
    values = meter.tolist()
    gain = key_gain(meter)
    return {**dict(zip(_NAMES, (int(x) for x in values[:BATCH]))), "lost_tokens": int(values[LOST]),
            "entered": entered(meter).tolist(),
            "key_gain": None if gain is None else gain.tolist()}
