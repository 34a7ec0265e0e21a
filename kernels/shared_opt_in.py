"""Launches whose shared memory passes the 48 KB a CUDA launch gets without opting in.

The coded kernels declare their staged lookup tables as static shared memory (inline PTX, see
decode_codegen.stager) beside Triton's own dynamic allocation. A launch may use more than 48 KB
of the two together only if the function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES was
raised first; Triton raises it only when its own allocation alone is over 48 KB. So, once asked
for, a Triton kernel-load hook raises it for every coded kernel loaded afterwards, to the
device's opt-in limit minus the function's static part (what Triton itself sets), through the
CUDA driver API.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import triton

# cuFuncGetAttribute / cuFuncSetAttribute attributes (cuda.h, CUfunction_attribute)
_SHARED_SIZE_BYTES = 1
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
# kernels the hook opts in (the compressed tiers' paged kernels, attention_kernels.py)
_PREFIX = "paged_coded"


class OptInUnavailable(RuntimeError):
    """The running Triton has no kernel-load hook, or the CUDA driver library was not found."""


@lru_cache(maxsize=1)
def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise OptInUnavailable(f"libcuda.so.1 not loadable: {err}") from err


def _opt_in(function: int, name: str) -> None:
    import torch

    if not name.startswith(_PREFIX):
        return
    lib = _driver()
    static = ctypes.c_int(0)
    if lib.cuFuncGetAttribute(ctypes.byref(static), _SHARED_SIZE_BYTES, ctypes.c_void_p(function)) != 0:
        raise OptInUnavailable(f"cuFuncGetAttribute failed for {name}")
    limit = torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    status = lib.cuFuncSetAttribute(ctypes.c_void_p(function), _MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    ctypes.c_int(limit - static.value))
    if status != 0:
        raise OptInUnavailable(f"cuFuncSetAttribute({name}, max dynamic shared = {limit - static.value}) "
                               f"returned CUDA error {status}")


def _on_load(module, function, name, metadata_group, hash) -> None:  # Triton's InitHandleHook signature
    _opt_in(function, name)


@lru_cache(maxsize=1)
def install() -> None:
    """Register the load hook (once per process). Raises OptInUnavailable where it cannot be."""
    _driver()
    hooks = triton.knobs.runtime
    current = getattr(hooks, "kernel_load_end_hook", None)
    if hasattr(current, "add"):  # Triton's HookChain
        current.add(_on_load)
    elif current is None:
        hooks.kernel_load_end_hook = _on_load
    else:
        raise OptInUnavailable("triton.knobs.runtime.kernel_load_end_hook holds another hook and cannot chain")
