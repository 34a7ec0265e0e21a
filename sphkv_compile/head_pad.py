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
import warnings

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
    """The head dim the store would hold by the device and option alone (choose_stored_head_dim
    also asks whether the kernels and the budget take it)."""
    if pad is False or (pad == "auto" and torch.device(device).type != "cuda"):
        return head_dim
    return kernel_head_dim(head_dim)


def kernels_cover(options, head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Would the Triton kernels serve stores of this head dim (registered, and the tiers, radius
    bits and dtypes supported)?"""
    try:
        from .kernels import cuda_ops
        from .kernels.attend import unsupported_reason
    except ImportError:
        return False
    return cuda_ops.registered() and unsupported_reason(q_dtype, options.tier_ladder, head_dim, options.seed,
                                                        kv_dtype) is None


def choose_stored_head_dim(options, kv_heads: int, head_dim: int, device, q_dtype: torch.dtype,
                           kv_dtype: torch.dtype, max_tokens: int | None) -> int:
    """The head dim a store holds, decided once for every path that builds or plans one (the
    transformers cache, graph_blocker, the graph rewrite and its stores), so they agree.
    'auto' pads on CUDA when the kernels would then serve the store and the budget holds the
    padded records; where the budget does not, it keeps head_dim and warns (the ops then run
    their torch references, as before padding existed). True pads or refuses the budget."""
    from .rdr.budget import SphkvBudgetError

    stored = stored_head_dim(head_dim, device, options.pad_head_dim)
    if stored == head_dim:
        return head_dim
    if options.pad_head_dim == "auto" and not kernels_cover(options, stored, q_dtype, kv_dtype):
        return head_dim
    try:
        check_padded_budget(options, kv_heads, head_dim, stored, kv_dtype, max_tokens)
    except SphkvBudgetError as err:
        if options.pad_head_dim is True:
            raise
        from .options import SphkvPerformanceWarning

        warnings.warn(f"sphkv: head_dim {head_dim} kept unpadded, so the Triton kernels cannot serve it (slow "
                      f"torch reference ops): {err}", SphkvPerformanceWarning, stacklevel=2)
        return head_dim
    return stored


def padding_report(head_dim: int, stored: int) -> dict | None:
    """report()["head_dim_padding"] for stores of `stored` serving a model head dim (None: unpadded)."""
    if stored == head_dim:
        return None
    return {"head_dim": head_dim, "stored_head_dim": stored, "note": padding_note(head_dim, stored)}


def padding_note(head_dim: int, stored: int) -> str:
    """What report() says about the padding."""
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
    """rdr.check_budget at the padded dim, with the user's options (their budget is rescaled
    here); its refusal names the padding and quotes the user's budget: a budget that holds the
    real head dim's records may not hold the padded ones."""
    from .rdr.budget import SphkvBudgetError, check_budget

    try:
        check_budget(options_for_stored(options, head_dim, stored), kv_heads, stored, kv_dtype, max_tokens)
    except SphkvBudgetError as err:
        raise SphkvBudgetError(f"budget={options.budget} does not hold head_dim {head_dim} stored zero-padded to "
                               f"{stored} for the Triton kernels ({err}). Fix: raise the budget, or pass "
                               f"pad_head_dim=False to keep {head_dim} (torch reference ops, slow)") from err
