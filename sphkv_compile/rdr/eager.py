"""RDR for eager LayerStore users: the same in-place update, with pools grown on demand.

    apply(store, k, v, ..., budget_bytes=...)           one layer, its own budget
    apply_layers(stores, ks, vs, ..., budget_bytes=...)  one budget shared by all layers
"""
from __future__ import annotations

import torch

from ..store import LayerStore
from .allocate import allocate
from .budget import pool_pages
from .costs import choice_table
from .update import apply_choice, collect, headroom_bytes, rdr_update, token_bytes


def ensure_capacity(store: LayerStore, budget_bytes: int, *, protected: int, tokens: int,
                    distortion: str = "unit") -> None:
    """Grow the pools (never shrink them) to the capacities of the budget (budget.pool_pages):
    what they hold stays within the budget plus the page slack. protected: exact tokens per KV
    head (sink + recent + rebudget_every); tokens: per KV head, what the budget is a fraction of;
    distortion: the option the pools' prior follows."""
    held = [s.pool.shape[0] // store.batch for s in store.states]
    sizes = pool_pages(store.tiers, budget_bytes, store.batch, store.kv_heads, store.head_dim, store.page_size,
                       seed=store.seed, kv_dtype=store.kv_dtype, protected=protected, tokens=tokens, at_least=held,
                       distortion=distortion)
    for t, (num_pages, max_pages) in enumerate(sizes):
        store.grow_tier(t, num_pages, max_pages)


def _fit_any_allocation(store: LayerStore, budget_bytes: int, incoming: int) -> None:
    """apply_layers: pools in which any allocation of the shared budget fits (one budget's worth
    of records per tier and layer: not bounded by the budget, docs/FORMAT.md), and room for
    `incoming` more exact tokens per head."""
    table = choice_table(tuple(store.tiers), store.head_dim, store.seed, store.kv_dtype)
    ps, B, H = store.page_size, store.batch, store.kv_heads
    for t, nbytes in enumerate(table.bytes[:-1]):
        tokens = budget_bytes // nbytes
        if t == table.exact_index:
            tokens = max(tokens, int(store.states[t].count.max()) + incoming)
        store.grow_tier(t, B * (-(-tokens // ps) + H), max(1, -(-tokens // ps)))


def apply(store: LayerStore, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
          utility: torch.Tensor | None = None, *, budget_bytes: int, sink: int, recent: int,
          rebudget_every: int, key_gain: torch.Tensor | None = None) -> bool:
    """rdr_update on an eager store (k, v [B, Hkv, N, d]); True if it re-budgeted. The pools
    are sized for the budget of the tokens seen after this chunk."""
    ensure_capacity(store, budget_bytes, protected=sink + recent + rebudget_every,
                    tokens=store.tokens_seen + k.shape[2], distortion="unit" if key_gain is None else "logit")
    did = rdr_update(store.states, list(store.tiers), k, v, valid, utility, seed=store.seed, kv_dtype=store.kv_dtype,
                     sink=sink, recent=recent, budget_bytes=budget_bytes, rebudget_every=rebudget_every,
                     key_gain=key_gain)
    store.tokens_seen += k.shape[2]
    return did


def apply_layers(stores: list[LayerStore], ks, vs, valid=None, utilities=None, *, budget_bytes: int, sink: int,
                 recent: int, rebudget_every: int, key_gains=None) -> bool:
    """One budget (bytes per batch row) shared by every layer: heads and layers compete for it.
    key_gains: per layer [B, Hkv] or None (costs.distortion)."""
    s0 = stores[0]
    table = choice_table(tuple(s0.tiers), s0.head_dim, s0.seed, s0.kv_dtype)
    B, H, N, d = ks[0].shape
    for st in stores:
        _fit_any_allocation(st, budget_bytes, N)
    arriving = torch.full((B,), N, dtype=torch.int64, device=ks[0].device) if valid is None \
        else valid.to(torch.int64).sum(-1)
    after = sum(token_bytes(st.states, table) for st in stores) + len(stores) * arriving * H * table.exact_bytes
    utilities = utilities if utilities is not None else [None] * len(stores)
    if bool((after <= budget_bytes).all()):
        for st, k, v, u in zip(stores, ks, vs, utilities):
            rdr_update(st.states, list(st.tiers), k, v, valid, u, seed=st.seed, kv_dtype=st.kv_dtype, sink=sink,
                       recent=recent, budget_bytes=1 << 62, rebudget_every=rebudget_every)
            st.tokens_seen += N
        return False
    gains = key_gains if key_gains is not None else [None] * len(stores)
    tokens = [collect(st.states, list(st.tiers), table, k, v, valid, u, head_dim=d, seed=st.seed,
                      kv_dtype=st.kv_dtype, sink=sink, recent=recent, key_gain=g)
              for st, k, v, u, g in zip(stores, ks, vs, utilities, gains)]
    C = len(table.bytes)
    flat = [t.distortion.reshape(B, -1, C) for t in tokens]
    target = budget_bytes - len(stores) * headroom_bytes(H, rebudget_every, table)
    D = torch.cat(flat, 1)
    choice = allocate(D, torch.tensor(table.bytes, device=D.device),
                      torch.full((B,), float(max(target, 0)), device=D.device))
    for st, tok, ch in zip(stores, tokens, torch.split(choice, [f.shape[1] for f in flat], 1)):
        apply_choice(st.states, list(st.tiers), tok, ch.reshape(tok.distortion.shape[:3]), head_dim=d, seed=st.seed,
                     kv_dtype=st.kv_dtype)
        st.tokens_seen += N
    return True
