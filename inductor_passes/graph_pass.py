"""The one custom post-grad pass the backend hands Inductor, and its cache identity.

Inductor's FX-graph cache keys a compiled graph on the graph and config, not on the code
behind our custom ops (their CPU reference, the Triton kernels, the lowering). The pass's
uuid() therefore hashes those sources plus the options, so an edit to any of them, or a
different option, never reuses stale compiled code.

The pass itself checks that the rewrite survived AOT: every sphkv::attend and
sphkv::update_cache the backend inserted must still be in the post-grad graph (mutating
custom ops appear there wrapped in auto_functionalized).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass

def hashed_sources() -> list[Path]:
    """The pass, lowering and kernel sources plus every sphkv_compile module the ops run."""
    import sphkv_compile
    import sphkv_compile.inductor_passes as passes
    import sphkv_compile.kernels as kernels

    # rglob: subpackages (rdr/, whose budgeting ops the graph calls) count too
    files = {p for pkg in (passes, kernels, sphkv_compile) for p in Path(pkg.__file__).parent.rglob("*.py")}
    return sorted(files)


@lru_cache(maxsize=1)
def source_fingerprint() -> str:
    h = hashlib.sha256()
    for path in hashed_sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _op_names(graph) -> list[str]:
    names = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        target = n.args[0] if "auto_functionalized" in str(n.target) and n.args else n.target
        names.append(str(target))
    return names


class SphkvGraphPass(CustomGraphPass):
    def __init__(self, options, expected_attends: int, expected_updates: int):
        self.options_key = repr(options)
        self.expected = (expected_attends, expected_updates)

    def __call__(self, graph) -> None:
        names = _op_names(graph)
        updates = ("sphkv.update_cache", "sphkv.update_cache_rdr")
        found = (sum(n.endswith("sphkv.attend") or "sphkv.attend." in n for n in names),
                 sum(any(n.endswith(u) or u + "." in n for u in updates) for n in names))
        if found[0] < self.expected[0] or found[1] < self.expected[1]:
            raise RuntimeError(f"sphkv: the rewrite lost ops before Inductor lowering: expected "
                               f"{self.expected} attend/update_cache calls, found {found}")

    def uuid(self) -> str:
        h = hashlib.sha256(source_fingerprint().encode())
        h.update(self.options_key.encode())
        h.update(repr(self.expected).encode())
        return h.hexdigest()
