"""Programmatic dependent launch (PDL, sm_90+) between the kernels of one attend call.

A decode step at small batch is a chain of short kernels (queries, split-KV partials per tier,
the new token's partials, the combine), and each waits for the one before it to finish, drain
and be replaced: a few microseconds per boundary of a ~35 us call (Llama-3-8B B=1 4k, H200,
session 28). Launched with the PDL attribute, a kernel's programs may start while the kernel
before it still runs, do the work that reads no output of it (the fragment kernel stages its
codec tables), and then wait in `griddepcontrol.wait` until it has finished and its writes are
visible. Each kernel also lets the next one launch as soon as its own programs have started.

Correctness rests on one rule, kept by every kernel that takes PDL: nothing before the wait
writes global memory or reads what an earlier kernel of the stream may still be writing (the
caching allocator hands a call's freed buffers to the next call's kernels in stream order).
A kernel launched without the attribute after one of these waits for it in full, as usual.

DEPENDENT_LAUNCH["enabled"]: launch attend's chain this way on GPUs that support it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import under_interpreter

DEPENDENT_LAUNCH = {"enabled": False}

# release the next kernel's launch, wait for the previous kernel, pass an index through: every
# address computed from the index then depends on the wait
AFTER_PREVIOUS_ASM = tl.constexpr("griddepcontrol.launch_dependents;\n griddepcontrol.wait;\n mov.u32 $0, $1;")


def enabled(device: torch.device) -> bool:
    """Do attend's kernels launch with PDL on this device? (CUDA, compute capability 9.0 or newer,
    not under TRITON_INTERPRET, DEPENDENT_LAUNCH["enabled"].)"""
    return (DEPENDENT_LAUNCH["enabled"] and device.type == "cuda" and torch.version.hip is None
            and not under_interpreter() and torch.cuda.get_device_capability(device) >= (9, 0))


def launch_options(pdl: bool) -> dict:
    """The Triton launch option for a kernel launched with PDL (none otherwise)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def after_previous_kernel(index, PDL: tl.constexpr):
    """index (a program id), returned once the previous kernel in the stream has finished (PDL),
    else at once. Every global store, and every load of an earlier kernel's output, must use
    addresses computed from what it returns."""
    if PDL:
        index = tl.inline_asm_elementwise(AFTER_PREVIOUS_ASM, "=r,r", [index], dtype=tl.int32, is_pure=False, pack=1)
    return index
