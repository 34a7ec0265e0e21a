"""Beam search's decode step, compiled.

transformers compiles the decode step of greedy and sampling (GenerationMixin._sample) but
calls the model uncompiled in _beam_search: a dense static cache reorders its rows by
replacing its tensors, which compiled graphs (and CUDA graphs) could not follow. The sphkv
cache reorders in place (SphkvLayer.reorder_cache keeps every state tensor's address), so
its beam-search decode step can be compiled like the greedy one: for one generate() call the
model's forward becomes a dispatcher that sends one-token steps to the forward compiled with
the call's CompileConfig, and everything else (the prefill) to the plain forward. The
dispatcher runs inside the model's __call__ (hooks run once) and carries the forward's
signature, which generate() reads to decide what to pass (position_ids, logits_to_keep).

Only where transformers itself would compile a static cache's greedy decode step
(compile_blocker), where every layer is compressed (HF's dense layers reorder by replacing
their tensors), and where the model is not spread over devices.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .hf_cache import SphkvCache, SphkvLayer

# the device types transformers auto-compiles generate()'s decode step on
# (GenerationMixin._valid_auto_compile_criteria)
COMPILED_DEVICE_TYPES = ("cuda", "xpu", "neuron", "tpu")


def setting(kwargs: dict, config, name: str, default=None):
    """A generation setting of this generate() call: its keyword, else the generation config's
    (generate() lets keywords override the config)."""
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, default)


def num_beams(kwargs: dict, config) -> int:
    return int(setting(kwargs, config, "num_beams", 1) or 1)


def compile_config(kwargs: dict, config, model):
    """The CompileConfig generate() compiles a decode step with: the call's, else the
    generation config's, else the model's default."""
    from transformers.generation.configuration_utils import CompileConfig

    chosen = setting(kwargs, config, "compile_config")
    if chosen is not None:
        return chosen
    default = getattr(model, "_default_compile_config", None)
    return default() if callable(default) else CompileConfig()


def compile_blocker(model, cache: SphkvCache, kwargs: dict, config, compile_cfg) -> str | None:
    """Why generate() would not compile this cache's decode step (None: it would), by
    transformers' own rules (GenerationMixin._valid_auto_compile_criteria)."""
    if not cache.is_compileable:
        return "dynamic cache: generate() does not compile the decode step (pass cache_implementation='static')"
    if setting(kwargs, config, "disable_compile", False):
        return "generation_config.disable_compile is set"
    if model.device.type not in COMPILED_DEVICE_TYPES and not getattr(compile_cfg, "_compile_all_devices", False):
        return "generate() compiles the decode step on accelerators only"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return "the model's quantization method does not support torch.compile"
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if "disk" in devices or ("cpu" in devices and len(devices) > 1):
        return "the model is offloaded (disk or CPU), which generate() does not compile"
    return None


def why_not_compiled(model, cache: SphkvCache, kwargs: dict, config, compile_cfg) -> str | None:
    """Why this beam search's decode step stays uncompiled (None: it can be compiled)."""
    blocker = compile_blocker(model, cache, kwargs, config, compile_cfg)
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
    """`plain` compiled with this config, kept on the model so later generate() calls reuse it
    (as transformers keeps its own compiled call in get_compiled_call)."""
    options = compile_cfg.to_dict()
    key = (id(plain), repr(sorted((k, repr(sorted(v.items())) if isinstance(v, dict) else repr(v))
                                  for k, v in options.items())))
    cached = getattr(model, "_sphkv_beam_forward", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.compile(plain, **options))
        model._sphkv_beam_forward = cached
    return cached[1]


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
