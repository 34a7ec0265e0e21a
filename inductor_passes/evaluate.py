"""Evaluate a side-effect-free part of the Dynamo graph on the example inputs.

Used at compile time to look at mask values (is an additive term a 0/-inf mask or a
position bias? is the mask causal or a sliding window?). Only subgraphs without mutation,
and not reading a tensor the graph mutates, are evaluated; otherwise the answer is None
and the runtime check alone decides.
"""
from __future__ import annotations

import torch
from torch import fx

from .graph_ops import MUTATING_KINDS, concrete, kind


def mutated_placeholders(graph: fx.Graph) -> set[fx.Node]:
    out = set()
    for n in graph.nodes:
        if kind(n) in MUTATING_KINDS or kind(n) == "mutating_op" or (n.op == "call_method" and n.target.endswith("_")
                                                                     and not n.target.startswith("__")):
            base = n.args[0] if n.args else None
            while isinstance(base, fx.Node) and base.op != "placeholder" and base.args:
                base = base.args[0]
            if isinstance(base, fx.Node) and base.op == "placeholder":
                out.add(base)
    return out


def ancestors(node: fx.Node) -> list[fx.Node]:
    """node and everything it depends on, in graph order."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def evaluate(gm: fx.GraphModule, example_inputs, node: fx.Node):
    """The real value of `node` on the example inputs, or None when it is not safely computable."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mutated = mutated_placeholders(gm.graph)
    env = {}
    for n in ancestors(node):
        if n.op == "placeholder":
            if n in mutated:
                return None
            value = example_inputs[placeholders.index(n)]
            if isinstance(value, (torch.SymInt, torch.SymFloat)):
                value = concrete(value)  # its hint: computing with the symbol would specialize it
                if value is None:
                    return None
            env[n] = value
            continue
        k = kind(n)
        if k in MUTATING_KINDS or k == "mutating_op" or n.op in ("call_module", "output"):
            return None
        if n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__"):
            return None
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        try:
            if n.op == "get_attr":
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n] = obj
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
        except Exception:  # anything odd: no compile-time answer, the runtime check decides
            return None
    return env[node]
