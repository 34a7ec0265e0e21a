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

from dataclasses import dataclass, field

import torch

from .tiers import TierSpec, record_words, tier_codecs

UTILITY_DTYPE = torch.float16  # per-token RDR utility, counted as metadata


def _max_int(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else 0


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
        return TierState(
            pool=torch.zeros(num_pages, page_size, words, dtype=torch.int32, device=device),
            utility=torch.zeros(num_pages, page_size, dtype=UTILITY_DTYPE, device=device),
            pages=torch.full((batch, kv_heads, max_pages), -1, dtype=torch.int32, device=device),
            count=torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
            # popped from the top: page 0 is handed out first
            free=torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=device),
            free_top=torch.full((1,), num_pages, dtype=torch.int32, device=device),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.pool, self.utility, self.pages, self.count, self.free, self.free_top]

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


def split_exact(records: torch.Tensor, head_dim: int, kv_dtype: torch.dtype):
    """Exact-tier records -> (k, v) in kv_dtype."""
    half = records.shape[-1] // 2
    k = records[..., :half].contiguous().view(kv_dtype)[..., :head_dim]
    v = records[..., half:].contiguous().view(kv_dtype)[..., :head_dim]
    return k, v


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
    old_pages = (old + ps - 1) // ps
    new_pages = (new + ps - 1) // ps
    need = new_pages - old_pages
    total = int(need.sum())
    if (int(new_pages.max()) if new_pages.numel() else 0) > state.pages.shape[-1]:
        raise StoreCapacityError(
            f"tier {tier_name!r}: a KV head would hold {int(new.max())} tokens, more than its page table "
            f"allows ({state.pages.shape[-1]} pages of {ps}); raise max_tokens or the budget")
    top = int(state.free_top[0])
    if total > top:
        raise StoreCapacityError(
            f"tier {tier_name!r}: needs {total} new pages but only {top} are free; the pool was sized for "
            f"fewer tokens (raise max_tokens) or RDR should have re-budgeted first")
    if total:
        ids = state.free[top - total:top].flip(0)  # pop: stack top first
        state.free_top.fill_(top - total)
        start = torch.cumsum(need.flatten(), 0) - need.flatten()
        most = int(need.max())
        k = torch.arange(most, device=dev)
        take = k < need.flatten()[:, None]
        src = (start[:, None] + k)[take]
        bh = torch.arange(B * H, device=dev)[:, None].expand(-1, most)[take]
        dst = (old_pages.flatten()[:, None] + k)[take]
        flat_pages = state.pages.view(B * H, -1)
        flat_pages[bh, dst] = ids[src]
    rank = torch.cumsum(valid.to(torch.int64), -1) - 1
    slot = old[..., None] + rank
    page_index = torch.gather(state.pages.to(torch.int64), -1, (slot // ps).clamp(max=state.pages.shape[-1] - 1))
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


# ---- attention from the store -------------------------------------------------------------
def _exact_causal_hide(valid_new: torch.Tensor | None, B: int, tq: int, new_tokens: int, device) -> torch.Tensor:
    """For each (b, query i), how many of the newest exact-tier tokens it must not see."""
    if new_tokens == 0:
        return torch.zeros(B, tq, dtype=torch.int64, device=device)
    if valid_new is None:
        valid_new = torch.ones(B, new_tokens, dtype=torch.bool, device=device)
    # tokens appended after query i: valid ones at j > i (the query block is the new block's tail)
    after = valid_new.flip(-1).to(torch.int64).cumsum(-1).flip(-1) - valid_new.to(torch.int64)
    return after[:, new_tokens - tq:]


def attend(q: torch.Tensor, states: list[TierState], specs: list[TierSpec], *, seed: int,
           kv_dtype: torch.dtype, new_tokens: int = 0, valid_new: torch.Tensor | None = None,
           scale: float | None = None, query_chunk: int = 256) -> torch.Tensor:
    """Softmax attention of q [B, Hq, Tq, d] over every token in the store (reference, any device).

    Keys are read as codes (logits from the level-1 tables and the angular recurrence);
    values are decoded in the rotated domain, accumulated, and rotated back once per output.
    `new_tokens` > 0 marks the last appended block (the newest exact-tier tokens) as the
    current chunk, so the queries (the chunk's tail) attend causally within it.
    """
    B, Hq, Tq, d = q.shape
    Hkv = states[0].count.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads cannot be grouped over {Hkv} KV heads")
    G = Hq // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5 if scale is None else scale
    hide = _exact_causal_hide(valid_new, B, Tq, new_tokens, q.device)
    gathered = [gather_tokens(s) for s in states]
    outs = []
    for s in range(0, Tq, query_chunk):
        e = min(Tq, s + query_chunk)
        qc = q[:, :, s:e].reshape(B, Hkv, G * (e - s), d).to(work)
        logits, values = [], []
        value_codec = None
        for spec, state, (rec, _, valid) in zip(specs, states, gathered):
            n = rec.shape[2]
            mask = valid[:, :, None, :].expand(B, Hkv, G * (e - s), n)
            if spec.exact:
                k, v = split_exact(rec, d, kv_dtype)
                lg = qc @ k.to(work).transpose(-1, -2)
                if new_tokens:
                    count = state.count.to(torch.int64)[:, :, None, None]
                    h = hide[:, None, s:e].repeat(1, 1, G)[..., None]  # [B,1,G*tq,1]
                    mask = mask & (torch.arange(n, device=q.device) < count - h)
                values.append(("exact", v.to(work)))
            else:
                kc, vc = tier_codecs(spec, d, seed)
                wk = kc.words
                lg = kc.logits(qc, rec[..., :wk]).to(work)
                values.append(("rot", vc.decode_rotated(rec[..., wk:], work)))
                value_codec = vc
            logits.append(torch.where(mask, lg * scale, torch.full_like(lg, float("-inf"))))
        if not logits:
            raise ValueError("the store has no tiers")
        p = torch.softmax(torch.cat(logits, -1), dim=-1)
        # a query that sees no token (padding) gets 0, not NaN; poisoned keys still give NaN
        none_visible = torch.cat(logits, -1).isneginf().all(-1, keepdim=True)
        p = torch.where(none_visible, torch.zeros_like(p), p)
        out = torch.zeros(B, Hkv, G * (e - s), d, dtype=work, device=q.device)
        out_rot = None
        start = 0
        for kind, v in values:
            n = v.shape[2]
            pv = p[..., start:start + n] @ v
            start += n
            if kind == "exact":
                out = out + pv
            else:
                out_rot = pv if out_rot is None else out_rot + pv
        if out_rot is not None:
            out = out + value_codec.hadamard.inverse(out_rot)
        outs.append(out.reshape(B, Hq, e - s, d))
    return torch.cat(outs, dim=2).to(q.dtype)


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

    def __post_init__(self):
        if not self.states:
            self.states = [self._new_state(spec, 0, 1) for spec in self.tiers]

    def _new_state(self, spec, num_pages, max_pages) -> TierState:
        kw, vw = record_words(spec, self.head_dim, self.seed, self.kv_dtype)
        return TierState.allocate(self.batch, self.kv_heads, num_pages, self.page_size, kw + vw, max_pages, self.device)

    def tier_index(self, name: str) -> int:
        for i, spec in enumerate(self.tiers):
            if spec.name == name:
                return i
        raise KeyError(f"no tier named {name!r}; tiers are {[t.name for t in self.tiers]}")

    def _reserve(self, t: int, extra_tokens: torch.Tensor) -> None:
        """Grow tier t's pool and page table so `extra_tokens` [B, H] more tokens fit."""
        st, ps = self.states[t], self.page_size
        new = st.count.to(torch.int64) + extra_tokens
        pages_needed = int(((new + ps - 1) // ps - (st.count.to(torch.int64) + ps - 1) // ps).sum())
        max_pages = _max_int((new + ps - 1) // ps)
        if pages_needed <= int(st.free_top[0]) and max_pages <= st.pages.shape[-1]:
            return
        rec, util, valid = gather_tokens(st)
        grown = self._new_state(self.tiers[t], int((st.pool.shape[0] + pages_needed) * 1.25) + 1,
                                max(max_pages, st.pages.shape[-1]) * 2)
        rebuild(grown, rec, util, valid, self.tiers[t].name)
        self.states[t] = grown

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

    def attend(self, q: torch.Tensor, new_tokens: int = 0, valid_new: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
        return attend(q, self.states, list(self.tiers), seed=self.seed, kv_dtype=self.kv_dtype,
                      new_tokens=new_tokens, valid_new=valid_new, scale=scale)

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
            need = valid.sum(-1)
            pages = int(((need + self.page_size - 1) // self.page_size).sum())
            if pages > st.pool.shape[0] or _max_int((need + self.page_size - 1) // self.page_size) > st.pages.shape[-1]:
                self.states[dst] = self._new_state(self.tiers[dst], pages, max(1, _max_int((need + self.page_size - 1) // self.page_size)))
            rebuild(self.states[dst], rec, util, valid, self.tiers[dst].name)

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
        return sum(s.record_bytes() + s.metadata_bytes() for s in self.states)

    def record_bytes(self) -> int:
        return sum(s.record_bytes() for s in self.states)

    def metadata_bytes(self) -> int:
        return sum(s.metadata_bytes() for s in self.states)

    def token_counts(self) -> dict[str, int]:
        return {spec.name: int(s.count.sum()) for spec, s in zip(self.tiers, self.states)}

    def dense_bytes(self, bytes_per_elem: int = 2) -> int:
        """What a dense 16-bit K+V cache would hold for every token seen."""
        return 2 * self.batch * self.kv_heads * self.tokens_seen * self.head_dim * bytes_per_elem
