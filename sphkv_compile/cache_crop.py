"""Removing a compressed layer's newest tokens (Cache.crop): assisted and prompt-lookup decoding
drop the draft tokens the model rejected.

Tokens held as codes cannot be removed by position, so a crop is possible only while the tokens
it removes are the newest entries of the exact tier, which keeps arrival order:
- policy 'uniform': the exact tier is the sinks, then the newest tokens (graduation takes the
  oldest after the sinks), so every exact token past the sinks can go once any token is coded,
  and every token before that;
- policy 'rdr': re-budgets keep older exact tokens too, but never demote the last `recent` entries
  of the exact tier, and nothing else moves between them. So the newest run of positions that are
  the exact tier's last entries grows by what each update appends and is cut to `recent` by a
  re-budget; it is at least min(run at the last crop + tokens entered since, recent). The meter
  counts the tokens entered per row on the device; the run at the last crop is kept per row on
  the layer (crop_base), so nothing needs counting inside compiled steps.
"""
from __future__ import annotations

import torch

from .rdr import meter as budget_meter
from .store import drop_newest


def tokens_to_remove(layer, argument: int) -> int:
    """How many newest tokens crop(argument) removes: transformers 5.25 passes minus that count;
    earlier 5.x releases passed the length to keep (a positive number)."""
    if argument >= 0:
        return max(0, layer.tokens() - argument) if argument else 0
    return -argument


def removable_newest(layer) -> torch.Tensor:
    """How many newest tokens every (row, KV head) of the layer can lose, at the fewest (a 0-dim
    tensor, not read back: SphkvCache.crop reads all layers' at once)."""
    states, e = layer.store.states, layer.store.tier_index("exact")
    exact = states[e].count.to(torch.int64)
    if layer.options.policy == "rdr":
        # a decode step replayed from a CUDA graph that could not store its token (the meter's
        # lost count) broke the run the meter counts: nothing is sure to be removable then
        lost = layer.meter[budget_meter.LOST] > 0
        entered = budget_meter.entered(layer.meter, layer.store.batch)
        return torch.where(lost, 0, torch.minimum(_newest_run(layer, entered)[:, None], exact).min())
    coded = sum(s.count.to(torch.int64) for t, s in enumerate(states) if t != e)
    return torch.where(coded > 0, exact - layer.options.sink, exact).min()


def _newest_run(layer, entered: torch.Tensor) -> torch.Tensor:
    """Policy 'rdr', per row [B]: the newest positions that are surely the exact tier's last
    entries (entered: the meter's tokens entered per row)."""
    run, entered_then = layer.crop_base if layer.crop_base is not None else (torch.zeros_like(entered),) * 2
    return torch.clamp(run + entered - entered_then, max=layer.options.recent)


def drop(layer, n: int) -> None:
    """Remove the newest n tokens of every row (checked against removable_newest first), and
    move the layer's token counts back by n."""
    exact = layer.store.states[layer.store.tier_index("exact")]
    if layer.options.policy == "rdr":
        entered = budget_meter.entered(layer.meter, layer.store.batch)
        run = _newest_run(layer, entered)
        entered.sub_(n)  # (only policy 'rdr' counts the tokens entered)
        layer.crop_base = (run - n, entered.clone())
    drop_newest(exact, torch.full_like(exact.count, n))
    if layer.max_cache_len is not None:
        layer.cumulative_length.sub_(n)
    else:
        layer.advance_dynamic(-n)
        if layer.seen == 0:  # emptied: the next chunk is a prefill again (dense SDPA over itself)
            layer.stored_any = False
    layer.reserved_for = None


def reorder_rows(layer, rows: torch.Tensor) -> None:
    """Beam search moved the layer's rows: the crop base follows them."""
    if layer.crop_base is not None:
        layer.crop_base = tuple(t[rows.to(t.device)] for t in layer.crop_base)
