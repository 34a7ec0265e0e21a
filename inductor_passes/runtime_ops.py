"""The graph-side runtime checks of the rewrite, as custom ops (sphkv_graph::*).

advance: keeps a store in step with the positions the model writes (a write at position 0
starts a new sequence: pages, cursor and budget meter are reset; anything but a contiguous
append raises).
chunk_validity: checks at every call that the model's mask is still causal over the cache
plus padding (the tokens that entered it, dropped ones included), and turns it into the chunk's validity vector for sphkv::attend.
Both raise rather than let the rewrite give a silently wrong answer.
"""
from __future__ import annotations

import torch

from sphkv_compile.ops import STATE_TENSORS_PER_TIER
from sphkv_compile.rdr import meter as budget_meter

from .masks import MaskNotEquivalent, additive_ok, check_visibility, to_batch_rows


class SphkvCacheError(RuntimeError):
    pass


def _reset(state: list[torch.Tensor]) -> None:
    for i in range(0, len(state), STATE_TENSORS_PER_TIER):
        pool, utility, pages, count, free, free_top = state[i:i + STATE_TENSORS_PER_TIER]
        n = pool.shape[0]
        pages.fill_(-1)
        count.zero_()
        utility.zero_()
        free.copy_(torch.arange(n - 1, -1, -1, dtype=free.dtype, device=free.device))
        free_top.fill_(n)


@torch.library.custom_op("sphkv_graph::advance", mutates_args=("cursor", "state", "meter"))
def advance(cursor: torch.Tensor, state: list[torch.Tensor], positions: torch.Tensor, meter: torch.Tensor) -> None:
    n = positions.numel()
    if n == 0:
        return
    p0 = int(positions[0])
    if not torch.equal(positions.to(torch.int64).cpu(), torch.arange(p0, p0 + n)):
        raise SphkvCacheError(f"sphkv: the cache is written at positions {positions.tolist()}; the compressed store "
                              f"supports contiguous appends only")
    if p0 == 0:
        _reset(state)
        cursor.zero_()
        budget_meter.reset(meter)
    elif p0 != int(cursor[0]):
        held = int(cursor[0])
        why = ("a compressed cache cannot be rewound or forked (start a new sequence at position 0)" if held else
               "the positions before it went into the dense cache through a graph sphkv did not rewrite (report() "
               "after that call said why), such as a transformers model's prefill: a transformers model goes "
               "through sphkv_compile.optimize(model)")
        raise SphkvCacheError(f"sphkv: the cache is written at position {p0} but the compressed store holds positions "
                              f"0..{held - 1}; {why}")
    cursor.add_(n)


@advance.register_fake
def _(cursor, state, positions, meter) -> None:
    return None


@torch.library.custom_op("sphkv_graph::chunk_validity", mutates_args=())
def chunk_validity(vis: torch.Tensor, values_ok: torch.Tensor | None, positions: torch.Tensor,
                   counts: list[torch.Tensor], batch: int, q_heads: int, q_len: int,
                   meter: torch.Tensor | None = None) -> torch.Tensor:
    if values_ok is not None and not bool(values_ok):
        raise MaskNotEquivalent("sphkv: an additive attention mask holds values other than 0 and -inf "
                                "(a position bias); compile this model without sphkv for this site", bias=True)
    rows = to_batch_rows(vis, batch, q_heads, q_len, vis.shape[-1])
    # the past the mask shows: the page counts, or under RDR (which drops tokens) the meter's
    # count of tokens that entered the store
    stored = sum(c[:, 0].to(torch.int64) for c in counts) if meter is None else budget_meter.entered(meter)
    try:
        valid = check_visibility(rows, positions, stored)
    except MaskNotEquivalent as err:
        raise MaskNotEquivalent(f"sphkv: the attention mask is no longer equivalent to the rewrite: {err}") from None
    return valid.clone(memory_format=torch.contiguous_format)


@chunk_validity.register_fake
def _(vis, values_ok, positions, counts, batch, q_heads, q_len, meter=None):
    return vis.new_empty((batch, positions.shape[0]), dtype=torch.bool)
