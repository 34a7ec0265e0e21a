"""What the latest compiled forward did: sphkv_compile.report().

Detection and rewrite passes (and the HF integration) record one Site per attention site
they see. KV accounting comes from the live stores (callables registered by whoever owns
them), so the numbers are measured, never estimated.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable

log = logging.getLogger("sphkv")


@dataclass
class Site:
    kind: str  # e.g. "sdpa", "matmul_softmax", "hf_attention"
    rewritten: bool
    reason: str | None = None  # why it stayed dense
    details: dict = field(default_factory=dict)


_lock = threading.Lock()
_sites: list[Site] = []
# (group, fn, padding): fn() returns (kv_bytes, dense_kv_bytes); padding() (optional) the
# source's head-dim padding (head_pad.padding_report) or None. Only the group that registered
# last counts: the HF cache and the graph-rewritten stores never describe the same forward.
_kv_sources: list[tuple[str, Callable[[], tuple[int, int]], Callable[[], dict | None] | None]] = []
_active_group: str | None = None
_decode_step: dict | None = None  # how the latest generate() ran its decode step (record_decode_step)
# RDR's re-budgets since reset_rebudgets() (each generate() call resets): per kind ("prefill": a
# chunk entered over budget; "decode": the cadence between steps), count and host seconds.
_rebudgets: dict[str, dict] = {}
# which decode kernel each compressed tier ran on the GPU, by "<tier> d=<head dim>"
# (record_decode_kernel)
_decode_kernels: dict[str, dict] = {}


def begin_compile() -> None:
    """A new compiled forward starts: forget the previous one's sites."""
    with _lock:
        _sites.clear()
        _decode_kernels.clear()


def record_site(kind: str, rewritten: bool, reason: str | None = None, **details) -> Site:
    site = Site(kind, rewritten, reason, details)
    with _lock:
        _sites.append(site)
    if rewritten:
        log.info("sphkv: rewrote %s site %s", kind, details or "")
    else:
        log.info("sphkv: left %s site dense: %s", kind, reason)
    return site


def record_decode_step(cuda_graphs: bool, reason: str) -> None:
    """How the decode step runs on the sphkv cache (generate()'s, or the backend's calls):
    replayed from CUDA graphs or not, and why. Logged when it changes (the backend records it
    at every call)."""
    global _decode_step
    step = {"cuda_graphs": cuda_graphs, "reason": reason}
    with _lock:
        changed, _decode_step = _decode_step != step, step
    if changed:
        log.info("sphkv: decode step %s CUDA graphs: %s", "with" if cuda_graphs else "without", reason)


def record_decode_kernel(tier: str, head_dim: int, kernel: str, why_not_faster: str | None) -> None:
    """The kernel a compressed tier's decode attention ran on: "fragment" (the Gluon kernel) or
    "triton", with why the fragment kernel could not serve it. Logged when it changes."""
    key = f"{tier} d={head_dim}"
    entry = {"kernel": kernel, "why_not_fragment": why_not_faster}
    with _lock:
        changed = _decode_kernels.get(key) != entry
        _decode_kernels[key] = entry
    if changed:
        if why_not_faster is None:
            log.info("sphkv: tier %s runs the fragment kernel", key)
        else:
            log.info("sphkv: tier %s runs the Triton kernels, not the faster fragment kernel: %s", key,
                     why_not_faster)


def record_rebudget(kind: str, seconds: float) -> None:
    """One RDR re-budget of one layer took `seconds` on the host (it decides there, so on a GPU
    this is most of its cost)."""
    with _lock:
        entry = _rebudgets.setdefault(kind, {"count": 0, "host_seconds": 0.0})
        entry["count"] += 1
        entry["host_seconds"] += seconds


def rebudgets() -> dict:
    """{kind: {"count", "host_seconds"}} of RDR's re-budgets since reset_rebudgets()."""
    with _lock:
        return {kind: dict(entry) for kind, entry in _rebudgets.items()}


def decode_kernels() -> dict:
    with _lock:
        return {key: dict(entry) for key, entry in _decode_kernels.items()}


def reset_rebudgets() -> None:
    with _lock:
        _rebudgets.clear()


def register_kv_source(fn: Callable[[], tuple[int, int]], group: str = "default",
                       padding: Callable[[], dict | None] | None = None) -> None:
    """fn() -> (resident compressed bytes, dense bf16 bytes for the same tokens); padding() ->
    the stores' head-dim padding or None. Registering (again) makes `group` the one report()
    measures; a function is kept once."""
    global _active_group
    with _lock:
        if not any(f is fn for _, f, _ in _kv_sources):
            _kv_sources.append((group, fn, padding))
        _active_group = group


def clear_kv_sources() -> None:
    global _active_group
    with _lock:
        _kv_sources.clear()
        _active_group = None


@contextlib.contextmanager
def preserved():
    """Everything report() shows, restored on exit: optimize()'s trial forward (hf_trial.py) runs
    a forward of its own, which must not replace what the user's last run recorded."""
    global _active_group, _decode_step
    with _lock:
        saved = (list(_sites), list(_kv_sources), _active_group, _decode_step, copy.deepcopy(_rebudgets),
                 copy.deepcopy(_decode_kernels))
    try:
        yield
    finally:
        with _lock:
            _sites[:], _kv_sources[:], _active_group, _decode_step = saved[0], saved[1], saved[2], saved[3]
            _rebudgets.clear()
            _rebudgets.update(saved[4])
            _decode_kernels.clear()
            _decode_kernels.update(saved[5])


def report() -> dict:
    """Raises first if a compiled model's runtime check failed in a call not yet read back
    (inductor_passes/runtime_checks.py)."""
    checks = sys.modules.get("sphkv_compile.inductor_passes.runtime_checks")
    if checks is not None:
        checks.check_runtime()
    with _lock:
        sites = [asdict(s) for s in _sites]
        sources = [fn for group, fn, _ in _kv_sources if group == _active_group]
        paddings = [p for group, _, p in _kv_sources if group == _active_group and p is not None]
    kv = [fn() for fn in sources]
    padding = next((found for found in (p() for p in paddings) if found), None)
    return {
        "sites": sites,
        "kv_bytes": sum(k for k, _ in kv),
        "dense_kv_bytes": sum(d for _, d in kv),
        "decode_step": _decode_step,
        "rebudgets": rebudgets(),
        # GPU only: {"<tier> d=<head dim>": {"kernel": "fragment" or "triton", "why_not_fragment"}}
        "decode_kernels": decode_kernels(),
        "head_dim_padding": padding,  # measured on the live stores (head_pad.py), None when none is padded
    }
