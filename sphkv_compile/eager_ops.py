"""Calling the sphkv custom ops from eager code without the dispatcher's Python layers.

A call of a `torch.library.custom_op` from Python passes its autograd and in-place-view layers
(a version bump for every mutated tensor: a store's state list holds up to a dozen) and fills
its defaults before it reaches the implementation: ~60 us of host time a call on the sandbox
CPU (benchmarks/launch_host_time.py), where the budgeting node's own work takes ~15. A plain
generate() on a dynamic cache runs the ops eagerly, two per layer and decode step, and on a GPU
that step is host-bound.

call_op(name, *args) is torch.ops.sphkv.<name>(*args). In eager inference (not compiling, grad
off, no dispatch or torch-function mode such as fake tensors or `with torch.device(...)`, a plain
first tensor on the CPU or a CUDA device) it calls the implementation registered for that device
directly, which is what the dispatcher would reach. Everywhere else it calls the op, so a
compiled graph, meta tensors and every tracing mode see the op itself. The ops are defined and
given device kernels through custom_op and register_kernel here, so both paths know the same
implementations.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# (op name, device type) -> implementation; device type "default" is the reference
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
# where the direct call is taken (elsewhere, e.g. meta tensors, the op dispatches to its fake)
_DIRECT_DEVICES = ("cpu", "cuda")


def custom_op(name: str, *, mutates_args):
    """@torch.library.custom_op("sphkv::<name>"), the function kept as the op's reference (any
    device) for call_op."""
    def define(fn):
        _IMPLEMENTATIONS[(name, "default")] = fn
        return torch.library.custom_op(f"sphkv::{name}", fn, mutates_args=mutates_args)
    return define


def register_kernel(name: str, device_type: str, fn: Callable) -> None:
    """Op `name`'s implementation on `device_type`, for the dispatcher and for call_op alike."""
    torch.library.register_kernel(f"sphkv::{name}", device_type, fn)
    _IMPLEMENTATIONS[(name, device_type)] = fn


def call_op(name: str, *args):
    first = args[0][0] if isinstance(args[0], (list, tuple)) and args[0] else args[0]  # q, or a state's first tensor
    if (torch.compiler.is_compiling() or torch.is_grad_enabled() or type(first) is not torch.Tensor
            or first.device.type not in _DIRECT_DEVICES or _get_current_dispatch_mode() is not None
            or torch._C._is_torch_function_mode_enabled()):
        return getattr(torch.ops.sphkv, name)(*args)
    fn = _IMPLEMENTATIONS.get((name, first.device.type)) or _IMPLEMENTATIONS[(name, "default")]
    return fn(*args)
