"""The rewrite's runtime checks, recorded on the device and read back without stalling decode.

runtime_ops.advance_on_device, mask_validity and record_validity check at every call that the
model still writes contiguous positions at the store's cursor and that its mask is still causal
over the cache plus padding. Reading those verdicts on the host inside the graph would make each
layer wait for the GPU (session 40 on an H100: a gpt-fast-style model's decode step took 16.4 ms
against 4.9 ms dense, host and GPU serialised layer by layer). So the ops write the first
failure into a small int64 tensor instead, and the compiled model reads it back:

- on the CPU right after the call, which then raises instead of returning its output;
- on a GPU through a non-blocking copy to pinned memory: the next call raises if a call before
  it failed, waiting for a call's copy only when more than MAX_LAG calls are unread. The call
  that failed has returned its (wrong) output by then; generation stops at the next step with
  the cause named. `sphkv_compile.report()` and `sphkv_compile.check_runtime()` read every
  pending verdict, so a run's last steps are covered too.

After a failure the store holds whatever the failing call wrote into it: start a new sequence
at position 0.
"""
from __future__ import annotations

import weakref
from collections import deque

import torch

from .masks import WHY

# the checks tensor: int64 [SIZE]
CODE, P0, N, HELD, SHOWN, STORED, CALL = range(7)
SIZE = 7
# codes (the mask's are masks.WHY's)
NOT_CONTIGUOUS, MISPLACED, POSITION_BIAS = 1, 2, 3
MAX_LAG = 2  # calls whose verdict may be unread when the next one starts

_readers: "weakref.WeakSet[CheckReader]" = weakref.WeakSet()
_calls = 0  # calls of every sphkv-compiled graph in this process: a verdict names its call by this


class SphkvCacheError(RuntimeError):
    pass


def new_checks(device) -> torch.Tensor:
    return torch.zeros(SIZE, dtype=torch.int64, device=device)


def record(checks: torch.Tensor, code: torch.Tensor, p0, n: int, held=None, shown=None, stored=None) -> None:
    """Keep the first failure: write (code, evidence) only where code != 0 and none is recorded."""
    dev = checks.device

    def as_t(x):
        if isinstance(x, torch.Tensor):
            return x.to(dev, torch.int64).reshape(())
        # a fill, not a copy from the host (a pageable host-to-device copy waits for the stream);
        # a SymInt (a traced chunk length) is filled as it is: int() would specialise the graph
        return torch.full((), -1 if x is None else x, dtype=torch.int64, device=dev)

    row = torch.stack([code.to(torch.int64), as_t(p0), as_t(n), as_t(held), as_t(shown), as_t(stored), checks[CALL]])
    first = (checks[CODE] == 0) & (code != 0)
    checks.copy_(torch.where(first, row, checks))


def message(verdict: list[int], in_call: bool) -> tuple[type, str]:
    """(exception class, text) for a recorded failure; in_call: raised by a compiled call (not
    by check_runtime)."""
    from .masks import MaskNotEquivalent

    code, p0, n, held, shown, stored = verdict[CODE], verdict[P0], verdict[N], verdict[HELD], verdict[SHOWN], verdict[STORED]
    lag = _calls - verdict[CALL]
    if in_call and lag == 0:
        when = "in this call"
    else:
        when = (f"{lag} compiled call(s) before this one" if in_call and lag > 0 else "in an earlier compiled call")
        when += (" (the checks run on the GPU and are read back without stalling decode, so that call's output was "
                 "already returned)")
    if code == NOT_CONTIGUOUS:
        return SphkvCacheError, (f"sphkv: {when} the cache was written at {n} positions starting at {p0} that are not "
                                 "contiguous; the compressed store supports contiguous appends only")
    if code == MISPLACED:
        why = ("a compressed cache cannot be rewound or forked (start a new sequence at position 0)" if held else
               "the positions before it went into the dense cache through a graph sphkv did not rewrite (report() "
               "after that call said why), such as a transformers model's prefill: a transformers model goes "
               "through sphkv_compile.optimize(model)")
        return SphkvCacheError, (f"sphkv: {when} the cache was written at position {p0} but the compressed store held "
                                 f"positions 0..{held - 1}; {why}")
    if code == POSITION_BIAS:
        return MaskNotEquivalent, (f"sphkv: {when} an additive attention mask held values other than 0 and -inf (a "
                                   "position bias); compile this model without sphkv for this site")
    text = WHY[code].format(p0=p0, last=p0 + n - 1, tk=stored, shown=shown, stored=stored)
    return MaskNotEquivalent, f"sphkv: {when} the attention mask was no longer equivalent to the rewrite: {text}"


class CheckReader:
    """One compiled model's checks tensor per device, and its verdicts not yet read."""

    def __init__(self):
        self.checks: dict[torch.device, torch.Tensor] = {}
        self.pending: deque = deque()  # (event or None, pinned host copy)
        _readers.add(self)

    def tensor(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self.checks:
            self.checks[device] = new_checks(device)
        return self.checks[device]

    def before_call(self) -> None:
        """Raise for a failed earlier call; count this one (its verdicts carry the number)."""
        global _calls
        _calls += 1  # first: a verdict read now is from an earlier call
        self.read(block=False)
        for t in self.checks.values():
            t.narrow(0, CALL, 1).fill_(_calls)  # not t[CALL] = _calls: a host-to-GPU copy that waits

    def after_call(self) -> None:
        for t in self.checks.values():
            if t.device.type == "cuda":
                host = torch.empty(SIZE, dtype=torch.int64, pin_memory=True)
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(t.device))
                self.pending.append((event, host))
            else:
                self.pending.append((None, t.clone()))
        self.read(block=False)

    def read(self, block: bool, in_call: bool = True) -> None:
        """Raise the first recorded failure among the verdicts that are ready (all of them when
        block, or while more than MAX_LAG are waiting)."""
        while self.pending:
            event, host = self.pending[0]
            if event is not None and not event.query():
                if not block and len(self.pending) <= MAX_LAG * max(1, len(self.checks)):
                    return
                event.synchronize()
            self.pending.popleft()
            verdict = host.tolist()
            if verdict[CODE]:
                self.pending.clear()
                for t in self.checks.values():
                    t.narrow(0, CODE, 1).fill_(0)
                cls, text = message(verdict, in_call)
                raise cls(text)


def check_runtime() -> None:
    """Read every compiled model's pending runtime checks now (waiting for the GPU) and raise
    the first failure: the last decode steps of a run are otherwise read only by the next call."""
    for reader in list(_readers):
        reader.read(block=True, in_call=False)
