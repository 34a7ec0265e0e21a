"""The graph-side runtime checks of the rewrite, as plain torch functions the rewritten graph
calls: AOT autograd traces them into aten ops and Inductor fuses those into a few kernels. (As
opaque custom ops they ran eagerly: about 90 small launches per layer and decode step, 24 ms
against dense's 3.7 ms per step on the H200, session 41.)

advance: keeps a store in step with the positions the model writes (a write at position 0
starts a new sequence: pages, cursor and budget meter are reset; anything but a contiguous
append at the cursor is a failure).
mask_validity + record_validity: check at every call that the model's mask is still causal
over the cache plus padding (the tokens that entered it, dropped ones included), and turn it
into the chunk's validity vector for sphkv::attend. The first reads only the mask and the
positions, so the layers that share them share one call; the second compares the mask's past
with each layer's store.
Neither reads anything back to the host: each records its first failure in the compiled
model's checks tensor, which runtime_checks reads and raises from, rather than let the
rewrite give a silently wrong answer.
"""
from __future__ import annotations

import torch

from sphkv_compile.ops import STATE_TENSORS_PER_TIER
from sphkv_compile.rdr import meter as budget_meter

from .masks import HEADS_DIFFER, batch_rows, count_verdict, first_failure, mask_verdict
from .runtime_checks import MISPLACED, NOT_CONTIGUOUS, POSITION_BIAS, record


def _reset_where(restart: torch.Tensor, state: list[torch.Tensor], meter: torch.Tensor) -> None:
    """A new sequence where `restart` (0-d bool on the device): pages, counts, utilities, free
    lists and the budget meter back to empty, without reading `restart` on the host."""
    for i in range(0, len(state), STATE_TENSORS_PER_TIER):
        pool, utility, pages, count, free, free_top = state[i:i + STATE_TENSORS_PER_TIER]
        n = pool.shape[0]
        pages.masked_fill_(restart, -1)
        count.masked_fill_(restart, 0)
        utility.masked_fill_(restart, 0)
        free.copy_(torch.where(restart, torch.arange(n - 1, -1, -1, dtype=free.dtype, device=free.device), free))
        free_top.masked_fill_(restart, n)
    meter.copy_(torch.where(restart, budget_meter.fresh(meter), meter))


@torch.fx.node.has_side_effect  # returns nothing: keep the graph's call when dead code is removed
def advance_on_device(cursor: torch.Tensor, state: list[torch.Tensor], positions: torch.Tensor, meter: torch.Tensor,
                      checks: torch.Tensor) -> None:
    """Mutates cursor, state, meter and checks in place; reads nothing back to the host (tests run
    it on the meta device)."""
    n = positions.numel()
    if n == 0:
        return
    pos = positions.to(torch.int64)
    p0 = pos[0]
    contiguous = (pos == p0 + torch.arange(n, device=pos.device)).all()
    restart = p0 == 0
    held = cursor[0].clone()
    code = first_failure([(NOT_CONTIGUOUS, ~contiguous), (MISPLACED, ~restart & (p0 != held))], pos.device)
    record(checks, code, p0, n, held=held)
    _reset_where(restart, state, meter)
    cursor.copy_(torch.where(restart, 0, cursor) + n)


def mask_validity(vis: torch.Tensor, values_ok: torch.Tensor | None, positions: torch.Tensor, batch: int,
                  q_heads: int, q_len: int):
    """What the checks read from the mask and the positions alone, so layers sharing both share
    it (the rewrite calls it once per mask and chunk): (validity [B, N] of the chunk, code: 0 or
    the first failing of POSITION_BIAS, HEADS_DIFFER and the mask's own, shown [B]: past tokens
    the mask shows, columns: 0-d, the mask's column count)."""
    rows, heads_differ = batch_rows(vis, batch, q_heads, q_len, vis.shape[-1])
    valid, code, shown = mask_verdict(rows, positions)
    before = [(HEADS_DIFFER, heads_differ)]  # checked before the visibility, as at compile time
    if values_ok is not None:
        before.insert(0, (POSITION_BIAS, ~values_ok.to(torch.bool)))
    first = first_failure(before, vis.device)
    code = torch.where(first != 0, first, code)
    columns = torch.full((), vis.shape[-1], dtype=torch.int64, device=vis.device)
    return valid.clone(memory_format=torch.contiguous_format), code, shown, columns


@torch.fx.node.has_side_effect  # returns nothing: keep the graph's call when dead code is removed
def record_validity(code: torch.Tensor, shown: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor,
                    counts: list[torch.Tensor], batch: int, checks: torch.Tensor,
                    meter: torch.Tensor | None = None) -> None:
    """One layer's part: mask_validity's verdict, then whether the mask's past matches the tokens
    this layer's store holds; records the first failure in checks (in place). Reads nothing back
    to the host (tests run it on the meta device)."""
    # the past the mask shows: the page counts, or under RDR (which drops tokens) the meter's
    # count of tokens that entered the store
    stored = sum(c[:, 0].to(torch.int64) for c in counts) if meter is None else budget_meter.entered(meter, batch)
    code, shown_row, held = count_verdict(code, shown, stored, columns)
    n = positions.numel()
    record(checks, code, positions[0] if n else 0, n, shown=shown_row, stored=held)
