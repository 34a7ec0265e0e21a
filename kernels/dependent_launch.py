"""Programmatic dependent launch (PDL, sm_90+) between the kernels of one attend call.

A decode step at small batch is a chain of short kernels (queries, split-KV partials per tier,
the new token's partials, the combine), and each waits for the one before it to finish, drain
and be replaced: a few microseconds per boundary of a ~35 us call (Llama-3-8B B=1 4k, H200,
session 28). Launched with the PDL attribute, a kernel's programs may start while the kernel
before it still runs, and wait in `griddepcontrol.wait` until it has finished and its writes are
visible: what overlaps is the launch and the programs' start. A kernel may also let the next one
launch as soon as its own programs have all started ("release early"), not only once they have
finished; the next kernel's programs then wait on SMs beside its own. The query kernel does not: released early, it made Llama-3-8B B=1
32k 18% slower (H200, session 29), probably because the fragment kernel after it sizes its grid
to fill the SMs exactly and some of its programs then sat beside the query kernel's.

Correctness rests on one rule, kept by every kernel that takes PDL: nothing before the wait
reads or writes global memory. (The caching allocator hands a call's freed buffers to the next
call's kernels in stream order, and even a constant table may have just been copied to the
device by the kernel before.) When the timings below were taken, the fragment kernels staged
their tables before the wait; they stage them after it since, so the rule has no exception.
A kernel launched without the attribute after one of these waits for it in full, as usual.

Measured (H200, whole attend call replayed from a CUDA graph, benchmarks/probe_fragment_launch.py
--settings fragment_decode pdl pdl_release_all pdl_release_none, session 29): within 2% either
way at Llama-3-8B B=8 and 32 and SmolLM2 B=8 and 32 (32k and 128k), 10% faster at SmolLM2 B=1
4k, 2.5% slower at Llama-3-8B B=1 32k. The gaps between the kernels of a replayed graph are
already small; what a B=1 call spends is in the kernels themselves. So it stays off.

DEPENDENT_LAUNCH["enabled"]: launch attend's chain this way on GPUs that support it;
"release_early": the kernels (of "queries", "fragment", "exact", "chunk", "combine") that release
the next one early.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import under_interpreter

DEPENDENT_LAUNCH = {"enabled": False, "release_early": ("fragment", "exact", "chunk")}

# a kernel's PDL constexpr: launched plainly, launched with PDL, and launched with PDL releasing
# the next kernel early
OFF, WAIT, RELEASE_EARLY = 0, 1, 2
# the same two, as the kernels compare them
WAIT_MODE, RELEASE_EARLY_MODE = tl.constexpr(WAIT), tl.constexpr(RELEASE_EARLY)
# wait for the previous kernel (after releasing the next one), pass an index through: every
# address computed from the index then depends on the wait
WAIT_ASM = tl.constexpr("griddepcontrol.wait;\n mov.u32 $0, $1;")
RELEASE_AND_WAIT_ASM = tl.constexpr("griddepcontrol.launch_dependents;\n griddepcontrol.wait;\n mov.u32 $0, $1;")


def enabled(device: torch.device) -> bool:
    """Do attend's kernels launch with PDL on this device? (CUDA, compute capability 9.0 or newer,
    not under TRITON_INTERPRET, DEPENDENT_LAUNCH["enabled"].)"""
    return (DEPENDENT_LAUNCH["enabled"] and device.type == "cuda" and torch.version.hip is None
            and not under_interpreter() and torch.cuda.get_device_capability(device) >= (9, 0))


def mode(pdl: bool, kernel: str) -> int:
    """The PDL constexpr of attend's `kernel` ("queries", "fragment", "exact", "chunk" or
    "combine") in a call that launches with PDL (pdl) or not."""
    if not pdl:
        return OFF
    return RELEASE_EARLY if kernel in DEPENDENT_LAUNCH["release_early"] else WAIT


def launch_options(pdl: bool) -> dict:
    """The Triton launch option for a kernel launched with PDL (none otherwise)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def after_previous_kernel(index, PDL: tl.constexpr):
    """index (a program id), returned once the previous kernel in the stream has finished (PDL:
    WAIT or RELEASE_EARLY), else at once. Every global store, and every load of an earlier
    kernel's output, must use addresses computed from what it returns. (The Gluon fragment
    kernels call it too.)"""
    if PDL == RELEASE_EARLY_MODE:
        index = tl.inline_asm_elementwise(RELEASE_AND_WAIT_ASM, "=r,r", [index], dtype=tl.int32, is_pure=False,
                                          pack=1)
    elif PDL == WAIT_MODE:
        index = tl.inline_asm_elementwise(WAIT_ASM, "=r,r", [index], dtype=tl.int32, is_pure=False, pack=1)
    return index
