"""Which attention layers of a transformers model the compressed store can represent exactly.

A layer is compressed only when the store computes the same function as the model's own
attention (causal softmax over all past tokens, one scale, GQA/MQA). Everything else keeps a
dense cache and the model's own attention, with the reason recorded in the report. The plan
is decided from the config and the modules once, before any token is seen, so a layer never
has to switch representation mid-generation (its dense history would be gone).

Sliding windows: the store keeps every token, so a sliding layer is compressed only when its
window cannot mask anything, i.e. is at least the longest sequence the cache can see (a
static cache's capacity, generate's prompt + max_new_tokens, else max_position_embeddings;
see length_bound). A window that can bite keeps the layer dense, with the reason.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import lru_cache

import torch


# on the model: {layer: reason} that optimize()'s trial forward saw refused (hf_trial.py)
REFUSED_LAYERS_ATTR = "_sphkv_refused_layers"


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


def calls_sdpa_itself(model) -> bool:
    """True for models that do not dispatch attention through transformers' AttentionInterface
    (e.g. Falcon): their attention is hard-coded, and only an F.scaled_dot_product_attention
    call on the cache update's output can be routed to the store (hf.SdpaRouting)."""
    if getattr(type(model), "_supports_attention_backend", False):
        return False
    return not _attention_reads_the_interface(model)


def _attention_reads_the_interface(model) -> bool:
    """Some models dispatch through ALL_ATTENTION_FUNCTIONS without declaring
    _supports_attention_backend (StableLM, and hybrids such as Qwen3-Next or Jamba in
    transformers 5.2x). True when every module class whose forward updates the cache reads
    the interface in that forward (and there is at least one): then the sphkv attention
    function serves them. Routing their SDPA calls would not, since transformers' SDPA
    function repeats grouped K/V heads (an indexing of the chunk) before it calls SDPA. A
    class that also keeps a hard-coded branch is caught at run time: its update goes
    unanswered by the store and raises (hf.check_attended)."""
    classes = cache_updating_classes(model)
    return bool(classes) and all(classes.values())


def cache_updating_classes(model) -> dict[type, bool]:
    """{module class whose forward updates the cache: does that forward read the attention
    interface?}, from the forwards' source; a class whose source cannot be read counts as
    updating it without the interface (the safe side: SDPA routing refuses what it cannot
    answer)."""
    return dict(_scan_forwards(frozenset(type(m) for m in model.modules())))


# a forward that updates the cache and offsets its own layer index: `.update(k, v, self.layer_idx +
# cycle_offset)` (HRM, Dory), or through a variable (`cache_layer_idx = self.layer_idx + cache_offset`, Inkling2)
_OFFSET_SLOT = re.compile(r"self\.layer_idx\s*\+")


def slot_offset_class(model) -> str | None:
    """The name of a module class whose forward updates the cache at layer_idx + an offset (one
    attention module serving several cache slots), from the forwards' source, or None."""
    for cls in sorted(cache_updating_classes(model), key=lambda c: c.__qualname__):
        source = _forward_source(cls)
        if source is not None and _OFFSET_SLOT.search(source):
            return cls.__name__
    return None


@lru_cache(maxsize=None)
def _scan_forwards(classes: frozenset) -> tuple[tuple[type, bool], ...]:
    """cache_updating_classes for a set of module classes, read once per set (new_cache asks
    for every cache it builds)."""
    out = []
    for cls in classes:
        source = _forward_source(cls)
        if source is None:
            if not cls.__module__.startswith("torch."):
                out.append((cls, False))
        elif ".update(" in source:
            out.append((cls, "ALL_ATTENTION_FUNCTIONS" in source))
    return tuple(out)


@lru_cache(maxsize=None)
def _forward_source(cls) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # built-in or generated code
        return None


def model_wide_reason(model) -> str | None:
    """A reason that applies to every layer, or None."""
    config = model.config
    if attention_free(config):
        return ("the config names no attention heads (a state-space or recurrent model): no layer holds softmax "
                "attention's K/V")
    looped = slot_offset_class(model)
    if looped is not None:
        return (f"{looped} updates cache slot layer_idx + an offset: the model runs its attention layers for "
                "several cache slots (looped or recurrent-depth layers, as HRM and Dory do), and the store answers "
                "attention only for a layer's own slot")
    if calls_sdpa_itself(model) and config._attn_implementation != "sdpa":
        return (f"{type(model).__name__} computes attention in its own code ({config._attn_implementation!r}) "
                "instead of dispatching through transformers' AttentionInterface; only its SDPA calls can be "
                "routed to the store: load it with attn_implementation='sdpa'")
    not_causal = _non_causal_self_attention(model)
    if not_causal is not None:
        return (f"{not_causal} is not causal (is_causal=False: every token sees the tokens after it, e.g. an "
                "encoder such as BERT without is_decoder=True); the store computes causal attention")
    bidirectional = _setting(text_config(config), "use_bidirectional_attention")
    if bidirectional in (True, "all"):
        return (f"bidirectional attention (use_bidirectional_attention={bidirectional!r}): every token sees the "
                "tokens after it, and the store computes causal attention")
    if getattr(config, "alibi", False):
        return "ALiBi position bias is added to the logits"
    if "reuse" in (_setting(text_config(config), "kv_sharing_modes") or ()):
        return "layers reuse other layers' K/V (kv_sharing_modes); the store answers only a layer's own attention"
    if getattr(config, "attn_logit_softcapping", None):
        return f"logit soft-capping (tanh at {config.attn_logit_softcapping})"
    rank = _setting(text_config(config), "kv_lora_rank")
    if rank:
        return (f"multi-head latent attention (kv_lora_rank={rank}): the cache holds a "
                "compressed latent that the attention expands into keys and values, not per-head K/V")
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (cross-attention)"
    if getattr(config, "position_embedding_type", "absolute") in ("alibi", "relative_key", "relative_key_query"):
        return f"{config.position_embedding_type} position bias is added to the logits"
    return None


def attention_free(config) -> bool:
    """Does the config name no attention heads (a state-space or recurrent model: Mamba, xLSTM)?"""
    return _setting(text_config(config), "num_attention_heads") is None


def _setting(config, name: str):
    """config.<name>, or None. On a heterogeneous config (transformers' per_layer_config) an
    attribute its layers may set differently raises when read off the global config (dots3's head
    counts: AmbiguousGlobalPerLayerAttributeError, a RuntimeError); there, the first layer's value
    that is set, so a model-wide reason holds if any layer has it."""
    try:
        return getattr(config, name, None)
    except RuntimeError:
        layers = getattr(config, "per_layer_config", None)
        if layers is None:
            raise
        return next((v for v in (getattr(c, name, None) for c in layers) if v), None)


def _non_causal_self_attention(model) -> str | None:
    """The class name of a self-attention module with a layer index that says it is not causal
    (transformers' attention modules carry is_causal; SDPA and flash read it), or None.
    Cross-attention modules (to an encoder's states, never causal) are not self-attention: some
    carry is_cross_attention, others are known only by their place (BART's encoder_attn, BERT's
    crossattention). Only the language model is searched (a vision tower's attention is not causal
    and holds no cache)."""
    for name, module in _language_model(model).named_modules():
        if (getattr(module, "is_causal", None) is False and getattr(module, "layer_idx", None) is not None
                and not getattr(module, "is_cross_attention", False)
                and not any(word in name.lower() for word in _CROSS_ATTENTION_NAMES)):
            return type(module).__name__
    return None


_CROSS_ATTENTION_NAMES = ("cross", "encoder_attn", "encdec")


def _language_model(model) -> torch.nn.Module:
    """The decoder that holds the KV cache (get_decoder(), where the model has one), else the model."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return model
    return decoder if isinstance(decoder, torch.nn.Module) else model


def text_config(config):
    """The language model's config (a multimodal config's text part)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def plan_layers(model, max_cache_len: int | None, max_tokens: int | None = None) -> list[LayerPlan]:
    """One LayerPlan per decoder layer (cache layer index). max_cache_len: a static cache's
    capacity (None: dynamic). max_tokens: a bound on a dynamic cache's sequence known up front
    (generate's prompt + max_new_tokens), if any."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = int(config.num_hidden_layers)
    wide = model_wide_reason(model)
    bound = length_bound(config, max_cache_len, max_tokens)
    cross = set(getattr(config, "cross_attention_layers", None) or ())  # Mllama's image layers
    refused = getattr(model, REFUSED_LAYERS_ATTR, None) or {}
    plans = []
    for i, layer_type in enumerate(_layer_types(config, num_layers)):
        if wide:
            plans.append(LayerPlan(i, False, wide))
            continue
        if i in refused:
            plans.append(LayerPlan(i, False, refused[i]))
            continue
        if i in cross:
            plans.append(LayerPlan(i, False, "cross-attention layer: its keys and values come from another input "
                                             "(the image), not from this sequence"))
            continue
        if layer_type not in ("full_attention", "sliding_attention"):
            plans.append(LayerPlan(i, False, f"layer type {layer_type!r} is not softmax attention over a KV cache"))
            continue
        window = _sliding_window(config, layer_type)
        if window is not None and (bound is None or bound > window):
            plans.append(LayerPlan(i, False, f"sliding window of {window} tokens can hide tokens of a sequence up "
                                              f"to {bound or 'unbounded'} long (the store keeps every token: it is "
                                              "exact only when the window cannot mask anything)", window))
            continue
        plans.append(LayerPlan(i, True, None, window))
    return plans


def length_bound(config, max_cache_len: int | None, max_tokens: int | None) -> int | None:
    """The longest sequence the cache can see: a static cache's capacity, else the bound the
    caller knows (generate), else the model's max_position_embeddings. A sliding window at
    least this long masks nothing, so its layer is plain causal attention and is compressed;
    the attention function still refuses a dynamic sequence that outgrows the window
    (hf._refuse_unrepresentable), rather than answer differently from the model."""
    if max_cache_len is not None:
        return int(max_cache_len)
    if max_tokens is not None:
        return int(max_tokens)
    positions = getattr(config, "max_position_embeddings", None)
    return int(positions) if positions else None


def layer_geometries(model) -> list[tuple[int, int]]:
    """(KV heads, head dim) of each decoder layer's attention, from the config. Heterogeneous
    configs (transformers' per_layer_config: Gemma 4's global layers have twice the head dim of
    its sliding ones) answer per layer; reading head_dim off their global config raises."""
    config = text_config(model.config)
    layers = int(config.num_hidden_layers)
    if getattr(config, "is_heterogeneous", False):
        return [_geometry(config.per_layer_config[i]) for i in range(layers)]
    return [_geometry(config)] * layers


def _geometry(config) -> tuple[int, int]:
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "multi_query", False):
        kv = 1
    else:
        kv = getattr(config, "num_key_value_heads", None) or heads
    return int(kv), int(head_dim)


def compressed_geometries(model, plans: list[LayerPlan]) -> list[tuple[int, int]]:
    """The distinct (KV heads, head dim) of the layers the plan compresses, in layer order."""
    compressed = [p.layer_idx for p in plans if p.compressed]
    if not compressed:  # a model without attention layers may have no head counts to read
        return []
    geometries = layer_geometries(model)
    return list(dict.fromkeys(geometries[i] for i in compressed))


def model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
