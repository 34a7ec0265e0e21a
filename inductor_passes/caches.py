"""Find the KV-cache update that feeds a key or value operand of attention.

From the operand we walk up through layout ops (graph_ops.LAYOUT_KINDS) to the tensor that
holds the whole cache, and classify how it was updated:
  - "cat":          torch.cat([past, new], dim=seq)              (DynamicCache, nanoGPT)
  - "index_copy":   buf.index_copy_(seq, pos, new)               (StaticCache)
  - "index_put":    buf.index_put_((.., pos), new)               (gpt-fast)
  - "slice_assign": buf[:, :, pos] = new or buf[:, :, a:b] = new (preallocated buffers)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .fallback import CROSS_ATTENTION, UNSUPPORTED_CACHE, StayDense
from .graph_ops import LAYOUT_KINDS, arg, is_tensor_node, kind, shape_of


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


def _seq_index(index, ndim: int):
    """An index tuple (None/slice(None) everywhere except one dim) -> (dim, entry)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        return None
    picked = [(d, i) for d, i in enumerate(index) if not (i is None or (isinstance(i, slice) and i == slice(None)))]
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
        picked = _seq_index(m.args[1], ndim)
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
        return _static_update(source), chain
    raise StayDense(CROSS_ATTENTION, f"the operand comes from {source.name}")
