"""Shared test helpers: float64 dense references and relative errors."""
from __future__ import annotations

import torch

HEAD_DIMS = (32, 64, 80, 96, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def dense_attention(q, k, v, *, causal_offset=None, key_valid=None, scale=None):
    """float64 SDPA with GQA. q [B,Hq,Tq,d], k/v [B,Hkv,T,d]. causal_offset: query i sees keys
    j <= causal_offset + i. key_valid [B, T] masks keys out."""
    B, Hq, Tq, d = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    T = k.shape[2]
    mask = torch.ones(B, 1, Tq, T, dtype=torch.bool)
    if causal_offset is not None:
        mask &= torch.ones(Tq, T, dtype=torch.bool).tril(causal_offset)
    if key_valid is not None:
        mask &= key_valid[:, None, None, :]
    scale = d ** -0.5 if scale is None else scale
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, -1)
    p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))
    return p @ vv


def relative_direction_mse(xhat: torch.Tensor, x: torch.Tensor) -> float:
    x, xhat = x.double(), xhat.double()
    return float(((xhat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())


def record_launches(monkeypatch, module, name: str, label: str | None = None, into: list | None = None) -> list:
    """Replace the Triton kernel module.<name> with a spy that appends `label` (default: the
    launch grid) to the returned list at every launch, then launches the kernel."""
    launched = [] if into is None else into
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid if label is None else label)
            return kernel[grid]

        def __getattr__(self, attr):  # warmup() and the rest: the kernel's own
            return getattr(kernel, attr)

    monkeypatch.setattr(module, name, Spy())
    return launched


def record_launch_args(monkeypatch, module, name: str, pick, into: list | None = None) -> list:
    """Replace the Triton kernel module.<name> with a spy that appends pick(named) at every launch,
    named being the launch's arguments by name (positional by the kernel's argument names, then
    the keywords: constexprs and launch options), then launches the kernel."""
    launched = [] if into is None else into
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(pick({**dict(zip(kernel.arg_names, args)), **kwargs}))
                return kernel[grid](*args, **kwargs)
            return launch

        def __getattr__(self, attr):  # warmup() and the rest: the kernel's own
            return getattr(kernel, attr)

    monkeypatch.setattr(module, name, Spy())
    return launched


def nan_filled_empty(monkeypatch) -> None:
    """torch.empty and torch.empty_like hand out floating-point memory filled with NaN for the
    rest of the test, so an output a kernel should have written but did not shows as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def filled(make):
        def allocate(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return allocate

    monkeypatch.setattr(torch, "empty", filled(empty))
    monkeypatch.setattr(torch, "empty_like", filled(empty_like))
