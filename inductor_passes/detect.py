"""Find attention sites on the Dynamo graph and decide, per site, rewrite or dense.

A site is anchored at an SDPA call, or at a softmax with a matmul above it (through score
ops) and a matmul below it (through casts and dropout). The strict analysis then walks
that structure; anything it cannot prove equivalent raises StayDense with a reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from . import fallback as R
from .caches import CacheUpdate, find_cache_update, same_value
from .evaluate import evaluate
from .fallback import StayDense
from .graph_ops import arg, concrete, concrete_shape, dropout_is_active, example, is_tensor_node, kind, shape_of
from .layout_probe import NotALayoutChain, canonical, grouped_heads, probe, run_chain
from .masks import MASKED_AT, MaskNotEquivalent, additive_ok, check_visibility, to_batch_rows

SCORE_KINDS = {"mul", "div", "add", "masked_fill", "where", "cast", "tanh", "reshape"}


def _keeps_rows_and_columns(node: fx.Node) -> bool:
    """A view/reshape of the scores that only splits or merges batch and head dims
    ([B*H, Tq, Tk] <-> [B, H, Tq, Tk]); the bmm spelling of attention needs it."""
    a, b = shape_of(node), shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and \
        same_value(a[-1], b[-1]) and same_value(a[-2], b[-2])


@dataclass
class MaskTerm:
    form: str  # "additive" (0 / -inf values), "hide" (True = masked), "show" (True = visible)
    node: fx.Node


@dataclass
class Site:
    kind: str  # "sdpa" or "matmul_softmax"
    output: fx.Node  # the node whose value the rewrite replaces
    reason: str | None = None
    query: fx.Node | None = None
    key: CacheUpdate | None = None
    value: CacheUpdate | None = None
    key_chain: list = field(default_factory=list)
    value_chain: list = field(default_factory=list)
    groups: int = 1
    scale: float = 1.0
    masks: list = field(default_factory=list)
    mode: str = "masked"  # "masked" | "causal" (no past) | "decode" (one query, no mask)
    internal: set = field(default_factory=set)  # nodes of the site (dead after the rewrite)

    @property
    def rewritable(self) -> bool:
        return self.reason is None


# ---- anchors ------------------------------------------------------------------------------
def _upstream_matmul(node: fx.Node, depth: int = 12) -> fx.Node | None:
    """A matmul reachable upward through element-wise ops (loose: any op) within depth."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if kind(n) == "matmul":
                return n
            nxt.extend(a for a in n.all_input_nodes if is_tensor_node(a) and a.op != "placeholder")
        frontier = nxt
    return None


def _downstream_matmul(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """Follow the softmax output through casts/dropout to the matmul that consumes it."""
    path = []
    n = node
    while True:
        users = list(n.users)
        if len(users) != 1:
            return None, path
        u = users[0]
        if kind(u) == "matmul" and u.args[0] is n:
            return u, path
        if kind(u) in ("cast", "dropout", "contiguous") or (kind(u) == "reshape" and _keeps_rows_and_columns(u)):
            path.append(u)
            n = u
            continue
        return None, path


def find_sites(gm: fx.GraphModule, example_inputs) -> list[Site]:
    sites = []
    for node in gm.graph.nodes:
        k = kind(node)
        if k == "sdpa":
            sites.append(_analyse(gm, example_inputs, node, _sdpa))
        elif k == "softmax":
            src = arg(node, 0, "input")
            if not is_tensor_node(src) or _upstream_matmul(src) is None:
                continue
            mm2, _ = _downstream_matmul(node)
            if mm2 is None:
                # attention-like but its weights are used elsewhere (or unknown consumer)
                if any(kind(u) in ("matmul", "cast", "dropout") for u in node.users):
                    sites.append(Site("matmul_softmax", node, reason=f"{R.UNRECOGNIZED}: the attention weights "
                                      f"are used outside softmax @ V"))
                continue
            sites.append(_analyse(gm, example_inputs, node, _manual))
    return sites


def _analyse(gm, example_inputs, node, fn) -> Site:
    site = Site("sdpa" if fn is _sdpa else "matmul_softmax", node)
    try:
        fn(gm, example_inputs, node, site)
    except StayDense as why:
        site.reason = why.reason
    return site


# ---- score path (manual attention) ----------------------------------------------------------
def _number(a) -> float | None:
    if isinstance(a, fx.Node):
        return None
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


def _leads_to_scores(node, depth=12) -> bool:
    return kind(node) == "matmul" or (depth > 0 and kind(node) in SCORE_KINDS and any(
        _leads_to_scores(a, depth - 1) for a in node.all_input_nodes if is_tensor_node(a)))


def _walk_scores(gm, example_inputs, softmax_in: fx.Node, site: Site) -> fx.Node:
    """From the softmax input up to the QK^T matmul; fills scale and mask terms."""
    node = softmax_in
    scale = 1.0
    while kind(node) != "matmul":
        site.internal.add(node)
        k = kind(node)
        tensors = [a for a in node.args if is_tensor_node(a)]
        if k == "cast":
            node = node.args[0]
        elif k == "reshape":
            if not _keeps_rows_and_columns(node):
                raise StayDense(R.CUSTOM_SCORE, f"reshape of the scores {node.format_node()}")
            node = node.args[0]
        elif k in ("mul", "div"):
            path = [a for a in tensors if _leads_to_scores(a)]
            if len(path) > 1:
                raise StayDense(R.CUSTOM_SCORE, f"scores combined with themselves: {node.format_node()}")
            other = [a for a in node.args if a is not (path[0] if path else None)]
            c = _number(other[0]) if len(path) == 1 and len(other) == 1 else None
            if c is None:
                raise StayDense(R.NON_CONSTANT_SCALE, node.format_node())
            if k == "div" and node.args[0] is not path[0]:
                raise StayDense(R.CUSTOM_SCORE, "constant divided by the scores")
            scale = scale * c if k == "mul" else scale / c
            node = path[0]
        elif k == "add":
            path = [a for a in tensors if _leads_to_scores(a)]
            if len(path) != 1 or len(tensors) != 2 or len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
                raise StayDense(R.CUSTOM_SCORE, f"addition {node.format_node()}")
            term = tensors[1] if tensors[0] is path[0] else tensors[0]
            site.masks.append(MaskTerm("additive", term))
            node = path[0]
        elif k == "masked_fill":
            value = _number(arg(node, 2, "value"))
            if value is None or value > MASKED_AT:
                raise StayDense(R.CUSTOM_SCORE, f"masked_fill with value {arg(node, 2, 'value')}")
            site.masks.append(MaskTerm("hide", arg(node, 1, "mask")))
            node = node.args[0]
        elif k == "where":
            cond, a, b = node.args[:3]
            if _leads_to_scores(a) and not (is_tensor_node(b) and _leads_to_scores(b)):
                keep, fill, form = a, b, "show"
            elif _leads_to_scores(b):
                keep, fill, form = b, a, "hide"
            else:
                raise StayDense(R.CUSTOM_SCORE, "torch.where without the scores")
            fv = _number(fill)
            if fv is None and is_tensor_node(fill):
                val = evaluate(gm, example_inputs, fill)
                fv = float(val.max()) if isinstance(val, torch.Tensor) and val.numel() else None
            if fv is None or fv > MASKED_AT:
                raise StayDense(R.CUSTOM_SCORE, f"torch.where filling with {fill}")
            site.masks.append(MaskTerm(form, cond))
            node = keep
        elif k == "tanh":
            raise StayDense(R.SOFT_CAPPING)
        else:
            raise StayDense(R.CUSTOM_SCORE, f"op {node.format_node()} on the scores")
    if scale <= 0:
        raise StayDense(R.NON_CONSTANT_SCALE, f"scale {scale}")
    site.scale = scale
    return node


def _manual(gm, example_inputs, softmax: fx.Node, site: Site) -> None:
    dim = arg(softmax, 1, "dim")
    nd = len(shape_of(softmax) or ())
    if dim not in (-1, nd - 1):
        raise StayDense(R.UNRECOGNIZED, f"softmax over dim {dim}")
    mm2, path = _downstream_matmul(softmax)
    for n in path:
        if kind(n) == "dropout" and dropout_is_active(n):
            raise StayDense(R.DROPOUT_IN_TRAINING)
    site.output = mm2
    site.internal |= {softmax, *path}
    mm1 = _walk_scores(gm, example_inputs, arg(softmax, 0, "input"), site)
    site.internal.add(mm1)
    q, kt, v = mm1.args[0], mm1.args[1], mm2.args[1]
    _bind_kv(site, q, kt, v, transposed_key=True)
    _decide_causality(gm, example_inputs, site, is_causal=False)


# ---- SDPA ---------------------------------------------------------------------------------
def _sdpa(gm, example_inputs, node: fx.Node, site: Site) -> None:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale", None)
    if isinstance(dropout_p, fx.Node) or float(dropout_p) > 0:
        raise StayDense(R.DROPOUT_IN_TRAINING, f"dropout_p={dropout_p}")
    if isinstance(is_causal, fx.Node) or isinstance(scale, fx.Node):
        raise StayDense(R.NON_CONSTANT_SCALE, "is_causal/scale computed in the graph")
    d = concrete(shape_of(q)[-1])
    site.scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    if mask is not None:
        dt = example(mask).dtype
        site.masks.append(MaskTerm("show" if dt == torch.bool else "additive", mask))
    _bind_kv(site, q, k, v, transposed_key=False)
    _decide_causality(gm, example_inputs, site, is_causal=bool(is_causal))


# ---- keys, values and their cache ---------------------------------------------------------
def _bind_kv(site: Site, q: fx.Node, k_operand: fx.Node, v_operand: fx.Node, transposed_key: bool) -> None:
    key, kchain = find_cache_update(k_operand)
    value, vchain = find_cache_update(v_operand)
    if key.kind != value.kind or key.seq_dim != value.seq_dim or key.value is value.value:
        raise StayDense(R.UNSUPPORTED_CACHE, "keys and values are not cached the same way")
    if key.kind != "cat" and key.positions[1:] != value.positions[1:] and not (
            key.positions[0] == "index" == value.positions[0]):
        raise StayDense(R.UNSUPPORTED_CACHE, "keys and values are written at different positions")
    gk = _probe_groups(key, kchain, k_operand, transposed_key)
    gv = _probe_groups(value, vchain, v_operand, False)
    qshape = shape_of(q)
    if qshape is None or len(qshape) not in (3, 4):
        raise StayDense(R.HEAD_LAYOUT, "query is not 3-D or 4-D")
    cshape = concrete_shape(key.value)
    B, hkv, d = cshape[0], cshape[3 - key.seq_dim], cshape[3]
    if concrete_shape(value.value) != cshape:
        raise StayDense(R.HEAD_LAYOUT, "keys and values have different shapes")
    cq = concrete_shape(q)
    hq = cq[1] if len(cq) == 4 else cq[0] // B
    if cq[-1] != d or hq % hkv:
        raise StayDense(R.HEAD_LAYOUT, f"query {cq} against cache {cshape}")
    G = hq // hkv
    # SDPA with enable_gqa may receive fewer KV heads than query heads; the product must be G
    if transposed_key or site.kind != "sdpa":
        if gk != G or gv != G:
            raise StayDense(R.HEAD_LAYOUT, f"key/value heads repeated {gk}/{gv} times for {G} query heads per KV head")
    elif gk != gv or G % gk or (gk != G and not site.output.kwargs.get("enable_gqa", False)):
        raise StayDense(R.HEAD_LAYOUT, "SDPA heads do not match")
    q_len_node = qshape[-2]
    n_new = shape_of(key.chunk)[key.seq_dim]
    if not same_value(q_len_node, n_new):
        raise StayDense(R.QUERY_NOT_CHUNK, f"{q_len_node} queries, chunk of {n_new}")
    site.query, site.key, site.value, site.key_chain, site.value_chain, site.groups = q, key, value, kchain, vchain, G
    site.internal |= set(kchain) | set(vchain)


def _probe_groups(cache: CacheUpdate, chain: list, operand: fx.Node, transposed: bool) -> int:
    shape = concrete_shape(cache.value)
    if shape is None:
        raise StayDense(R.HEAD_LAYOUT, "cache shape unknown")
    p = probe(shape)
    try:
        out = run_chain(chain, cache.value, p)
    except (NotALayoutChain, RuntimeError, TypeError) as err:
        raise StayDense(R.HEAD_LAYOUT, str(err)) from None
    canon = canonical(p, cache.seq_dim)
    if cache.prefix_read is not None:  # the chain reads the prefix the store holds
        canon = canon[:, :, :concrete_shape(cache.prefix_read)[cache.seq_dim]]
    g = grouped_heads(out, canon, transposed)
    if g is None:
        raise StayDense(R.HEAD_LAYOUT)
    return g


# ---- causality ----------------------------------------------------------------------------
def _decide_causality(gm, example_inputs, site: Site, is_causal: bool) -> None:
    q_len = concrete(shape_of(site.query)[-2])
    static = site.key.kind != "cat"
    past = 0 if static else concrete(shape_of(site.key.past)[site.key.seq_dim])
    if is_causal and site.masks:
        raise StayDense(R.CUSTOM_SCORE, "is_causal together with an explicit mask")
    if is_causal:
        if static or past != 0 or isinstance(shape_of(site.key.past)[site.key.seq_dim], torch.SymInt):
            raise StayDense(R.TOP_LEFT_CAUSAL)
        site.mode = "causal"
        return
    if not site.masks:
        if static and site.key.prefix_read is None:
            raise StayDense(R.UNMASKED_STATIC)
        if q_len != 1 or isinstance(shape_of(site.query)[-2], torch.SymInt):
            raise StayDense(R.NON_CAUSAL)
        site.mode = "decode"
        return
    site.mode = "masked"
    _check_mask_at_compile_time(gm, example_inputs, site)


def example_positions(gm, example_inputs, cache: CacheUpdate) -> torch.Tensor | None:
    pos = cache.positions
    if pos[0] == "index":
        v = evaluate(gm, example_inputs, pos[1])
        return None if v is None else v.reshape(-1).to(torch.int64)
    n = concrete(shape_of(cache.chunk)[cache.seq_dim])
    if pos[0] == "slice":
        start = concrete(pos[1])
        return None if start is None else torch.arange(start, start + n)
    past = concrete(shape_of(cache.past)[cache.seq_dim])
    return torch.arange(past, past + n)


def _check_mask_at_compile_time(gm, example_inputs, site: Site) -> None:
    """Look at the example mask: a position bias or a non-causal pattern stays dense."""
    cq = concrete_shape(site.query)
    B = concrete_shape(site.key.value)[0]
    hq = cq[1] if len(cq) == 4 else cq[0] // B
    tq = cq[-2]
    tk = concrete_shape(site.key.value)[site.key.seq_dim]
    if site.key.prefix_read is not None:  # the columns are the prefix that ends where the chunk does
        tk = concrete_shape(site.key.prefix_read)[site.key.seq_dim]
    positions = example_positions(gm, example_inputs, site.key)
    stored = _stored_at_compile_time(gm, example_inputs, site.key, positions, B)
    vis = None
    for term in site.masks:
        val = evaluate(gm, example_inputs, term.node)
        if val is None or positions is None:
            return  # not computable now: the runtime check decides
        if term.form == "additive":
            if not bool(additive_ok(val)):
                raise StayDense(R.POSITION_BIAS)
            t = val > MASKED_AT
        else:
            t = val.to(torch.bool) if term.form == "show" else ~val.to(torch.bool)
        vis = t if vis is None else (vis & t)
    try:
        check_visibility(to_batch_rows(vis, B, hq, tq, tk), positions, stored)
    except MaskNotEquivalent as err:
        raise StayDense(R.SLIDING_WINDOW, str(err)) from None


def _stored_at_compile_time(gm, example_inputs, cache: CacheUpdate, positions, batch) -> torch.Tensor | None:
    """Tokens per batch row the store will hold when this graph runs, where known: a cache
    already compressed by sphkv tells (none if this write starts a new sequence); a dense cat
    past is ingested whole; a static buffer starting a sequence holds none. A static buffer
    that dense code already wrote stays dense."""
    from .stores import store_of

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    store = store_of(example_inputs[placeholders.index(cache.past)])
    starts = positions is not None and positions.numel() > 0 and int(positions[0]) == 0
    if store is not None:
        # a write at position 0 starts a new sequence: advance empties the store first
        return torch.zeros(batch, dtype=torch.int64) if starts else store.tokens_per_row()
    if positions is None:
        return None
    if cache.kind == "cat":
        return torch.full((batch,), int(positions[0]) if positions.numel() else 0, dtype=torch.int64)
    if positions.numel() and int(positions[0]) > 0:
        raise StayDense(R.UNSUPPORTED_CACHE, "the static buffer already holds tokens written by dense code")
    return torch.zeros(batch, dtype=torch.int64)
