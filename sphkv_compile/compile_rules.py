"""When generate() compiles a decode step: transformers' own rules
(GenerationMixin._valid_auto_compile_criteria), read from one generate() call's keywords, its
generation config and the model. The greedy step's report (api._decode_step_mode) and beam
search's compiled step (beam_decode.py) both follow them.
"""
from __future__ import annotations

# the device types transformers auto-compiles generate()'s decode step on
# (GenerationMixin._valid_auto_compile_criteria)
COMPILED_DEVICE_TYPES = ("cuda", "xpu", "neuron", "tpu")


def setting(kwargs: dict, config, name: str, default=None):
    """A generation setting of this generate() call: its keyword, else the generation config's
    (generate() lets keywords override the config)."""
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, default)


def compile_config(kwargs: dict, config, model):
    """The CompileConfig generate() compiles a decode step with: the call's, else the
    generation config's, else the model's default."""
    from transformers.generation.configuration_utils import CompileConfig

    chosen = setting(kwargs, config, "compile_config")
    if chosen is not None:
        return chosen
    default = getattr(model, "_default_compile_config", None)
    return default() if callable(default) else CompileConfig()


def compile_blocker(model, cache, kwargs: dict, config, compile_cfg) -> str | None:
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
