"""The `sphkv` torch.compile backend (entry point `torch_dynamo_backends: sphkv`).

Foundations stage: the graph goes to Inductor unchanged. The compiler (inductor_passes)
replaces this with detection and rewrite of attention and KV-cache updates.
"""
from __future__ import annotations


def sphkv_backend(gm, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    kwargs.pop("options", None)
    return compile_fx(gm, example_inputs)
