"""The compressed, paged KV store of one layer (format: docs/FORMAT.md).

Every tier owns a pool of pages [num_pages, page_size, words] of int32 records, so a page
only ever holds tokens of one tier (tier-homogeneous). Each (batch row, KV head) has, per
tier, a page list and a token count; its tokens fill slots 0..count-1 of its pages in order.
The exact tier keeps tokens in arrival order: sinks first, the recent window last, which
is all the position information decode and RDR need.

The functions here work on plain tensors so the custom ops (ops.py) and the eager
`LayerStore` share them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import packed_state
from .tiers import TierSpec, record_words, tier_codecs, tiers_arg

UTILITY_DTYPE = torch.float16  # per-token RDR utility, counted as metadata


def _max_int(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else 0


def _page_demand(state: "TierState", new_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """If the tier's counts became new_counts [B, H]: (pages per head then, pages each head needs
    beyond those it holds, [pages needed in all, the most pages one head would hold, free pages,
    the most one head needs]). The four numbers the host decides on come back in one read,
    where four would be a sync each on a GPU."""
    new_pages, need, demand = page_demand_tensors(state, new_counts)
    return new_pages, need, demand.tolist()


def demand_fits(state: "TierState", needed: int, widest: int, free: int) -> bool:
    """From a page demand read back: do the pages needed fit the free ones, and the widest
    head's pages its page table?"""
    return needed <= free and widest <= state.pages.shape[-1]


def page_demand_tensors(state: "TierState", new_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """_page_demand without the read: (pages per head, pages each head needs, int64 [4] of pages
    needed in all, the most one head would hold, the free pages, the most one head needs)."""
    return _demand(state.count, new_counts, state.free_top[0].to(torch.int64), state.page_size)


def _demand(counts: torch.Tensor, new_counts: torch.Tensor, free: torch.Tensor, page_size: int):
    """page_demand_tensors over the last two dims (heads of a tier, [B, H]); leading dims (tiers
    stacked, reserve_tiers) give one row of the four numbers each: [..., 4]."""
    new_pages = pages_for(new_counts, page_size)
    need = new_pages - pages_for(counts, page_size)
    if not need.numel():
        zero = free * 0
        return new_pages, need, torch.stack((zero, zero, free, zero), -1)
    return new_pages, need, torch.stack((need.sum((-2, -1)), new_pages.amax((-2, -1)), free, need.amax((-2, -1))), -1)


class StoreCapacityError(RuntimeError):
    """Raised when a tier's pool or page table cannot take the tokens being appended."""


@dataclass
class TierState:
    pool: torch.Tensor  # int32 [num_pages, page_size, words]
    utility: torch.Tensor  # float16 [num_pages, page_size]
    pages: torch.Tensor  # int32 [B, Hkv, max_pages], -1 where unused
    count: torch.Tensor  # int32 [B, Hkv]
    free: torch.Tensor  # int32 [num_pages]: a stack of free page ids ...
    free_top: torch.Tensor  # int32 [1]: ... of this many entries

    @staticmethod
    def allocate(batch, kv_heads, num_pages, page_size, words, max_pages, device) -> "TierState":
        state = TierState(
            pool=torch.zeros(num_pages, page_size, words, dtype=torch.int32, device=device),
            utility=torch.empty(num_pages, page_size, dtype=UTILITY_DTYPE, device=device),
            pages=torch.empty(batch, kv_heads, max_pages, dtype=torch.int32, device=device),
            count=torch.empty(batch, kv_heads, dtype=torch.int32, device=device),
            free=torch.empty(num_pages, dtype=torch.int32, device=device),
            free_top=torch.empty(1, dtype=torch.int32, device=device),
        )
        state.empty_()
        return state

    def tensors(self) -> list[torch.Tensor]:
        return [self.pool, self.utility, self.pages, self.count, self.free, self.free_top]

    def empty_(self) -> None:
        """No tokens, every page free, popped from the top so page 0 is handed out first (in
        place: a packed or CUDA-graphed state keeps its memory)."""
        num_pages = self.pool.shape[0]
        self.pages.fill_(-1)
        self.count.zero_()
        self.free.copy_(torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=self.free.device))
        self.free_top.fill_(num_pages)
        self.utility.zero_()

    @property
    def page_size(self) -> int:
        return self.pool.shape[1]

    def metadata_bytes(self) -> int:
        """Everything but the records: page tables, counts, free list, per-token utility."""
        return sum(t.numel() * t.element_size() for t in (self.utility, self.pages, self.count, self.free, self.free_top))

    def record_bytes(self) -> int:
        return self.pool.numel() * 4


# ---- encoding records ---------------------------------------------------------------------
def encode_records(spec: TierSpec, k: torch.Tensor, v: torch.Tensor, seed: int, kv_dtype: torch.dtype) -> torch.Tensor:
    """k, v [..., d] -> int32 records [..., key words + value words]."""
    if spec.exact:
        kr = k.to(kv_dtype).contiguous()
        vr = v.to(kv_dtype).contiguous()
        pad = (-kr.shape[-1] * kr.element_size()) % 4 // kr.element_size()
        if pad:
            kr = torch.nn.functional.pad(kr, (0, pad))
            vr = torch.nn.functional.pad(vr, (0, pad))
        return torch.cat((kr.view(torch.int32), vr.view(torch.int32)), dim=-1)
    kc, vc = tier_codecs(spec, k.shape[-1], seed)
    return torch.cat((kc.encode(k).words, vc.encode(v).words), dim=-1)


# Faster encoders and decoders per device type (kernels/cuda_ops.py registers the Triton ones for
# "cuda"): code that converts records outside the custom ops (RDR's re-budget) asks for them by
# the data's device.
_DEVICE_ENCODERS: dict[str, Callable] = {}
_DEVICE_DECODERS: dict[str, Callable] = {}
_DEVICE_PAGE_COPIERS: dict[str, Callable] = {}


def register_device_encoder(device_type: str, encode) -> None:
    """encode(spec, k, v, seed, kv_dtype) -> records, for k, v [..., d] on that device type."""
    _DEVICE_ENCODERS[device_type] = encode


def device_encoder(device: torch.device):
    """The registered encoder for `device`'s type, else the reference encode_records."""
    return _DEVICE_ENCODERS.get(torch.device(device).type, encode_records)


def register_device_page_copier(device_type: str, copy_pages) -> None:
    """copy_pages(pools, dst, src, owner, per_owner): pools[owner[j]][dst[j]] = pools[owner[j]][src[j]],
    every read before any write (kernels/page_copy.py), for the beam reorder's page copies."""
    _DEVICE_PAGE_COPIERS[device_type] = copy_pages


def register_device_decoder(device_type: str, decode) -> None:
    """decode(spec, records, head_dim, seed, kv_dtype) -> (k, v) float32, un-rotated, for the
    records of a compressed tier on that device type."""
    _DEVICE_DECODERS[device_type] = decode


def device_decoder(device: torch.device):
    """The registered decoder for `device`'s type, or None (then decode with the codecs)."""
    return _DEVICE_DECODERS.get(torch.device(device).type)


def split_exact(records: torch.Tensor, head_dim: int, kv_dtype: torch.dtype):
    """Exact-tier records -> (k, v) in kv_dtype."""
    half = records.shape[-1] // 2
    k = records[..., :half].contiguous().view(kv_dtype)[..., :head_dim]
    v = records[..., half:].contiguous().view(kv_dtype)[..., :head_dim]
    return k, v


def fits(state: TierState, extra_tokens: torch.Tensor) -> bool:
    """Whether `extra_tokens` [B, Hkv] more tokens fit the tier's free pages and page tables."""
    _, _, (needed, widest, free, _) = _page_demand(state, state.count.to(torch.int64) + extra_tokens.to(torch.int64))
    return demand_fits(state, needed, widest, free)


# ---- appending ----------------------------------------------------------------------------
def append_records(state: TierState, records: torch.Tensor, utility: torch.Tensor | None,
                   valid: torch.Tensor | None, tier_name: str = "") -> None:
    """Append records [B, Hkv, N, W] (rows where valid [B, Hkv, N] is False are skipped)."""
    B, H, N, W = records.shape
    ps = state.page_size
    if W != state.pool.shape[-1]:
        raise ValueError(f"tier {tier_name!r} stores {state.pool.shape[-1]} words per token, got {W}")
    dev = records.device
    if valid is None:
        valid = torch.ones(B, H, N, dtype=torch.bool, device=dev)
    old = state.count.to(torch.int64)
    new = old + valid.sum(-1)
    new_pages, need, (total, widest, top, most) = _page_demand(state, new)
    old_pages = new_pages - need
    if widest > state.pages.shape[-1]:
        raise StoreCapacityError(
            f"tier {tier_name!r}: a KV head would hold {int(new.max())} tokens, more than its page table "
            f"allows ({state.pages.shape[-1]} pages of {ps}); raise max_tokens or the budget")
    if total > top:
        raise StoreCapacityError(
            f"tier {tier_name!r}: needs {total} new pages but only {top} are free; the pool was sized for "
            f"fewer tokens (raise max_tokens) or RDR should have re-budgeted first")
    if total:
        ids = state.free[top - total:top].flip(0)  # pop: stack top first
        state.free_top.fill_(top - total)
        start = torch.cumsum(need.flatten(), 0) - need.flatten()
        k = torch.arange(most, device=dev)
        take = k < need.flatten()[:, None]
        src = (start[:, None] + k)[take]
        bh = torch.arange(B * H, device=dev)[:, None].expand(-1, most)[take]
        dst = (old_pages.flatten()[:, None] + k)[take]
        flat_pages = state.pages.view(B * H, -1)
        flat_pages[bh, dst] = ids[src]
    rank = torch.cumsum(valid.to(torch.int64), -1) - 1
    slot = old[..., None] + rank
    page_index = torch.gather(state.pages.to(torch.int64), -1, (slot // ps).clamp(0, state.pages.shape[-1] - 1))
    page = page_index[valid]
    offset = (slot % ps)[valid]
    state.pool[page, offset] = records[valid].to(torch.int32)
    if utility is not None:
        state.utility[page, offset] = utility[valid].to(UTILITY_DTYPE)
    else:
        state.utility[page, offset] = 0
    state.count.copy_(new.to(torch.int32))


def gather_tokens(state: TierState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All tokens of a tier, padded: (records [B,H,Nmax,W], utility [B,H,Nmax], valid [B,H,Nmax])."""
    B, H = state.count.shape
    ps = state.page_size
    nmax = int(state.count.max()) if state.count.numel() else 0
    slot = torch.arange(nmax, device=state.pool.device)
    valid = slot < state.count[..., None].to(torch.int64)
    pidx = torch.gather(state.pages.to(torch.int64), -1,
                        (slot // ps).clamp(max=state.pages.shape[-1] - 1).expand(B, H, nmax))
    pidx = torch.where(valid, pidx, torch.zeros_like(pidx))
    off = (slot % ps).expand(B, H, nmax)
    return state.pool[pidx, off], state.utility[pidx, off], valid


def rebuild(state: TierState, records: torch.Tensor, utility: torch.Tensor, valid: torch.Tensor, tier_name="") -> None:
    """Compaction: empty the tier, then append the given tokens densely (order kept)."""
    num_pages = state.pool.shape[0]
    state.pages.fill_(-1)
    state.count.zero_()
    state.free.copy_(torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=state.free.device))
    state.free_top.fill_(num_pages)
    append_records(state, records, utility, valid, tier_name)


def drop_newest(state: TierState, n: torch.Tensor) -> None:
    """Remove the newest n [B, Hkv] tokens of each head (they are the last slots: a tier keeps
    arrival order) and push the pages they leave empty back onto the free stack. n must not
    exceed a head's count (the caller checks). In place and without a read back: the freed page
    ids are scattered onto the stack in one pass."""
    old = state.count.to(torch.int64)
    new = old - n.to(torch.int64)
    slot_page = torch.arange(state.pages.shape[-1], device=state.pages.device)
    freed = (slot_page >= pages_for(new, state.page_size)[..., None]) & (slot_page < pages_for(old, state.page_size)[..., None])
    freed &= state.pages >= 0  # (pages are taken densely, so this only guards the stack)
    flat = freed.flatten()
    num_pages = state.free.shape[0]
    top = state.free_top.to(torch.int64)
    # the freed ids go above the stack top in page-table order; the rest write to a spare slot
    where = torch.where(flat, top + torch.cumsum(flat.to(torch.int64), 0) - 1, num_pages)
    stack = torch.cat((state.free, state.free.new_zeros(1)))
    stack.scatter_(0, where, state.pages.flatten())
    state.free.copy_(stack[:num_pages])
    state.free_top.add_(flat.sum().to(state.free_top.dtype))
    state.pages.masked_fill_(freed, -1)
    state.count.copy_(new.to(state.count.dtype))


def pages_for(tokens: torch.Tensor, page_size: int) -> torch.Tensor:
    """int64: the pages that many tokens fill densely (per element)."""
    return (tokens.to(torch.int64) + page_size - 1) // page_size


def copy_rows_pagewise(states: list[TierState], rows: torch.Tensor) -> None:
    """Row i takes row rows[i]'s records, in every state given, where every row (and KV head)
    holds as many tokens as its source: each used page of row i is overwritten by the
    same-numbered page of row rows[i]; no page changes hands, counts and free lists stay, rows
    that keep their own tokens are skipped. Beam search reorders every layer with the same
    rows, so the states go together: states with one page-table shape, page size and device
    share one nonzero and one read back of how many pages each copies (two reads per such
    group, not one per state)."""
    groups: dict[tuple, list[TierState]] = {}
    for st in states:
        groups.setdefault((tuple(st.pages.shape), st.page_size, st.pages.device), []).append(st)
    for group in groups.values():
        _copy_pages(group, rows.to(group[0].pages.device))


def _copy_pages(group: list[TierState], rows: torch.Tensor) -> None:
    ps = group[0].page_size
    B, _, P = group[0].pages.shape
    pages = torch.stack([st.pages for st in group])  # [L, B, H, P] int32
    used = pages_for(torch.stack([st.count for st in group]), ps)
    moved = (rows != torch.arange(B, device=rows.device))[None, :, None, None]
    wanted = (torch.arange(P, device=rows.device) < used[..., None]).logical_and(moved)
    layer, b, h, p = wanted.nonzero(as_tuple=True)  # sorted by state
    dst, src = pages[layer, b, h, p].to(torch.int64), pages[layer, rows[b], h, p].to(torch.int64)
    per_state = torch.bincount(layer, minlength=len(group)).tolist()
    copier = _DEVICE_PAGE_COPIERS.get(rows.device.type)
    if copier is not None:  # every state's pages in a few launches
        copier([st.pool for st in group], dst, src, layer, per_state)
        copier([st.utility for st in group], dst, src, layer, per_state)
        return
    for st, d, s in zip(group, dst.split(per_state), src.split(per_state)):
        if d.numel():
            st.pool[d] = st.pool[s]  # the right side is gathered first, so overlaps are safe
            st.utility[d] = st.utility[s]


# ---- attention from the store -------------------------------------------------------------
def attend(q: torch.Tensor, states: list[TierState], specs: list[TierSpec], *, seed: int,
           kv_dtype: torch.dtype, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
           valid_new: torch.Tensor | None = None, scale: float | None = None, obs_window: int = 0,
           accumulate: bool = False, query_chunk: int = 256,
           sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, Hq, Tq, d] over every stored token plus the current chunk.

    Stored tokens are all in the past. Their keys are read as codes (logits from the level-1
    tables and the angular recurrence); their values are decoded in the rotated domain,
    accumulated, and rotated back once per output. The chunk k_new/v_new [B, Hkv, N, d]
    (N >= Tq; the queries are its last Tq positions) is dense and attended causally;
    valid_new [B, N] marks its real tokens (False = left padding).

    sinks [Hq] (gpt-oss's learned sink logits, natural units, not scaled): one more logit per
    query head in every softmax, on no value (sink_factor).

    Returns (out [B, Hq, Tq, d], new_mass [B, Hkv, N]): new_mass is the attention mass the
    last `obs_window` queries put on each chunk token, summed over the group's query heads
    (the RDR observation window; among the tokens, sinks left out). With accumulate=True the
    same mass on stored tokens is added to their utility.
    """
    B, Hq, Tq, d = q.shape
    Hkv = states[0].count.shape[1] if states else k_new.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads cannot be grouped over {Hkv} KV heads")
    G = Hq // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5 if scale is None else scale
    N = 0 if k_new is None else k_new.shape[2]
    if N and N < Tq:
        raise ValueError(f"the chunk has {N} tokens but there are {Tq} queries; queries must be the chunk's tail")
    if N and valid_new is None:
        valid_new = torch.ones(B, N, dtype=torch.bool, device=q.device)
    gathered = [gather_tokens(s) for s in states]
    decoded = []  # per tier: (key reader, values, kind)
    value_codec = None
    for spec, (rec, _, valid) in zip(specs, gathered):
        if rec.shape[2] == 0:  # an empty tier: skip its query tables and value rotation (all of prefill)
            decoded.append(("empty", None, torch.zeros(valid.shape + (d,), dtype=work, device=q.device), valid))
            continue
        if spec.exact:
            k, v = split_exact(rec, d, kv_dtype)
            decoded.append(("exact", k.to(work), v.to(work), valid))
        else:
            kc, vc = tier_codecs(spec, d, seed)
            decoded.append(("codes", (kc, rec[..., :kc.words]), vc.decode_rotated(rec[..., kc.words:], work), valid))
            value_codec = vc
    obs_from = Tq - min(obs_window, Tq)
    new_mass = torch.zeros(B, Hkv, N, dtype=work, device=q.device)
    stored_mass = [torch.zeros(v.shape[:3], dtype=work, device=q.device) for _, _, v, _ in decoded]
    outs = []
    for s in range(0, Tq, query_chunk):
        e = min(Tq, s + query_chunk)
        rows = G * (e - s)
        qc = q[:, :, s:e].reshape(B, Hkv, rows, d).to(work)
        logits = []
        for kind, key, _, valid in decoded:
            if kind == "empty":
                continue
            lg = qc @ key.transpose(-1, -2) if kind == "exact" else key[0].logits(qc, key[1]).to(work)
            logits.append(torch.where(valid[:, :, None, :], lg * scale, torch.full_like(lg, float("-inf"))))
        if N:
            lg = qc @ k_new.to(work).transpose(-1, -2) * scale
            qpos = (N - Tq + torch.arange(s, e, device=q.device)).repeat(G)  # row -> chunk position
            vis = (torch.arange(N, device=q.device)[None, :] <= qpos[:, None])[None, None] & valid_new[:, None, None, :]
            logits.append(torch.where(vis, lg, torch.full_like(lg, float("-inf"))))
        if not logits:
            raise ValueError("nothing to attend to: the store is empty and no chunk was given")
        allg = torch.cat(logits, -1)
        p = torch.softmax(allg, dim=-1)
        # a query that sees no token (padding) gets 0, not NaN; poisoned keys still give NaN
        p = torch.where(allg.isneginf().all(-1, keepdim=True), torch.zeros_like(p), p)
        sel = (torch.arange(s, e, device=q.device) >= obs_from).repeat(G).to(work)[None, None, :, None]
        out = torch.zeros(B, Hkv, rows, d, dtype=work, device=q.device)
        out_rot = None
        start = 0
        for i, (kind, _, v, _) in enumerate(decoded):
            if kind == "empty":
                continue
            pi = p[..., start:start + v.shape[2]]
            start += v.shape[2]
            stored_mass[i] += (pi * sel).sum(2)
            if kind == "exact":
                out = out + pi @ v
            else:
                out_rot = pi @ v if out_rot is None else out_rot + pi @ v
        if out_rot is not None:
            out = out + value_codec.hadamard.inverse(out_rot)
        if N:
            pn = p[..., start:]
            new_mass += (pn * sel).sum(2)
            out = out + pn @ v_new.to(work)
        out = out.reshape(B, Hq, e - s, d)
        if sinks is not None:  # natural-unit log-sum-exp of each query's logits
            out = out * sink_factor(torch.logsumexp(allg, -1).view(B, Hq, e - s), sinks)[..., None]
        outs.append(out)
    if accumulate:
        for st, (rec, _, valid), mass in zip(states, gathered, stored_mass):
            add_utility(st, mass, valid)
    return torch.cat(outs, dim=2).to(q.dtype), new_mass


def sink_factor(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """What a sink logit s per query head leaves of attention whose logits have log-sum-exp
    lse [B, Hq, Tq]: Σ exp(logits) / (Σ exp(logits) + exp(s)) = sigmoid(lse - s). A query that
    sees no token (lse = -inf) gets 0, as without sinks, also where its sink is -inf too (a head
    without a sink), where lse - s would be nan."""
    diff = lse - sinks.to(lse.dtype)[None, :, None]
    return torch.sigmoid(torch.where(torch.isneginf(lse), float("-inf"), diff))


def add_utility(state: TierState, mass: torch.Tensor, valid: torch.Tensor) -> None:
    """utility[token] += mass for the tier's tokens in slot order (mass [B, H, Nmax])."""
    ps = state.page_size
    nmax = mass.shape[-1]
    slot = torch.arange(nmax, device=mass.device)
    pidx = torch.gather(state.pages.to(torch.int64), -1,
                        (slot // ps).clamp(max=state.pages.shape[-1] - 1).expand(*mass.shape))
    off = (slot % ps).expand(*mass.shape)
    cur = state.utility[pidx[valid], off[valid]].to(mass.dtype)
    state.utility[pidx[valid], off[valid]] = (cur + mass[valid]).to(UTILITY_DTYPE)


# ---- the eager store ----------------------------------------------------------------------
@dataclass
class LayerStore:
    """One layer's compressed KV cache with page pools per tier (grows on demand in eager use)."""

    batch: int
    kv_heads: int
    head_dim: int
    tiers: tuple[TierSpec, ...]
    kv_dtype: torch.dtype = torch.bfloat16
    page_size: int = 64
    seed: int = 0
    device: torch.device | str = "cpu"
    states: list[TierState] = field(default_factory=list)
    tokens_seen: int = 0
    # packed (allocate_packed): every tier's tensors are views of `arena`, laid out as `layout`
    # (packed_state.py); the ops then take the arena alone. None: one tensor each.
    arena: torch.Tensor | None = field(default=None, init=False)
    layout: str = field(default="", init=False)
    _packed: list = field(default_factory=list, init=False, repr=False)  # keeps the ops' view cache entry alive
    # the ops' `tiers` argument (tiers.tiers_arg), kept as one string: a compiled step then guards
    # one value, not every field of every TierSpec
    tiers_arg: str = field(default="", init=False)

    def __post_init__(self):
        if not self.states:
            self.states = [self._new_state(spec, 0, 1) for spec in self.tiers]
        self.tiers_arg = tiers_arg(self.tiers, self.layout)

    def __deepcopy__(self, memo):
        """Tensors copy with their views (the memo shares storages), so a packed copy's tier
        states are views of its own arena; the ops find them by the arena's address, so the
        copy registers them as the store that packed it did (else every op call on the copy
        would build the views again)."""
        new = memo[id(self)] = object.__new__(type(self))
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        if new.arena is not None:
            packed_state.remember(new.arena, new.layout, new._packed)
        return new

    def _new_state(self, spec, num_pages, max_pages) -> TierState:
        return TierState.allocate(self.batch, self.kv_heads, num_pages, self.page_size, self._words(spec), max_pages,
                                  self.device)

    def _words(self, spec) -> int:
        kw, vw = record_words(spec, self.head_dim, self.seed, self.kv_dtype)
        return kw + vw

    # ---- the packed state (fixed pools: what a compiled decode step takes) ---------------------
    def allocate_packed(self, sizes: list[tuple[int, int]]) -> None:
        """Empty pools of sizes[t] = (pages, pages per KV head) for tier t, all views of one arena."""
        arena, layout, states = self._new_arena([(p, self._words(spec), m) for spec, (p, m) in zip(self.tiers, sizes)])
        for st in states:
            st.empty_()
        self._adopt(arena, layout, states)

    def pack(self, current: list[TierState] | None = None) -> None:
        """Move the tiers' tensors (current, else the store's) into a new arena, contents kept."""
        current = self.states if current is None else current
        arena, layout, states = self._new_arena([(st.pool.shape[0], st.pool.shape[2], st.pages.shape[2])
                                                 for st in current])
        for old, new in zip(current, states):
            for a, b in zip(old.tensors(), new.tensors()):
                b.copy_(a)
        self._adopt(arena, layout, states)

    def _new_arena(self, tiers: list[tuple[int, int, int]]):
        """(arena, layout, its TierStates) for tiers of (pages, record words, pages per KV head);
        the records start zeroed, the rest is the caller's to fill."""
        layout = packed_state.layout_string(self.batch, self.kv_heads, self.page_size, tiers)
        arena = torch.zeros(packed_state.arena_words(layout, UTILITY_DTYPE), dtype=torch.int32, device=self.device)
        return arena, layout, packed_state.make_views(arena, layout, UTILITY_DTYPE, TierState)

    def _adopt(self, arena: torch.Tensor, layout: str, states: list) -> None:
        static = getattr(self.arena, "_dynamo_static_input_type", None)
        if static is not None:  # the old arena was marked for CUDA graphs: graphs re-record on the new one
            torch._dynamo.mark_static_address(arena, guard=static == "guarded")
        self.arena, self.layout, self._packed = arena, layout, states
        self.tiers_arg = tiers_arg(self.tiers, layout)
        self.states = list(states)
        if not torch.compiler.is_compiling():  # a store made while tracing has no address to key on yet
            packed_state.remember(arena, layout, states)

    def set_state(self, t: int, state: TierState) -> None:
        """Replace tier t's state (a grown or rebuilt pool); a packed store packs again, and
        changes nothing if that fails (out of memory)."""
        if self.arena is None:
            self.states[t] = state
            return
        self.pack(self.states[:t] + [state] + self.states[t + 1:])

    def op_state(self) -> list[torch.Tensor]:
        """The `state` argument of the custom ops: the arena, or six tensors per tier."""
        if self.arena is not None:
            return [self.arena]
        return [t for s in self.states for t in s.tensors()]

    def tier_index(self, name: str) -> int:
        for i, spec in enumerate(self.tiers):
            if spec.name == name:
                return i
        raise KeyError(f"no tier named {name!r}; tiers are {[t.name for t in self.tiers]}")

    def _reserve(self, t: int, extra_tokens: torch.Tensor) -> None:
        """Grow tier t's pool and page table so `extra_tokens` [B, H] more tokens fit."""
        reserve_tiers([(self, t, extra_tokens)])

    def grow_tier(self, t: int, num_pages: int, max_pages: int) -> None:
        """Reallocate tier t with at least num_pages pages and max_pages per head, tokens kept."""
        st = self.states[t]
        if st.pool.shape[0] >= num_pages and st.pages.shape[-1] >= max_pages:
            return
        rec, util, valid = gather_tokens(st)
        grown = self._new_state(self.tiers[t], max(num_pages, st.pool.shape[0]), max(max_pages, st.pages.shape[-1]))
        rebuild(grown, rec, util, valid, self.tiers[t].name)
        self.set_state(t, grown)

    def append(self, k: torch.Tensor, v: torch.Tensor, tier: str = "exact", valid: torch.Tensor | None = None,
               utility: torch.Tensor | None = None) -> None:
        """k, v [B, Hkv, N, d]; valid [B, N] marks real (non-padding) tokens."""
        B, H, N, _ = k.shape
        t = self.tier_index(tier)
        vmask = None if valid is None else valid[:, None, :].expand(B, H, N)
        self._reserve(t, torch.full((B, H), N, device=k.device) if vmask is None else vmask.sum(-1))
        records = encode_records(self.tiers[t], k, v, self.seed, self.kv_dtype)
        util = None if utility is None else utility
        append_records(self.states[t], records, util, vmask, self.tiers[t].name)
        if self.tiers[t].exact:
            self.tokens_seen += N

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
               utility: torch.Tensor | None = None, *, sink: int, recent: int, target: str) -> None:
        """Append a chunk [B, Hkv, N, d]: sinks and the recent window stay exact, the rest is
        encoded into tier `target` (placement.graduate)."""
        from .placement import graduate

        B, H, N, _ = k.shape
        n = torch.full((B, H), N, device=k.device) if valid is None else valid.sum(-1)[:, None].expand(B, H)
        e, t = self.tier_index("exact"), self.tier_index(target)
        self._reserve(e, n)
        self._reserve(t, n + self.states[e].count.to(torch.int64))
        graduate(self.states, list(self.tiers), k, v, valid, utility, seed=self.seed, kv_dtype=self.kv_dtype,
                 sink=sink, recent=recent, target=t)
        self.tokens_seen += N

    def attend(self, q: torch.Tensor, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
               valid_new: torch.Tensor | None = None, scale: float | None = None, obs_window: int = 0,
               accumulate: bool = False, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See store.attend: stored tokens (past) plus an optional dense chunk."""
        return attend(q, self.states, list(self.tiers), seed=self.seed, kv_dtype=self.kv_dtype, k_new=k_new,
                      v_new=v_new, valid_new=valid_new, scale=scale, obs_window=obs_window, accumulate=accumulate,
                      sinks=sinks)

    def retier(self, assign: list[torch.Tensor]) -> None:
        """Move tokens between tiers. assign[t] [B, H, count_max_t] gives, for every token now in
        tier t, its new tier index (-1 drops it). Demotions re-encode from the rotated domain;
        pages are compacted so every tier stays dense and tier-homogeneous."""
        gathered = [gather_tokens(s) for s in self.states]
        moved = [[] for _ in self.tiers]  # (records, utility, valid) per destination
        for src, ((rec, util, valid), dest) in enumerate(zip(gathered, assign)):
            for dst in range(len(self.tiers)):
                sel = valid & (dest == dst)
                if not bool(sel.any()):
                    continue
                moved[dst].append((self._convert(src, dst, rec), util, sel))
        for dst, parts in enumerate(moved):
            if not parts:
                recs = torch.zeros(self.batch, self.kv_heads, 0, self.states[dst].pool.shape[-1],
                                   dtype=torch.int32, device=self.states[dst].pool.device)
                parts = [(recs, recs.new_zeros(recs.shape[:3], dtype=UTILITY_DTYPE), recs.new_zeros(recs.shape[:3], dtype=torch.bool))]
            rec = torch.cat([p[0] for p in parts], 2)
            util = torch.cat([p[1] for p in parts], 2)
            valid = torch.cat([p[2] for p in parts], 2)
            st = self.states[dst]
            pages, widest = self._page_demand(valid)
            if pages > st.pool.shape[0] or widest > st.pages.shape[-1]:
                self.set_state(dst, self._new_state(self.tiers[dst], pages, max(1, widest)))
            rebuild(self.states[dst], rec, util, valid, self.tiers[dst].name)

    def _page_demand(self, valid: torch.Tensor) -> tuple[int, int]:
        """Pages that the tokens valid [B, H, n] fill densely: (all rows and heads, the most one
        (row, head) needs)."""
        pages = pages_for(valid.sum(-1), self.page_size)
        return int(pages.sum()), _max_int(pages)

    def select_rows(self, rows: torch.Tensor, can_grow: bool = True) -> None:
        """Batch row i takes the tokens of row rows[i] (beam search's reorder: rows may repeat
        and skip), in place, so a static cache's tensors keep their addresses. See
        select_rows_of, which does this for many layers at once."""
        select_rows_of([self], rows, can_grow)

    def _convert(self, src: int, dst: int, rec: torch.Tensor) -> torch.Tensor:
        if src == dst:
            return rec
        s, t = self.tiers[src], self.tiers[dst]
        d = self.head_dim
        if s.exact:
            k, v = split_exact(rec, d, self.kv_dtype)
            return encode_records(t, k, v, self.seed, self.kv_dtype)
        if t.exact:
            raise ValueError("a token cannot be promoted back to the exact tier: its exact values are gone")
        ks, vs = tier_codecs(s, d, self.seed)
        kt, vt = tier_codecs(t, d, self.seed)
        k_rot = ks.decode_rotated(rec[..., :ks.words])
        v_rot = vs.decode_rotated(rec[..., ks.words:])
        return torch.cat((kt.encode_rotated(k_rot), vt.encode_rotated(v_rot)), -1)

    # ---- accounting -------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Every byte the tiers hold: a packed store's whole arena, alignment included."""
        if self.arena is not None:
            return self.arena.numel() * self.arena.element_size()
        return sum(s.record_bytes() + s.metadata_bytes() for s in self.states)

    def record_bytes(self) -> int:
        return sum(s.record_bytes() for s in self.states)

    def metadata_bytes(self) -> int:
        """Everything but the records (a packed store's alignment counts here)."""
        return self.resident_bytes() - self.record_bytes()

    def token_counts(self) -> dict[str, int]:
        return {spec.name: int(s.count.sum()) for spec, s in zip(self.tiers, self.states)}

    def dense_bytes(self, bytes_per_elem: int = 2) -> int:
        """What a dense 16-bit K+V cache would hold for every token seen."""
        return 2 * self.batch * self.kv_heads * self.tokens_seen * self.head_dim * bytes_per_elem


def _row_checks(states: list[TierState], rows: torch.Tensor) -> torch.Tensor:
    """int64 [len(states), 3] on rows' device, per state after row i takes row rows[i]: does every
    row (and KV head) keep its token count (1/0), and how many pages the rows' tokens fill
    densely, in all and at most in one (row, head). States of one count shape and page size are
    computed together (beam search reorders every layer alike: a handful of torch ops, not a
    handful per state)."""
    out = torch.empty(len(states), 3, dtype=torch.int64, device=rows.device)
    groups: dict[tuple, list[int]] = {}
    for i, st in enumerate(states):
        groups.setdefault((tuple(st.count.shape), st.page_size, st.count.device), []).append(i)
    for (_, page_size, device), members in groups.items():
        counts = torch.stack([states[i].count for i in members])  # [L, B, H]
        moved = counts[:, rows.to(device)]
        pages = pages_for(moved, page_size).flatten(1)
        checks = torch.stack([(moved == counts).flatten(1).all(1).to(torch.int64), pages.sum(1), pages.amax(1)], 1)
        out[torch.tensor(members, device=rows.device)] = checks.to(rows.device)
    return out


def select_rows_of(stores: list[LayerStore], rows: torch.Tensor, can_grow: bool = True) -> None:
    """LayerStore.select_rows for every store given (beam search reorders all layers with the
    same rows). In a tier where every row keeps its token count (beam search's usual case: a
    prompt's beams are equally long) each row's pages are overwritten page by page
    (copy_rows_pagewise, for all such tiers of all stores together); otherwise the tier is
    gathered, indexed and rebuilt densely, one tier at a time. One read back checks the rows,
    every tier's counts and the pages a rebuilt tier would need. A pool too small for the
    result grows where can_grow, else StoreCapacityError is raised before any tier of any
    store is changed."""
    if not stores:
        return
    batch = stores[0].batch
    rows = torch.as_tensor(rows).to(device=stores[0].states[0].count.device, dtype=torch.int64)
    for store in stores:
        if rows.shape != (store.batch,):
            raise ValueError(f"select_rows needs {store.batch} row indices, got shape {tuple(rows.shape)}")
    safe = rows.clamp(0, batch - 1)
    tiers = [(store, t) for store in stores for t in range(len(store.states))]
    states = [store.states[t] for store, t in tiers]
    # one read back: are the rows valid; per state, do counts stay and the pages a rebuild would fill
    numbers = torch.cat([((rows >= 0) & (rows < batch)).all()[None].to(torch.int64),
                         _row_checks(states, safe).flatten()]).tolist()
    if not numbers[0]:
        raise ValueError(f"select_rows needs row indices in [0, {batch}), got {rows.tolist()}")
    checks = [numbers[1 + 3 * i:4 + 3 * i] for i in range(len(states))]
    kept = [c[0] for c in checks]
    rebuilt, grown = [], {}
    for i, ((store, t), st) in enumerate(zip(tiers, states)):  # every capacity checked before anything changes
        if kept[i]:
            continue
        rebuilt.append(i)
        need, widest = checks[i][1], checks[i][2]
        if need > st.pool.shape[0] or widest > st.pages.shape[-1]:
            if not can_grow:
                raise StoreCapacityError(
                    f"tier {store.tiers[t].name!r}: the reordered rows need {need} pages ({widest} per KV head) but "
                    f"the fixed pool has {st.pool.shape[0]} ({st.pages.shape[-1]} per KV head). Fix: a dynamic "
                    "cache (no max_cache_len), or a larger max_cache_len")
            grown[i] = (max(need, st.pool.shape[0]), max(widest, st.pages.shape[-1]))
    copy_rows_pagewise([st for i, st in enumerate(states) if kept[i]], safe)
    for i in rebuilt:  # one tier at a time: its gathered tokens are the only extra memory
        store, t = tiers[i]
        spec = store.tiers[t]
        gathered = tuple(x[safe.to(x.device)] for x in gather_tokens(store.states[t]))
        if i in grown:
            store.set_state(t, store._new_state(spec, *grown[i]))
        rebuild(store.states[t], *gathered, spec.name)


def reserve_tiers(requests: list[tuple]) -> None:
    """Grow tiers so that more tokens fit. A request is (store, tier index, extra tokens: an int,
    or [B, H] per head) or, with a fourth element, also as many tokens as that tier of the same
    store holds now on top (placement.graduate's worst case: every exact token graduating).

    A dynamic cache reserves every layer's tiers at the first layer of a step. Requests alike
    (device, page-table shape, page size, an int extra, a tier on top or not) are stacked and
    computed together, and every demand comes back in one read per device: a few dozen small
    kernels and one sync a step, where each tier of each layer took a dozen kernels."""
    groups: dict[tuple, list] = {}
    for store, t, extra, *on_top in requests:
        st = store.states[t]
        top = on_top[0] if on_top else None
        alike = extra if isinstance(extra, int) else ("per head", id(extra))
        key = (st.count.device, tuple(st.count.shape), st.page_size, alike, top is not None)
        groups.setdefault(key, []).append((store, t, extra, top))
    reads: dict[torch.device, list] = {}  # device -> [(requests, int64 [R, 4] demands)]
    for (device, _, page_size, _, _), items in groups.items():
        reads.setdefault(device, []).append((items, _stacked_demand(items, page_size)))
    for parts in reads.values():
        read = torch.cat([demand for _, demand in parts]).tolist()
        for (store, t, _, _), (pages_needed, max_pages, free, _) in zip([r for items, _ in parts for r in items], read):
            st = store.states[t]
            if not demand_fits(st, pages_needed, max_pages, free):
                store.grow_tier(t, int((st.pool.shape[0] + pages_needed) * 1.25) + 1,
                                max(max_pages, st.pages.shape[-1]) * 2)


def _stacked_demand(items: list, page_size: int) -> torch.Tensor:
    """page_demand_tensors' [needed, widest, free, most] for alike requests (reserve_tiers), one
    row each, from their counts stacked: int64 [R, 4]."""
    counts = torch.stack([store.states[t].count for store, t, _, _ in items]).to(torch.int64)
    extra = items[0][2]
    new_counts = counts + (extra if isinstance(extra, int) else extra.to(torch.int64))
    if items[0][3] is not None:
        new_counts += torch.stack([store.states[top].count for store, _, _, top in items])
    free = torch.cat([store.states[t].free_top for store, t, _, _ in items]).to(torch.int64)
    return _demand(counts, new_counts, free, page_size)[2]