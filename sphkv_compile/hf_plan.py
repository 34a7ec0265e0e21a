"""Which attention layers of a transformers model the compressed store can represent exactly.

A layer is compressed only when the store computes the same function as the model's own
attention (causal softmax over all past tokens, one scale, GQA/MQA). Everything else keeps a
dense cache and the model's own attention, with the reason recorded in the report. The plan
is decided from the config and the modules once, before any token is seen, so a layer never
has to switch representation mid-generation (its dense history would be gone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerPlan:
    layer_idx: int
    compressed: bool
    reason: str | None = None  # why the layer stays dense
    sliding_window: int | None = None


def _layer_types(config, num_layers: int) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:num_layers]
    return ["full_attention"] * num_layers


def _sliding_window(config, layer_type: str) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if getattr(config, "layer_types", None):  # hybrid models: only the sliding layers use it
        return int(window) if layer_type == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/Qwen3 keep the field but disable it
        return None
    return int(window)


def model_wide_reason(model) -> str | None:
    """A reason that applies to every layer, or None."""
    config = model.config
    if not getattr(type(model), "_supports_attention_backend", False):
        return (f"{type(model).__name__} computes attention in its own code instead of dispatching through "
                "transformers' AttentionInterface, so its attention cannot be replaced")
    if getattr(config, "alibi", False):
        return "ALiBi position bias is added to the logits"
    if getattr(config, "attn_logit_softcapping", None):
        return f"logit soft-capping (tanh at {config.attn_logit_softcapping})"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (cross-attention)"
    if getattr(config, "position_embedding_type", "absolute") in ("alibi", "relative_key", "relative_key_query"):
        return f"{config.position_embedding_type} position bias is added to the logits"
    return None


def plan_layers(model, max_cache_len: int | None) -> list[LayerPlan]:
    """One LayerPlan per decoder layer (cache layer index)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = int(config.num_hidden_layers)
    wide = model_wide_reason(model)
    plans = []
    for i, layer_type in enumerate(_layer_types(config, num_layers)):
        if wide:
            plans.append(LayerPlan(i, False, wide))
            continue
        if layer_type not in ("full_attention", "sliding_attention"):
            plans.append(LayerPlan(i, False, f"layer type {layer_type!r} is not softmax attention over a KV cache"))
            continue
        window = _sliding_window(config, layer_type)
        if window is not None and (max_cache_len is None or max_cache_len > window):
            plans.append(LayerPlan(i, False, f"sliding window of {window} tokens (the store keeps every token; "
                                              "exact only while the sequence fits in the window)", window))
            continue
        plans.append(LayerPlan(i, True, None, window))
    return plans


def kv_geometry(model) -> tuple[int, int]:
    """(KV heads, head dim) of the model's attention, from its config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "multi_query", False):
        kv = 1
    else:
        kv = getattr(config, "num_key_value_heads", None) or heads
    return int(kv), int(head_dim)


def model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
