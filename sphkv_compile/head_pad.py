"""Head dims the Triton kernels cannot take, stored zero-padded to one they can.

The kernels need a power-of-two head dim in [16, 256] (tl.arange and tl.dot shapes). Models
with other head dims (Phi-3: 96, Phi-2: 80, tiny test models: 8) would otherwise run the
ops' torch references on the GPU, which are host-bound. Appending zero coordinates to q, k
and v changes no logit (q·k gains only 0·0 terms) and no output coordinate the model reads
(the padded value coordinates are sliced off), so the store can hold the padded vectors and
the kernels serve the model. The price is bytes: codes cover the padded dim (96 -> 128 is a
third more code bytes per token), which the byte budget absorbs by being re-expressed as a
fraction of the padded dense bytes (the same bytes as the user's fraction of the real ones).

Option `pad_head_dim`: "auto" pads on CUDA only (where the kernels run); True pads on every
device (the CPU tests run the padded path through the references); False never pads.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

KERNEL_MIN_HEAD_DIM, KERNEL_MAX_HEAD_DIM = 16, 256
PAD_CHOICES = ("auto", True, False)


def kernel_head_dim(head_dim: int) -> int:
    """The smallest head dim the kernels take that holds head_dim (head_dim itself when they
    take it; above 256 none does, and head_dim stays)."""
    if head_dim > KERNEL_MAX_HEAD_DIM:
        return head_dim
    return max(KERNEL_MIN_HEAD_DIM, 1 << (head_dim - 1).bit_length())


def stored_head_dim(head_dim: int, device, pad="auto") -> int:
    """The head dim the store holds for a model head dim on `device` under option pad_head_dim."""
    if pad is False or (pad == "auto" and torch.device(device).type != "cuda"):
        return head_dim
    return kernel_head_dim(head_dim)


def padding_note(head_dim: int, stored: int) -> str | None:
    """What report() says about the padding (None: none)."""
    if stored == head_dim:
        return None
    return (f"head_dim {head_dim} is stored zero-padded to {stored}, a head dim the Triton kernels take "
            f"({stored / head_dim:.2f}x the code bytes per token; the budget stays a fraction of the real "
            f"dense bytes). pad_head_dim=False keeps {head_dim} (the ops then run their torch references)")


def options_for_stored(options, head_dim: int, stored: int):
    """The options a store of the padded dim runs with: the budget re-expressed as a fraction of
    the padded dense bytes, so it is the same number of bytes."""
    if stored == head_dim or options.budget is None:
        return options
    return dataclasses.replace(options, budget=options.budget * head_dim / stored)


def pad_last(x: torch.Tensor | None, stored: int) -> torch.Tensor | None:
    """x [..., d] with zero columns appended up to `stored` (x itself when d == stored)."""
    if x is None or x.shape[-1] == stored:
        return x
    return F.pad(x, (0, stored - x.shape[-1]))


def check_padded_budget(options, kv_heads: int, head_dim: int, stored: int, kv_dtype, max_tokens) -> None:
    """rdr.check_budget at the padded dim (options from options_for_stored), its refusal naming
    the padding: a budget that holds the real head dim's records may not hold the padded ones."""
    from .rdr.budget import SphkvBudgetError, check_budget

    try:
        check_budget(options, kv_heads, stored, kv_dtype, max_tokens)
    except SphkvBudgetError as err:
        raise SphkvBudgetError(f"{err} (head_dim {head_dim} is stored zero-padded to {stored} for the Triton "
                               f"kernels; pad_head_dim=False keeps {head_dim}, on the torch reference ops)") from err
