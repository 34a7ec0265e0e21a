"""Replay the backend's compiled calls from CUDA graphs (options={"cuda_graphs": True}).

Without graphs, a decode step of a module compiled with backend="sphkv" pays the host time of
every launch (H100, session 40: about 1 ms per layer for attend, update and encode). The backend
cannot hand this to Inductor's cudagraph trees: the store tensors it adds to the graph are not
Dynamo's inputs, so the trees would treat them as inputs to copy at every replay. It captures
the compiled callable itself instead, per call signature (every argument's shape, strides,
dtype and device, and the value of every non-tensor argument):

- the first WARMUP calls run as compiled (Triton compiles and autotunes there);
- the next call is captured. Arguments whose memory stayed put over the warm-up calls
  (parameters, buffers, the stores, the runtime checks) are read in place. The others, such
  as the token ids and positions, are copied into the graph's own inputs before each replay;
- a replay whose in-place arguments moved captures again, with those copied from then on;
- a call that makes the host wait for the GPU (torch.cuda.set_sync_debug_mode sees it) cannot
  be captured: capturing it would fail, after its ops' Python code had already run once. The
  last warm-up call is watched; one that waited is followed by another watched warm-up call (a
  first call's autotuning or lazy initialisation waits once), and a signature whose
  WAITING_WARMUPS watched calls all waited (a prefill's placement decisions read the GPU) is
  never captured;
- a call that fails to capture anyway runs as compiled from then on, and a
  SphkvPerformanceWarning names the error.

Outputs are cloned out of the graph's memory, so a caller may keep them across calls; an output
that is one of the in-place arguments is returned as that argument. Only the MAX_SIGNATURES most
recent signatures are kept (a cat cache changes its shape every call and is never captured).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

WARMUP = 2
WAITING_WARMUPS = 3  # watched warm-up calls that waited before a signature is given up on
MAX_SIGNATURES = 8
NEVER_REPEATED_WARNING = 16  # calls with no signature seen WARMUP + 1 times before saying so


@dataclass
class _Entry:
    calls: int = 0
    last_ptrs: list | None = None
    moving: set = field(default_factory=set)  # argument indices copied into the graph's inputs
    graph: object = None
    copies: dict = field(default_factory=dict)  # index -> the graph's input tensor
    in_place: dict = field(default_factory=dict)  # index -> data_ptr at capture
    outputs: list = field(default_factory=list)
    returns_arg: dict = field(default_factory=dict)  # output index -> argument index
    failed: str | None = None
    waited: int = 0  # watched warm-up calls that made the host wait for the GPU
    first_wait: str | None = None
    waits: str | None = None  # where the first of them waited, once WAITING_WARMUPS did: never captured


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a)
                 for a in args)


@contextlib.contextmanager
def watch_host_waits(args):
    """Yields a list that collects where the host waited for the GPU inside the block (CUDA's
    sync debug mode, which warns at each wait), empty off CUDA."""
    found: list[str] = []
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    if not cuda:
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message):
            found.append(f"{w.filename}:{w.lineno}")
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _holds_no_memory(t: torch.Tensor) -> bool:
    return t.numel() > 1 and t.untyped_storage().nbytes() <= t.element_size()


def _ptrs(args) -> list:
    return [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]


class GraphReplay:
    """Wraps one compiled callable (called as fn(*args), returning a list or tuple)."""

    def __init__(self, fn, new_graph=None, capture=None, pool=None, watch_waits=None):
        self.fn = fn
        # CUDA's by default; tests pass stand-ins that run on the CPU
        self.new_graph = new_graph or torch.cuda.CUDAGraph
        self.capture = capture or (lambda graph: torch.cuda.graph(graph, pool=pool))
        self.watch_waits = watch_waits or watch_host_waits
        self.entries: OrderedDict = OrderedDict()
        self.calls = 0
        self.captured = False

    def __call__(self, args: list):
        self.calls += 1
        if self.calls == NEVER_REPEATED_WARNING and not self.captured:
            self._warn_never_repeated()
        sig = _signature(args)
        entry = self.entries.pop(sig, None) or _Entry()
        self.entries[sig] = entry  # most recent last
        while len(self.entries) > MAX_SIGNATURES:
            self.entries.popitem(last=False)
        if entry.failed or entry.waits:
            return self.fn(*args)
        ptrs = _ptrs(args)
        if entry.graph is None:
            if entry.last_ptrs is not None:
                entry.moving |= {i for i, (a, b) in enumerate(zip(ptrs, entry.last_ptrs)) if a != b}
            entry.last_ptrs = ptrs
            entry.calls += 1
            if entry.calls < WARMUP:
                return self.fn(*args)
            if entry.calls == WARMUP:
                with self.watch_waits(args) as waits:
                    out = self.fn(*args)
                if waits:
                    entry.waited += 1
                    entry.first_wait = entry.first_wait or waits[0]
                    if entry.waited >= WAITING_WARMUPS:
                        entry.waits = entry.first_wait
                    entry.calls -= 1  # the next call is watched again
                return out
            return self._capture(entry, args)
        moved = {i for i, p in entry.in_place.items() if ptrs[i] != p}
        if moved:
            entry.moving |= moved
            entry.graph = None
            return self._capture(entry, args)
        return self._replay(entry, args)

    def _capture(self, entry: _Entry, args: list):
        entry.copies = {i: args[i].clone() for i in entry.moving if isinstance(args[i], torch.Tensor)}
        entry.in_place = {i: a.data_ptr() for i, a in enumerate(args)
                          if isinstance(a, torch.Tensor) and i not in entry.copies}
        graph_args = [entry.copies.get(i, a) for i, a in enumerate(args)]
        graph = self.new_graph()
        try:
            with self.capture(graph):
                outputs = self.fn(*graph_args)
        except Exception as err:  # noqa: BLE001  (any op that cannot be captured)
            from sphkv_compile.options import SphkvPerformanceWarning

            entry.failed = f"{type(err).__name__}: {err}".splitlines()[0]
            warnings.warn(f"sphkv: a compiled call could not be captured in a CUDA graph ({entry.failed}); calls of "
                          "its shapes run without graphs from now on", SphkvPerformanceWarning, stacklevel=4)
            return self.fn(*args)
        entry.graph, entry.outputs = graph, list(outputs)
        self.captured = True
        where = {a.data_ptr(): i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i in entry.in_place}
        entry.returns_arg = {k: where[o.data_ptr()] for k, o in enumerate(entry.outputs)
                             if isinstance(o, torch.Tensor) and o.data_ptr() in where}
        return self._replay(entry, args, copy_in=False)  # capturing ran nothing: run it now

    def _warn_never_repeated(self) -> None:
        from sphkv_compile.options import SphkvPerformanceWarning

        if any(e.failed for e in self.entries.values()):
            return  # that warned already
        waits = next((e.waits for e in self.entries.values() if e.waits), None)
        why = (f"its calls make the host wait for the GPU (first at {waits})" if waits else
               "no call repeated its argument shapes (a cache grown by concatenation changes shape every call; a "
               "static buffer written in place, as gpt-fast's, keeps it)")
        warnings.warn(f"sphkv: option cuda_graphs replayed nothing in {self.calls} calls: {why}. The calls run "
                      "without graphs", SphkvPerformanceWarning, stacklevel=4)

    def _replay(self, entry: _Entry, args: list, copy_in: bool = True):
        if copy_in:
            for i, t in entry.copies.items():
                t.copy_(args[i])
        entry.graph.replay()
        out = []
        for k, o in enumerate(entry.outputs):
            if k in entry.returns_arg:
                out.append(args[entry.returns_arg[k]])
            elif isinstance(o, torch.Tensor) and not _holds_no_memory(o):
                out.append(o.clone())
            else:  # a placeholder that holds no memory (a released cat result), or not a tensor
                out.append(o)
        return out

    def replays(self) -> int:
        """Signatures captured now (for report())."""
        return sum(e.graph is not None for e in self.entries.values())
