"""Lowering of the sphkv custom ops on CUDA.

Mechanism: the ops get CUDA implementations backed by the Triton kernels
(torch.library.register_kernel, sphkv_compile.kernels.cuda_ops). Inductor keeps a custom op
as an extern call to that implementation, on torch 2.11 and 2.13 alike; CPU keeps the
reference. A TritonTemplate lowering (as flex decoding does) would let Inductor autotune the
block sizes and fuse producers of q into the kernel; the attention kernels have no epilogue to
fuse and their launches are few, so the extern call is what is measured in
docs/PERFORMANCE.md (no template was built, so none was compared).
"""
from __future__ import annotations

import logging

log = logging.getLogger("sphkv.lowering")


def install() -> bool:
    """Register the CUDA kernels for the sphkv ops. Returns False (and logs why) when Triton
    cannot be imported; the ops then run the reference everywhere."""
    try:
        from sphkv_compile.kernels import cuda_ops
    except ImportError as err:  # no triton on this machine
        log.warning("sphkv kernels unavailable, ops run the reference implementation: %s", err)
        return False
    cuda_ops.register()
    return True

