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
SIZE = 6  # then one entry per batch row: real (non-padding) tokens that entered the store, dropped
# ones included. Under RDR the pages hold fewer tokens than the model wrote; mask checks compare
# the mask's visible past with this count, not with the page counts.

_NAMES = ("calls", "last_rebudget", "rebudgets", "budget_bytes", "token_bytes", "max_excess")


def new_meter(batch: int, device="cpu") -> torch.Tensor:
    m = torch.zeros(SIZE + batch, dtype=torch.int64, device=device)
    reset(m)
    return m


def reset(meter: torch.Tensor) -> None:
    meter.zero_()
    meter[LAST_REBUDGET] = -1
    meter[MAX_EXCESS] = torch.iinfo(torch.int64).min


def entered(meter: torch.Tensor) -> torch.Tensor:
    """[B]: tokens that entered the store per batch row (a view)."""
    return meter[SIZE:]


def count_entered(meter: torch.Tensor, n: int, valid: torch.Tensor | None) -> None:
    entered(meter).add_(n if valid is None else valid.to(torch.int64).sum(-1))


def read(meter: torch.Tensor) -> dict:
    values = meter.tolist()
    return {**dict(zip(_NAMES, (int(x) for x in values[:SIZE]))), "entered": [int(x) for x in values[SIZE:]]}
