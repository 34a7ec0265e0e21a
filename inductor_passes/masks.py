"""When is a mask "causal over the cache plus padding"?

The rewritten attention sees every stored token plus the new chunk causally, minus padding.
A dense mask is equivalent when, for every real query row:
  - past columns (< p0, the chunk's first position) are the same for every query row and
    show exactly as many tokens as the store holds for that batch row;
  - chunk columns p0 .. p0+N-1 are causal (query i sees chunk tokens <= its own) and agree
    with one validity vector per batch row (padding);
  - columns after the chunk (unfilled slots of a static buffer) are hidden.
Additive masks must also hold only 0 and "-inf" (<= MASKED_AT) values; anything else is a
bias (ALiBi and the like), which changes the scores.

`check_visibility` is used twice: at compile time on the example inputs (to choose dense
with a reason) and at run time inside runtime_ops.mask_validity (so a mask that changes
later raises instead of being silently wrong).
"""
from __future__ import annotations

import torch

# Additive mask values at or below this are "masked": exp(-1e4) underflows to 0 in fp32
# and fp64 whatever the score, so the dense result does not depend on the exact value.
MASKED_AT = -1.0e4


class MaskNotEquivalent(RuntimeError):
    def __init__(self, message: str, bias: bool = False):
        super().__init__(message)
        self.bias = bias


def additive_ok(mask: torch.Tensor) -> torch.Tensor:
    return ((mask == 0) | (mask <= MASKED_AT)).all()


# Why a mask is not equivalent, as a code the checks can compute on the device (runtime_checks
# reads it back without stalling decode); 0: equivalent.
HEADS_DIFFER, OUTSIDE, NOT_CAUSAL, SEES_FUTURE, PAST_DIFFERS, PAST_COUNT = 9, 4, 5, 6, 7, 8
WHY = {
    HEADS_DIFFER: "the attention mask differs between heads",
    OUTSIDE: "the chunk at positions {p0}..{last} lies outside the {tk} mask columns",
    NOT_CAUSAL: "chunk columns are not causal-with-padding (sliding window or custom mask?)",
    SEES_FUTURE: "columns after the chunk are visible (the mask lets queries see the future)",
    PAST_DIFFERS: "past columns differ between query rows (sliding window?)",
    PAST_COUNT: "the mask shows {shown} past tokens but the store holds {stored} (the first batch row that differs; "
                "sliding window, or a cache written elsewhere?)",
}


def batch_rows(vis: torch.Tensor, batch: int, q_heads: int, q_len: int, k_len: int):
    """Any broadcastable visibility [.., Tq, Tk] (or flattened [B*H, Tq, Tk]) -> ([B, Tq, Tk],
    0-d bool on the device: the mask differs between heads, which is not equivalent)."""
    v = vis
    if v.dim() == 3 and v.shape[0] == batch * q_heads and batch * q_heads > 1:
        v = v.reshape(batch, q_heads, *v.shape[1:])
    while v.dim() < 4:
        v = v.unsqueeze(0)
    v = v.expand(batch, v.shape[1], q_len, k_len)
    differ = (v != v[:, :1]).any() if v.shape[1] > 1 else torch.zeros((), dtype=torch.bool, device=v.device)
    return v[:, 0], differ


def to_batch_rows(vis: torch.Tensor, batch: int, q_heads: int, q_len: int, k_len: int) -> torch.Tensor:
    """batch_rows, raising MaskNotEquivalent where the mask differs between heads."""
    rows, differ = batch_rows(vis, batch, q_heads, q_len, k_len)
    if bool(differ):
        raise MaskNotEquivalent(WHY[HEADS_DIFFER])
    return rows


def visibility_on_device(vis: torch.Tensor, positions: torch.Tensor, stored: torch.Tensor | None):
    """The test above without reading anything back to the host, so a decode step can run ahead
    of the GPU. vis [B, Tq, Tk] bool; positions [N] of the chunk (contiguous: runtime_ops.advance_on_device
    checks that); stored [B] tokens in the store or None. Returns (validity [B, N] of the chunk,
    code: 0-d int64, 0 or the first failing of OUTSIDE..PAST_COUNT in that order,
    shown and stored: 0-d int64 of the first batch row whose past count differs, else row 0;
    where the code is OUTSIDE, stored is the mask's column count)."""
    valid, code, shown = mask_verdict(vis, positions)
    return valid, *count_verdict(code, shown, stored, vis.shape[-1])


def mask_verdict(vis: torch.Tensor, positions: torch.Tensor):
    """The part of visibility_on_device that reads only the mask and the positions (so layers
    that share both share it): (validity [B, N], code: 0 or the first failing of
    OUTSIDE..PAST_DIFFERS, shown [B]: the past tokens the mask's last row shows per batch row)."""
    B, Tq, Tk = vis.shape
    N = positions.numel()
    dev = vis.device
    p0 = positions[0].to(torch.int64) if N else torch.zeros((), dtype=torch.int64, device=dev)
    cols = torch.arange(Tk, device=dev)
    chunk_cols = p0 + torch.arange(N, device=dev)
    if Tk:  # [B, Tq, N]; columns past the last are clamped (and the code says OUTSIDE)
        chunk = vis.index_select(-1, chunk_cols.clamp(0, Tk - 1))
    else:
        chunk = vis.new_zeros(B, Tq, N)
    valid = chunk[:, -1, :]
    qpos = N - Tq + torch.arange(Tq, device=dev)
    causal = torch.arange(N, device=dev)[None, :] <= qpos[:, None]
    real = valid[:, N - Tq:][..., None]  # [B, Tq, 1]: rows whose query is a real token
    past = (cols < p0)[None, None, :]
    shown = (vis[:, -1, :] & past[0]).sum(-1)  # [B]
    # bool tensors differ by ^, not !=: Inductor's value ranges (torch 2.11) fail on != of two
    # bools whose ranges it knows (a mask derived from an additive one; H100, session 41)
    failures = [
        (OUTSIDE, p0 + N > Tk),
        (NOT_CAUSAL, ((chunk ^ (valid[:, None, :] & causal)) & real).any()),
        (SEES_FUTURE, (vis & (cols >= p0 + N)[None, None, :] & real).any()),
        (PAST_DIFFERS, ((vis ^ vis[:, -1:, :]) & past & real).any()),
    ]
    return valid, first_failure(failures, dev), shown


def count_verdict(code: torch.Tensor, shown: torch.Tensor, stored: torch.Tensor | None, columns):
    """mask_verdict's code, then PAST_COUNT where the mask's past differs from the tokens the
    store holds (stored [B] or None: not checked). Returns (code, shown, stored: 0-d int64 of the
    first batch row that differs, else row 0; stored is -1 when None, and the mask's column
    count `columns` where the code is OUTSIDE)."""
    dev = shown.device
    if stored is None:  # (an empty batch shows nothing)
        shown_row = shown[0] if shown.numel() else torch.zeros((), dtype=torch.int64, device=dev)
        stored_row = torch.full((), -1, dtype=torch.int64, device=dev)
    else:
        stored = stored.to(dev, torch.int64)
        wrong = shown != stored
        row = wrong.to(torch.int64).argmax().view(1)  # the first differing row (0 when none)
        code = torch.where(code != 0, code, torch.where(wrong.any(), PAST_COUNT, 0))
        shown_row, stored_row = shown.index_select(0, row)[0], stored.index_select(0, row)[0]
    return code, shown_row, torch.where(code == OUTSIDE, columns, stored_row)


def first_failure(failures, device) -> torch.Tensor:
    """0-d int64: the code of the first (code, 0-d bool) pair that is true, 0 if none."""
    code = torch.zeros((), dtype=torch.int64, device=device)
    for c, failed in reversed(failures):
        code = torch.where(failed, c, code)
    return code


def check_visibility(vis: torch.Tensor, positions: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
    """vis [B, Tq, Tk] bool; positions [N] of the chunk; stored [B] tokens in the store or None.
    Returns the chunk's validity [B, N]; raises MaskNotEquivalent (reads the verdict back: for
    compile time and tests)."""
    valid, code, shown, held = visibility_on_device(vis, positions, stored)
    code = int(code)
    if code:
        p0 = int(positions[0]) if positions.numel() else 0
        raise MaskNotEquivalent(WHY[code].format(p0=p0, last=p0 + positions.numel() - 1, tk=vis.shape[-1],
                                                 shown=int(shown), stored=int(held)))
    return valid
