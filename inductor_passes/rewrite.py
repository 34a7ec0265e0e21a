"""Rewrite the attention sites of one KV cache into the sphkv ops.

Per cache (keys and values updated together) the graph gets:
  new inputs        the store's state tensors, a position cursor, the budget meter and the
                    key mean (the backend owns them); the runtime checks' verdict tensor
  advance           keep the store in step with the written positions (runtime_ops: plain
                    torch code, traced and fused by Inductor)
  per site:         mask_validity (mask -> chunk padding, checked; shared by the sites with
                    the same mask and positions), record_validity (the mask's past against
                    this store's count) and sphkv::attend over
                    the store plus the dense chunk, in place of the site's output; under
                    policy 'rdr' the first site also accumulates decode attention into the
                    stored tokens' utility
  the update        policy 'uniform': sphkv::update_cache (sinks + recent exact, the rest
                    encoded); policy 'rdr': sphkv::update_cache_rdr (the chunk enters within the
                    budget; a chunk that does not fit, e.g. the prefill, is allocated with the
                    rest, so nothing is staged beyond the budget)
  kv_budget         the budgeting node (sphkv_compile.rdr.node): re-budgets every
                    rebudget_every updates under 'rdr', measures token bytes against the budget
                    under both policies, counts in the meter tensor; mutating, so never dead code
and loses the dense cache: the write into a static buffer is removed, a cat result is
replaced by a zero-memory placeholder of the same shape (a 1-element tensor expanded),
which is what the graph returns for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from sphkv_compile import rdr
from sphkv_compile.key_centering import center_chunk
from sphkv_compile.head_pad import choose_stored_head_dim, options_for_stored
from sphkv_compile.ops import STATE_TENSORS_PER_TIER

from . import fallback as R
from .caches import CacheUpdate
from .detect import Site
from .fallback import StayDense
from .graph_ops import concrete, concrete_shape, dtype_of, example, kind, shape_of
from .masks import MASKED_AT
from .runtime_ops import advance_on_device, mask_validity, record_validity


@dataclass
class CacheGroup:
    key: CacheUpdate
    value: CacheUpdate
    sites: list[Site] = field(default_factory=list)
    key_input: int = -1  # placeholder index of the key past/buffer
    value_input: int = -1
    key_outputs: list[int] = field(default_factory=list)  # flat output indices holding the cat result
    value_outputs: list[int] = field(default_factory=list)
    state_inputs: list[int] = field(default_factory=list)  # placeholder indices of the store tensors
    checks_input: int = -1  # placeholder index of the compiled model's checks tensor (runtime_checks)
    shape: tuple = ()  # concrete cache shape at compile time
    chunk_len: int = 0  # tokens appended per call at compile time
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def static(self) -> bool:
        return self.key.kind != "cat"


def group_sites(sites: list[Site]) -> list[CacheGroup]:
    groups: dict[fx.Node, CacheGroup] = {}
    for s in sites:
        if s.rewritable:
            g = groups.setdefault(s.key.value, CacheGroup(s.key, s.value))
            if g.value.value is not s.value.value:
                s.reason = f"{R.UNSUPPORTED_CACHE}: one key cache read with two value caches"
                continue
            g.sites.append(s)
    return list(groups.values())


def _is_size_query(node: fx.Node) -> bool:
    return kind(node) == "size" or node.target is torch.ops.aten.sym_size.int


def check_cache_is_private(graph: fx.Graph, group: CacheGroup) -> None:
    """Every reader of the dense cache must be one of the group's sites (or a shape query,
    or, for a cat cache, the graph output that hands it back); else dense stays needed."""
    internal = set().union(*(s.internal | {s.output} for s in group.sites))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for cache in (group.key, group.value):
        holders = {cache.value} | ({cache.past, cache.mutation} if cache.mutation is not None else set())
        for h in holders:
            for u in h.users:
                if u in internal or u in holders or _is_size_query(u) or (u.op == "output" and not group.static):
                    continue
                raise StayDense(R.CACHE_ESCAPES, f"{u.format_node()}")
        if cache.mutation is None:  # a cat past may be a zero-memory placeholder: only the cat may read it
            for u in cache.past.users:
                if u is not cache.value and not _is_size_query(u):
                    raise StayDense(R.CACHE_ESCAPES, f"the past is also read by {u.format_node()}")
        if cache.mutation is not None:
            for u in cache.past.users:
                if u in internal and order[u] < order[cache.mutation]:
                    raise StayDense(R.UNSUPPORTED_CACHE, "the cache is read before it is updated")


class Rewriter:
    def __init__(self, gm: fx.GraphModule, options, tiers: str, target_tier: int):
        self.gm, self.graph, self.opts, self.tiers, self.target = gm, gm.graph, options, tiers, target_tier
        self.num_state = STATE_TENSORS_PER_TIER * len(options.tier_ladder)
        # nodes that depend only on the model's positions and masks, made once and shared by the
        # caches (layers) that read the same ones: fewer kernels per layer and step
        self._shared: dict[tuple, tuple[fx.Node, ...]] = {}

    # small graph-building helpers --------------------------------------------------------
    def _call(self, target, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def _method(self, name, *args) -> fx.Node:
        return self.graph.call_method(name, args)

    def _size(self, node: fx.Node, dim: int):
        s = shape_of(node)[dim]
        return s if isinstance(s, int) else self._method("size", node, dim)

    def _canonical(self, cache: CacheUpdate, dtype) -> fx.Node:
        x = self._method("to", cache.chunk, dtype)
        if cache.seq_dim == 1:
            x = self._method("transpose", x, 1, 2)
        return self._method("contiguous", x)

    def _padded(self, x: fx.Node, head_dim: int, stored: int) -> fx.Node:
        """x [..., head_dim] with zero columns up to the store's head dim (head_pad.py)."""
        return x if stored == head_dim else self._call(torch.nn.functional.pad, x, (0, stored - head_dim))

    def _shared_nodes(self, key: tuple, anchor: fx.Node, make) -> tuple[fx.Node, ...]:
        """The nodes made under `key` if they come before `anchor` (where the caller inserts);
        otherwise make() them anew, and share those from here on."""
        made = self._shared.get(key)
        node = made[0] if made else None
        while node is not None and node.op != "root":
            if node is anchor:
                return made
            node = node.next
        self._shared[key] = made = make()
        return made

    def _positions(self, cache: CacheUpdate, device, anchor: fx.Node) -> fx.Node:
        pos = cache.positions
        if pos[0] not in ("index", "slice"):  # a cat cache's positions come from its own past
            return self._new_positions(cache, device)
        return self._shared_nodes(("positions", str(device), *pos), anchor,
                                  lambda: (self._new_positions(cache, device),))[0]

    def _new_positions(self, cache: CacheUpdate, device) -> fx.Node:
        pos = cache.positions
        if pos[0] == "index":
            # copied where the index is made: it may be a view of a buffer the model then advances
            # in place (torchtune's KVCache writes at cache_pos[:n], then cache_pos.add_(n)), and
            # the store must see the positions the write used
            idx = pos[1]
            if idx.op == "placeholder":
                at = self.graph.inserting_before(next(n for n in self.graph.nodes if n.op != "placeholder"))
            else:
                at = self.graph.inserting_before(idx.next)  # (inserting_after would reverse the nodes)
            with at:
                flat = self._method("reshape", idx, -1)
                return self._method("clone", self._method("to", flat, torch.int64))
        if pos[0] == "slice":
            return self._call(torch.arange, pos[1], pos[2], dtype=torch.int64, device=device)
        past = self._size(cache.past, cache.seq_dim)
        n = self._size(cache.chunk, cache.seq_dim)
        return self._call(torch.arange, past, past + n if isinstance(past, int) and isinstance(n, int)
                          else self._call(__import__("operator").add, past, n), dtype=torch.int64, device=device)

    @staticmethod
    def _size_key(x):
        """A size as a key: an int, or the symbolic size a `size` node reads (each site makes its
        own node for the same dynamic size)."""
        if isinstance(x, fx.Node) and x.op == "call_method" and x.target == "size":
            return ("size", str(shape_of(x.args[0])[x.args[1]]))
        return x

    def _mask_validity(self, site: Site, positions: fx.Node, batch, q_heads, q_len) -> tuple:
        """(validity, code, shown, columns) nodes of runtime_ops.mask_validity for this site's
        mask terms and positions, shared with an earlier site that has the same ones."""
        import operator

        def make():
            vis, ok = self._visibility(site)
            out = self._call(mask_validity, vis, ok, positions, batch, q_heads, q_len)
            return tuple(self._call(operator.getitem, out, i) for i in range(4))

        sizes = tuple(self._size_key(x) for x in (batch, q_heads, q_len))
        return self._shared_nodes(("mask", tuple((t.form, t.node) for t in site.masks), positions, sizes),
                                  site.output, make)

    def _visibility(self, site: Site) -> tuple[fx.Node, fx.Node | None]:
        import operator
        vis, ok = None, None
        for term in site.masks:
            if term.form == "additive":
                t = self._call(operator.gt, term.node, MASKED_AT)
                good = self._method("all", self._call(operator.or_, self._call(operator.eq, term.node, 0),
                                                      self._call(operator.le, term.node, MASKED_AT)))
                ok = good if ok is None else self._call(operator.and_, ok, good)
            elif term.form == "show":
                t = self._method("to", term.node, torch.bool)
            else:
                t = self._call(operator.invert, self._method("to", term.node, torch.bool))
            vis = t if vis is None else self._call(operator.and_, vis, t)
        return vis, ok

    # the rewrite ---------------------------------------------------------------------------
    def rewrite(self, group: CacheGroup, index: int) -> None:
        g, opts = self.graph, self.opts
        placeholders = [n for n in g.nodes if n.op == "placeholder"]
        group.key_input = placeholders.index(group.key.past)
        group.value_input = placeholders.index(group.value.past)
        out_node = next(n for n in g.nodes if n.op == "output")
        flat_out = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
        group.key_outputs = [i for i, o in enumerate(flat_out) if o is group.key.value]
        group.value_outputs = [i for i, o in enumerate(flat_out) if o is group.value.value]
        group.shape = concrete_shape(group.key.value)
        group.chunk_len = concrete_shape(group.key.chunk)[group.key.seq_dim]
        group.dtype = dtype_of(group.key.value)
        group.device = example(group.key.value).device
        kv_dtype = str(group.dtype).replace("torch.", "")

        first_op = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(first_op):  # new inputs go after the existing ones, in order
            state = [g.placeholder(f"sphkv_store{index}_{i}") for i in range(self.num_state)]
            cursor = g.placeholder(f"sphkv_store{index}_cursor")
            meter = g.placeholder(f"sphkv_store{index}_meter")
            key_mean = g.placeholder(f"sphkv_store{index}_key_mean")
            checks = g.placeholder(f"sphkv_store{index}_checks")
        all_ph = [n for n in g.nodes if n.op == "placeholder"]
        # CompressedCache.tensors() order
        group.state_inputs = [all_ph.index(n) for n in state + [cursor, meter, key_mean]]
        group.checks_input = all_ph.index(checks)
        seq = group.key.seq_dim
        kv_heads, head_dim = group.shape[3 - seq], group.shape[3]
        # a static buffer has a maximum length: the budget is fixed, and checked here, at compile time
        max_tokens = group.shape[seq] if group.static else 0
        rdr.check_budget(opts, kv_heads, head_dim, group.dtype, max_tokens or None)
        # the store may hold the head dim zero-padded for the kernels (CompressedCache decides the same way)
        stored = choose_stored_head_dim(opts, kv_heads, head_dim, group.device, group.dtype, group.dtype,
                                        max_tokens or None)
        opts = options_for_stored(opts, head_dim, stored)
        accumulate = opts.policy == "rdr"

        sites = sorted(group.sites, key=lambda s: list(g.nodes).index(s.output))
        counts = [state[i + 3] for i in range(0, self.num_state, STATE_TENSORS_PER_TIER)]
        with g.inserting_before(sites[0].output):
            k_new = self._padded(self._canonical(group.key, group.dtype), head_dim, stored)
            v_new = self._padded(self._canonical(group.value, group.dtype), head_dim, stored)
            positions = self._positions(group.key, group.device, sites[0].output)
            self._call(advance_on_device, cursor, state, positions, meter, checks)
        valid = mass = last = first_query = first_scale = None
        for site in sites:
            with g.inserting_before(site.output):
                q = site.query
                batch = self._size(group.key.chunk, 0)
                q_len = self._size(q, -2)
                if len(shape_of(q)) == 3:  # [B*Hq, Tq, d] (bmm form) -> [B, Hq, Tq, d]
                    q_heads = concrete(shape_of(q)[0]) // group.shape[0]
                    q = self._method("reshape", q, batch, q_heads, q_len, self._size(q, 2))
                else:
                    q_heads = self._size(q, 1)
                q = self._padded(q, head_dim, stored)
                if first_query is None:  # RDR's key gain: the queries of the first site reading the cache
                    first_query, first_scale = q, float(site.scale)
                if site.masks:
                    v, code, shown, columns = self._mask_validity(site, positions, batch, q_heads, q_len)
                    self._call(record_validity, code, shown, columns, positions, counts, batch, checks,
                               meter if opts.policy == "rdr" else None)
                    valid = v if valid is None else valid
                    site_valid = v
                else:
                    site_valid = None
                if site is sites[0] and opts.center_keys:
                    # stored keys are k - μ (key_centering.py): μ from the first site's real tokens
                    k_new = self._call(center_chunk, key_mean, k_new, positions, site_valid, int(opts.sink))
                res = self._call(torch.ops.sphkv.attend.default, q, state, k_new, v_new, site_valid, self.tiers,
                                 opts.seed, kv_dtype, float(site.scale), int(opts.utility_window), accumulate)
                accumulate = False  # once per cache: two sites reading it must not count twice
                out = self._call(__import__("operator").getitem, res, 0)
                mass = self._call(__import__("operator").getitem, res, 1) if mass is None else mass
                if stored != head_dim:
                    out = self._method("contiguous", self._call(__import__("operator").getitem, out,
                                                                (Ellipsis, slice(0, head_dim))))
                out = self._method("to", out, dtype_of(site.output))
                if len(shape_of(site.output)) == 3:
                    out = self._method("flatten", out, 0, 1)
            site.output.replace_all_uses_with(out)
            last = out
        budget = float(opts.budget or 0.0)
        with g.inserting_after(last):
            if opts.policy == "rdr":
                update = self._call(torch.ops.sphkv.update_cache_rdr.default, state, meter, cursor, k_new, v_new, valid,
                                    mass, self.tiers, opts.seed, kv_dtype, int(opts.sink), int(opts.recent), budget,
                                    max_tokens, int(opts.rebudget_every),
                                    first_query if opts.distortion == "logit" else None, first_scale,
                                    int(opts.obs_window))
            else:
                update = self._call(torch.ops.sphkv.update_cache.default, state, k_new, v_new, valid, mass, self.tiers,
                                    opts.seed, kv_dtype, int(opts.sink), int(opts.recent), self.target)
        with g.inserting_after(update):
            self._call(torch.ops.sphkv.kv_budget.default, state, meter, cursor, self.tiers, opts.seed, kv_dtype,
                       stored, int(opts.sink), int(opts.recent), opts.policy, budget, max_tokens,
                       int(opts.rebudget_every))
        self._drop_dense(group, sites)

    def _drop_dense(self, group: CacheGroup, sites: list[Site]) -> None:
        g = self.graph
        work = [s.output for s in sites]
        keep = {group.key.value, group.value.value, group.key.past, group.value.past}
        while work:
            n = work.pop()
            if n.users or n.op in ("placeholder", "output") or n in keep or n.graph is not g:
                continue
            if kind(n) in ("index_copy_", "index_put_", "setitem", "copy_", "mutating_op"):
                continue
            inputs = n.all_input_nodes
            g.erase_node(n)
            work.extend(inputs)
        for cache in (group.key, group.value):
            if cache.mutation is not None:
                if cache.mutation.users:
                    raise StayDense(R.CACHE_ESCAPES, f"{list(cache.mutation.users)}")
                g.erase_node(cache.mutation)
            elif cache.value.users:
                with g.inserting_before(cache.value):
                    sizes = [self._size(cache.chunk, d) if d != cache.seq_dim else None for d in range(4)]
                    sp = shape_of(cache.value)[cache.seq_dim]
                    sizes[cache.seq_dim] = sp if isinstance(sp, int) else self._call(
                        __import__("operator").add, self._size(cache.past, cache.seq_dim),
                        self._size(cache.chunk, cache.seq_dim))
                    zero = self._call(torch.zeros, (), dtype=dtype_of(cache.value), device=example(cache.value).device)
                    placeholder = self._method("expand", zero, *sizes)
                cache.value.replace_all_uses_with(placeholder)
                g.erase_node(cache.value)
            else:
                g.erase_node(cache.value)
