"""Reading Dynamo FX nodes: one name per operation, whatever spelling the model used.

Dynamo keeps the user's spelling: `q @ k` is operator.matmul, `x.softmax(-1)` a call_method,
`F.softmax` a call_function. Detection asks `kind(node)` instead of matching each spelling.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

_FUNCTIONS = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", operator.itruediv: "div",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    torch.softmax: "softmax", F.softmax: "softmax", torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.scaled_dot_product_attention: "sdpa",
    torch.masked_fill: "masked_fill", torch.where: "where", torch.tanh: "tanh", F.tanh: "tanh",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.transpose: "transpose", torch.permute: "permute", torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze", torch.repeat_interleave: "repeat_interleave",
    operator.getitem: "getitem", operator.setitem: "setitem",
}
_METHODS = {
    "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul", "mul": "mul", "mul_": "mul",
    "div": "div", "div_": "div", "add": "add", "add_": "add", "softmax": "softmax",
    "masked_fill": "masked_fill", "masked_fill_": "masked_fill", "tanh": "tanh",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast", "type_as": "cast",
    "type": "cast",
    "transpose": "transpose", "permute": "permute", "view": "reshape", "reshape": "reshape",
    "contiguous": "contiguous", "expand": "expand", "unsqueeze": "unsqueeze",
    "repeat_interleave": "repeat_interleave", "repeat": "repeat", "clone": "contiguous",
    "index_copy_": "index_copy_", "index_put_": "index_put_", "copy_": "copy_",
    "size": "size", "dim": "size",
}
# Ops that only rearrange (or cast) a tensor; a chain of them from the cache to a matmul
# operand is checked by the layout probe (layout_probe.py).
LAYOUT_KINDS = {"transpose", "permute", "reshape", "contiguous", "expand", "unsqueeze", "repeat_interleave",
                "repeat", "getitem", "cast", "mT"}
MUTATING_KINDS = {"index_copy_", "index_put_", "setitem", "copy_"}


def kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        if node.target in _FUNCTIONS:
            return _FUNCTIONS[node.target]
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            return "mutating_op"
        return None
    if node.op == "call_method":
        if node.target == "__getitem__":
            return "getitem"
        return _METHODS.get(node.target)
    if node.op == "call_module":
        return "module"
    return None


def example(node) -> object:
    """The fake value Dynamo recorded for a node (tensor, SymInt, int ...)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value")
    return node


def concrete(value):
    """A plain int/float for an int, float or symbolic size (its hint); None when unknown."""
    if isinstance(value, fx.Node):
        value = example(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        hint = value.node.hint
        return None if hint is None else (int(hint) if isinstance(value, torch.SymInt) else float(hint))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def shape_of(node: fx.Node) -> tuple | None:
    ev = example(node)
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else None


def concrete_shape(node: fx.Node) -> tuple[int, ...] | None:
    s = shape_of(node)
    if s is None:
        return None
    out = tuple(concrete(d) for d in s)
    return None if any(d is None for d in out) else out


def dtype_of(node: fx.Node) -> torch.dtype | None:
    ev = example(node)
    return ev.dtype if isinstance(ev, torch.Tensor) else None


def is_tensor_node(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(example(value), torch.Tensor)


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call (call_method args start with self)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if is_tensor_node(n)]


def dropout_is_active(node: fx.Node) -> bool:
    """F.dropout(x, p, training, inplace): active when training and p > 0 (or unknown)."""
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training" if node.target is F.dropout else "train", True)
    if isinstance(training, fx.Node) or isinstance(p, fx.Node):
        return True
    return bool(training) and float(p) > 0
