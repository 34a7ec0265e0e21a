"""Find the KV-cache update that feeds a key or value operand of attention.

From the operand we walk up through layout ops (graph_ops.LAYOUT_KINDS) to the tensor that
holds the whole cache, and classify how it was updated:
  - "cat":          torch.cat([past, new], dim=seq)              (DynamicCache, nanoGPT)
  - "index_copy":   buf.index_copy_(seq, pos, new)               (StaticCache)
  - "index_put":    buf.index_put_((.., pos), new)               (gpt-fast)
  - "slice_assign": buf[:, :, pos] = new or buf[:, :, a:b] = new (preallocated buffers)
A static buffer may be read whole (a mask hides its unfilled slots) or as the prefix that ends
where the write ends, buf[:, :a + n] (Meta's Llama reference code); a slice of the batch dim
that covers the whole batch counts as no slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from .fallback import CROSS_ATTENTION, UNSUPPORTED_CACHE, StayDense
from .graph_ops import LAYOUT_KINDS, arg, concrete_shape, is_tensor_node, kind, shape_of


@dataclass
class CacheUpdate:
    kind: str
    value: fx.Node  # the node whose value is the whole (updated) cache
    past: fx.Node  # cat: the past input; static: the buffer placeholder
    chunk: fx.Node  # the new tokens, laid out like the cache
    seq_dim: int  # 1 ([B, T, H, d]) or 2 ([B, H, T, d])
    positions: tuple  # ("index", node) | ("slice", start, stop) | ("cat",)
    mutation: fx.Node | None = None
    readers: set = field(default_factory=set)  # nodes that read the cache value directly
    prefix_read: fx.Node | None = None  # the getitem reading buf[:, :end] (end = the write's end)


def _layout_input(node: fx.Node) -> fx.Node | None:
    """The tensor a layout node rearranges (None if the node mixes in other tensors)."""
    src = node.args[0] if node.args else None
    if not is_tensor_node(src):
        return None
    others = [a for a in node.all_input_nodes if a is not src and is_tensor_node(a)]
    return None if others else src


def walk_to_cache(operand: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow layout ops up from an attention operand; return (source node, chain from the
    source's first consumer down to the operand)."""
    chain = []
    node = operand
    while kind(node) in LAYOUT_KINDS:
        src = _layout_input(node)
        if src is None:
            break
        chain.append(node)
        node = src
    return node, list(reversed(chain))


def _norm_dim(d, ndim) -> int | None:
    return d + ndim if isinstance(d, int) and d < 0 else (d if isinstance(d, int) else None)


def _from_start(entry) -> bool:
    """Is an index entry a unit-step slice from 0 (:, :n, 0:n)?"""
    return isinstance(entry, slice) and entry.start in (None, 0) and entry.step in (None, 1)


def _whole(entry, size) -> bool:
    """Does an index entry take a whole dim of this size (None, :, 0:size)?"""
    if entry is None or (isinstance(entry, slice) and entry == slice(None)):
        return True
    return _from_start(entry) and isinstance(entry.stop, int) and isinstance(size, int) and entry.stop >= size


def _seq_index(index, ndim: int, shape=None):
    """An index tuple (whole dims everywhere except one) -> (dim, entry)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        return None
    shape = shape or (None,) * ndim
    picked = [(d, i) for d, i in enumerate(index) if not _whole(i, shape[d] if d < len(shape) else None)]
    if len(picked) != 1 or len(index) > ndim:
        return None
    return picked[0]


def _static_update(buf: fx.Node) -> CacheUpdate:
    ndim = len(shape_of(buf) or ())
    muts = [u for u in buf.users if kind(u) in ("index_copy_", "index_put_", "setitem", "copy_")
            and u.args and u.args[0] is buf]
    if len(muts) != 1:
        raise StayDense(UNSUPPORTED_CACHE, f"buffer {buf.name} is written {len(muts)} times in one forward")
    m = muts[0]
    k = kind(m)
    if k == "index_copy_":
        dim, pos, new = _norm_dim(arg(m, 1, "dim"), ndim), arg(m, 2, "index"), arg(m, 3, "source")
        positions = ("index", pos)
    elif k == "index_put_":
        picked = _seq_index(tuple(arg(m, 1, "indices")), ndim)
        if picked is None or not is_tensor_node(picked[1]):
            raise StayDense(UNSUPPORTED_CACHE, "index_put_ with more than one index tensor")
        dim, positions, new = picked[0], ("index", picked[1]), arg(m, 2, "values")
        if arg(m, 3, "accumulate", False):
            raise StayDense(UNSUPPORTED_CACHE, "index_put_ with accumulate=True")
    elif k == "setitem":
        picked = _seq_index(m.args[1], ndim, concrete_shape(buf))
        if picked is None:
            raise StayDense(UNSUPPORTED_CACHE, "slice assignment into more than one dimension")
        dim, entry = picked
        new = m.args[2]
        if is_tensor_node(entry):
            positions = ("index", entry)
        elif isinstance(entry, slice) and entry.step in (None, 1) and entry.stop is not None:
            positions = ("slice", entry.start or 0, entry.stop)
        else:
            raise StayDense(UNSUPPORTED_CACHE, f"slice assignment with index {entry!r}")
    else:
        raise StayDense(UNSUPPORTED_CACHE, "copy_ into the whole buffer")
    if dim not in (1, 2) or ndim != 4 or not is_tensor_node(new):
        raise StayDense(UNSUPPORTED_CACHE, f"{ndim}-D cache written along dim {dim}")
    return CacheUpdate(k.rstrip("_").replace("setitem", "slice_assign"), buf, buf, new, dim, positions, m)


def find_cache_update(operand: fx.Node) -> tuple[CacheUpdate, list[fx.Node]]:
    source, chain = walk_to_cache(operand)
    k = kind(source)
    if k == "cat":
        tensors = arg(source, 0, "tensors")
        ndim = len(shape_of(source) or ())
        dim = _norm_dim(arg(source, 1, "dim", 0), ndim)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or ndim != 4 or dim not in (1, 2):
            raise StayDense(UNSUPPORTED_CACHE, "torch.cat of other than [past, new] along a 4-D sequence dim")
        past, new = tensors
        if not (isinstance(past, fx.Node) and past.op == "placeholder"):
            raise StayDense(UNSUPPORTED_CACHE, "the past of a cat cache is not a graph input")
        return CacheUpdate("cat", source, past, new, dim, ("cat",)), chain
    if k in ("index_copy_", "index_put_") and source.args and isinstance(source.args[0], fx.Node) \
            and source.args[0].op == "placeholder":
        return _static_update(source.args[0]), chain
    if source.op == "placeholder" and any(kind(u) in ("index_copy_", "index_put_", "setitem", "copy_")
                                          for u in source.users):
        update = _static_update(source)
        if chain and kind(chain[0]) == "getitem" and chain[0].args[0] is source:
            update.prefix_read = _prefix_read(update, chain[0])
        return update, chain
    raise StayDense(CROSS_ATTENTION, f"the operand comes from {source.name}")


def _prefix_read(update: CacheUpdate, read: fx.Node) -> fx.Node | None:
    """read = buf[...] right after the write: None when it takes the whole buffer (then the
    chain's probe judges it); the node when it is the prefix that ends where the write ends;
    otherwise the cache is read in a way the store cannot follow (a window, a batch subset)."""
    index = read.args[1] if isinstance(read.args[1], tuple) else (read.args[1],)
    shape = concrete_shape(update.past) or ()
    if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
        return None  # a layout step (None inserts a dim, as repeat_kv does): the probe judges it
    seq = update.seq_dim
    for d, entry in enumerate(index):
        if d != seq and not _whole(entry, shape[d]):
            raise StayDense(UNSUPPORTED_CACHE, f"the cache is read in part along dim {d}: {read.format_node()}")
    entry = index[seq] if seq < len(index) else None
    if _whole(entry, shape[seq]):
        return None
    if not _from_start(entry):
        raise StayDense(UNSUPPORTED_CACHE, f"the cache is read as {read.format_node()} (a window?)")
    if update.positions[0] != "slice" or not same_value(entry.stop, update.positions[2]):
        raise StayDense(UNSUPPORTED_CACHE, f"the cache is read up to {entry.stop}, not up to where it is written "
                                           f"({update.positions[2] if update.positions[0] == 'slice' else 'positions'})")
    return read


def same_value(a, b) -> bool:
    """Two sizes (ints, SymInts or FX nodes holding one) that are equal for every input the
    graph accepts: the same int, or symbolic expressions whose difference simplifies to 0."""
    def expr(x):
        if isinstance(x, fx.Node):
            x = x.meta.get("example_value")
        if isinstance(x, torch.SymInt):
            return x.node.expr
        return x if isinstance(x, int) else None

    ea, eb = expr(a), expr(b)
    if ea is None or eb is None:
        return False
    if ea == eb:
        return True
    if isinstance(ea, int) and isinstance(eb, int):
        return False
    return sympy.simplify(sympy.sympify(ea) - sympy.sympify(eb)) == 0
