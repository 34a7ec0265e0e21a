"""Beam search's decode step, compiled.

transformers compiles the decode step of greedy and sampling (GenerationMixin._sample) but
calls the model uncompiled in _beam_search: a dense static cache reorders its rows by
replacing its tensors, which compiled graphs (and CUDA graphs) could not follow. The sphkv
cache reorders in place (SphkvCache.reorder_cache keeps every state tensor's address), so
its beam-search decode step can be compiled like the greedy one: for one generate() call the
model's forward becomes a dispatcher that sends one-token steps to the forward compiled with
the call's CompileConfig, and everything else (the prefill) to the plain forward. The
dispatcher runs inside the model's __call__ (hooks run once) and carries the forward's
signature, which generate() reads to decide what to pass (position_ids, logits_to_keep).

Only where transformers itself would compile a static cache's greedy decode step
(compile_rules.compile_blocker), where every layer is compressed (HF's dense layers reorder by
replacing their tensors), and where the model is not spread over devices.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch

from . import compile_rules
from .hf_cache import SphkvCache, SphkvLayer


def num_beams(kwargs: dict, config) -> int:
    return int(compile_rules.setting(kwargs, config, "num_beams", 1) or 1)


def why_not_compiled(model, cache: SphkvCache, kwargs: dict, config, compile_cfg) -> str | None:
    """Why this beam search's decode step stays uncompiled (None: it can be compiled)."""
    blocker = compile_rules.compile_blocker(model, cache, kwargs, config, compile_cfg)
    if blocker is not None:
        return blocker
    if not all(isinstance(layer, SphkvLayer) for layer in cache.layers):
        return "some layers keep transformers' dense cache, whose beam reorder replaces its tensors"
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return "the model is spread over devices by accelerate"
    return None


def _one_new_token(args, kwargs) -> bool:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return ids is not None and ids.dim() >= 2 and ids.shape[1] == 1


def _compiled_forward(model, plain, compile_cfg):
    """`plain` compiled with this config, kept on the model so later generate() calls with an
    equal config reuse it (as transformers keeps its own compiled call in get_compiled_call)."""
    cached = getattr(model, "_sphkv_beam_forward", None)
    if cached is None or cached[0] is not plain or cached[1] != compile_cfg:
        cached = (plain, copy.copy(compile_cfg), torch.compile(plain, **compile_cfg.to_dict()))
        model._sphkv_beam_forward = cached
    return cached[2]


@contextlib.contextmanager
def compiled_decode_steps(model, compile_cfg):
    """For the duration: one-token forward calls run compiled, the rest as before."""
    plain = model.forward
    compiled = _compiled_forward(model, plain, compile_cfg)

    @functools.wraps(plain)
    def beam_step_forward(*args, **kwargs):
        if torch.compiler.is_compiling() or not _one_new_token(args, kwargs):
            return plain(*args, **kwargs)  # inside someone else's trace, or the prefill
        return compiled(*args, **kwargs)

    model.forward = beam_step_forward
    try:
        yield
    finally:
        model.forward = plain
