"""Beam search's decode step, compiled.

transformers compiles the decode step of greedy and sampling (GenerationMixin._sample) but
calls the model uncompiled in _beam_search: a dense static cache reorders its rows by
replacing its tensors, which compiled graphs (and CUDA graphs) could not follow. The sphkv
cache reorders in place (SphkvLayer.reorder_cache keeps every state tensor's address), so
its beam-search decode step can be compiled like the greedy one: for one generate() call the
model's forward becomes a dispatcher that sends one-token steps to a compiled call (the
model's __call__ compiled with the call's CompileConfig, as transformers compiles it for
_sample) and everything else (the prefill) to the plain forward.

Only where transformers itself would compile a static cache's decode step (same device and
config rules), where every layer is compressed (HF's dense layers reorder by replacing their
tensors), and where the model is not spread over devices by accelerate hooks.
"""
from __future__ import annotations

import contextlib

import torch

from .hf_cache import SphkvCache, SphkvLayer


def setting(kwargs: dict, config, name: str, default=None):
    """A generation setting of this generate() call: its keyword, else the generation config's
    (generate() lets keywords override the config)."""
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, default)


def num_beams(kwargs: dict, config) -> int:
    return int(setting(kwargs, config, "num_beams", 1) or 1)


def why_not_compiled(model, cache: SphkvCache, kwargs: dict, config, compile_config) -> str | None:
    """Why this beam search's decode step stays uncompiled (None: it can be compiled)."""
    if not cache.is_compileable:
        return "a dynamic cache is not compiled (pass cache_implementation='static')"
    if setting(kwargs, config, "disable_compile", False):
        return "generation_config.disable_compile is set"
    if model.device.type == "cpu" and not getattr(compile_config, "_compile_all_devices", False):
        return "generate() compiles the decode step on accelerators only"
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


def _compiled_call(model, compile_config):
    """The model's __call__ compiled with this config, kept on the model so later generate()
    calls reuse it (as transformers keeps its own in get_compiled_call)."""
    options = compile_config.to_dict()
    options.pop("_compile_all_devices", None)
    key = repr(sorted(options.items(), key=lambda kv: kv[0]))
    cached = getattr(model, "_sphkv_beam_call", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.compile(model.__call__, **options))
        model._sphkv_beam_call = cached
    return cached[1]


@contextlib.contextmanager
def compiled_decode_steps(model, compile_config):
    """For the duration: one-token forward calls run compiled, the rest as before."""
    plain = model.forward
    compiled = _compiled_call(model, compile_config)

    def beam_step_forward(*args, **kwargs):
        # inside the compiled call __call__ reaches this forward again: trace the plain one
        if torch.compiler.is_compiling() or not _one_new_token(args, kwargs):
            return plain(*args, **kwargs)
        return compiled(*args, **kwargs)

    model.forward = beam_step_forward
    try:
        yield
    finally:
        model.forward = plain
