"""transformers integration: attention computed from the compressed store (SphkvCache).

Registered with transformers under the name "sphkv":
- an attention function (AttentionInterface) that, for a compressed layer, runs
  sphkv::attend (past tokens read from codes + the dense current chunk, causal, GQA/MQA) and
  then sphkv::update_cache (the chunk enters the store: sinks and recent window exact, the
  rest encoded). Layers the plan keeps dense call the model's original implementation.
- sdpa's mask function (AttentionMaskInterface). It must be registered too: without it
  transformers hands the attention function no mask at all, which is silently wrong with
  padding. Compressed layers read the validity of the chunk's tokens (left padding) from it;
  dense layers use it as is (sdpa) or as an additive mask (eager).

Models that compute attention in their own code with F.scaled_dot_product_attention (Falcon)
run their forward under SdpaRouting instead: the SDPA call that reads a compressed layer's
cache-update output is answered from the store, and any other read of it raises.

The attention function finds the cache through the `sphkv_cache` keyword, which the model
forward installed by sphkv_compile.optimize passes down (transformers forwards extra
keywords from the model's forward to the attention function). Some models drop the keywords
on the way (StableLM's decoder layer calls its attention without them): a pre-hook on each
cache-updating attention module hands it the cache it was called with (pass_cache_on).

A compressed layer's cache update returns only the new chunk. So that no attention computed
elsewhere ever sees that chunk as the whole history, the layer counts an update as awaiting
attention until the store has answered it, and a second update (or the end of the forward)
with one still awaiting raises (SphkvLayer.update, check_attended).
"""
from __future__ import annotations

import sys
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from .eager_ops import call_op
from .head_pad import pad_last
from .hf_cache import SphkvCache, SphkvLayer
from .key_centering import centered, set_key_mean_

IMPL_NAME = "sphkv"
CACHE_KWARG = "sphkv_cache"
DENSE_IMPL_ATTR = "_sphkv_dense_impl"  # on the config: the implementation dense layers keep using


class SphkvUnsupportedError(RuntimeError):
    """A compressed layer was asked for attention it cannot compute exactly. layer_idx: the
    cache layer refused, where known (optimize()'s trial forward keeps it dense: hf_trial)."""

    def __init__(self, message: str, layer_idx: int | None = None):
        super().__init__(message)
        self.layer_idx = layer_idx


def pass_cache_on(module, args, kwargs):
    """Forward pre-hook (with_kwargs) of a cache-updating attention module: the SphkvCache it was
    called with, as the `sphkv_cache` keyword its attention function reads, where the model
    did not pass that keyword down itself (StableLM's decoder layer calls attention without
    **kwargs)."""
    if CACHE_KWARG in kwargs:
        return None
    cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, SphkvCache)), None)
    if cache is None:
        return None
    return args, {**kwargs, CACHE_KWARG: cache}


def check_attended(cache: SphkvCache) -> None:
    """After a forward: every compressed layer's update was answered from the store."""
    for layer in cache.compressed_layers():
        if layer.awaiting_attention:
            layer.awaiting_attention = False
            raise SphkvUnsupportedError(unattended_update_message(layer.layer_idx), layer_idx=layer.layer_idx)


def unattended_update_message(layer_idx: int) -> str:
    return (f"layer {layer_idx} updated the compressed cache but its attention never read the store: the model "
            "computes that attention in code sphkv does not reach (e.g. a hard-coded branch beside transformers' "
            "AttentionInterface), which would have seen only the new tokens. Load the model with "
            "attn_implementation='sdpa', or keep its dense cache")


def chunk_validity(mask: torch.Tensor | None, layer: SphkvLayer, n: int) -> torch.Tensor | None:
    """bool [B, n]: which tokens of the current chunk are real (False = left padding).

    mask is transformers' 4D boolean mask [B, 1, q, kv] (True = may attend) or None (plain
    causal, no padding). The last query row sees every chunk token that is not padding; the
    chunk sits at the tail of the mask (dynamic) or at the cache positions (static)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.dtype != torch.bool:
        what = ("an additive mask: the model builds its own (Doge's learned dynamic mask) or was passed one"
                if mask.is_floating_point() else "pass a 2D [batch, tokens] padding mask to the model")
        raise SphkvUnsupportedError(
            f"layer {layer.layer_idx}: expected transformers' 4D boolean attention mask, got "
            f"{tuple(mask.shape)} {mask.dtype} ({what}); the store applies only causal attention over padding",
            layer_idx=layer.layer_idx)
    last_row = mask[:, 0, -1, :]
    if layer.max_cache_len is None:
        return last_row[:, last_row.shape[-1] - n:]
    cols = layer.cumulative_length + torch.arange(n, device=mask.device)
    return last_row.index_select(1, cols)


_checked_mask = None  # (weakref to the last mask checked, its answer): the layers of a forward share it


def mask_is_causal_over_padding(mask: torch.Tensor | None, layer: SphkvLayer, n: int) -> bool:
    """Does this chunk's mask say only "causal over the unpadded tokens"? The store computes that
    and chunk_validity reads only the mask's last row. A mask of several queries that says more
    (image tokens that see each other both ways, a prefix-LM prompt, a custom 4D mask) does not:
    every real query row must equal the last row cut at its own position. Checked in eager mode,
    once per mask object (the layers of a forward share it), over blocks of query rows so the
    check stays small beside the mask itself; a compiled forward is not checked."""
    global _checked_mask
    if mask is None or n == 1 or mask.dim() != 4 or mask.dtype != torch.bool or torch.compiler.is_compiling():
        return True
    if _checked_mask is not None and _checked_mask[0]() is mask:
        return _checked_mask[1]
    rows = mask[:, 0, -n:]  # [B, n, kv]: the chunk's query rows
    kv = rows.shape[-1]
    first = (kv - n) if layer.max_cache_len is None else layer.cumulative_length  # the chunk's first position
    cols = torch.arange(kv, device=mask.device)
    last = rows[:, -1]
    for start in range(0, n, 2048):
        qpos = first + torch.arange(start, min(n, start + 2048), device=mask.device)
        causal = last[:, None, :] & (cols[None, None, :] <= qpos[None, :, None])
        real = last.index_select(1, qpos)  # padded query rows may hold anything
        if ((rows[:, start:start + 2048] != causal) & real[:, :, None]).any():
            _checked_mask = (weakref.ref(mask), False)
            return False
    _checked_mask = (weakref.ref(mask), True)
    return True


def prefill_mask(mask: torch.Tensor, layer: SphkvLayer, n: int, sinks) -> torch.Tensor:
    """A mask that is not causal over padding, honoured where the store can: a prefill into an
    empty store is dense attention over the chunk alone (chunk_attention), so any mask over the
    chunk is exact there; its K/V then enter the store, and later single-token steps read only a
    mask's last row. Returns the mask's [B, 1, n, n] block over the chunk; refuses elsewhere."""
    if layer.stored_any or sinks is not None:
        where = "in a chunk after tokens already stored" if layer.stored_any else "with sink logits (s_aux)"
        raise SphkvUnsupportedError(
            f"layer {layer.layer_idx}: the attention mask lets queries see more or fewer tokens than causal "
            f"attention over the unpadded tokens (bidirectional image or prefix tokens, or a custom mask) {where}; "
            "the compressed store honours such a mask only in the prefill of an empty cache without sink logits. "
            "Fix: put the bidirectional tokens in the first forward (the prompt), or keep this model's cache dense",
            layer_idx=layer.layer_idx)
    return mask[:, :, -n:, :n] if layer.max_cache_len is not None else mask[:, :, -n:, -n:]


def _original_attention(module, impl: str | None) -> Callable:
    """The function the model would have used: its own eager code, or a registered implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise SphkvUnsupportedError(f"{type(module).__name__} has no eager_attention_forward to fall back to")
        return eager
    return ALL_ATTENTION_FUNCTIONS[impl]


def wants_causal(module, kwargs: dict) -> bool:
    """Is this attention call causal when it has no mask? As sdpa decides it: the call's
    is_causal keyword where given, else the module's (True where it has none)."""
    given = kwargs.get("is_causal")
    return bool(given) if given is not None else bool(getattr(module, "is_causal", True))


def _dense_attention(module, query, key, value, attention_mask, **kwargs):
    """The layer stays dense: the model's eager code (with the additive mask eager expects), or
    sdpa for any other original implementation (the "sphkv" mask is sdpa's boolean mask)."""
    config = getattr(module, "config", None)
    impl = getattr(config, DENSE_IMPL_ATTR, "sdpa") if config is not None else "sdpa"
    if impl == "eager":
        mask = _additive_mask(attention_mask, query, key, wants_causal(module, kwargs))
        return _original_attention(module, "eager")(module, query, key, value, mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _additive_mask(mask, query, key, causal: bool):
    """sdpa's boolean mask as the float mask eager attention adds. No mask means causal attention
    where the call is causal (wants_causal), and no mask at all where it is not (Inkling2's block
    residual attends both ways with mask=None on a module with is_causal=False: made causal,
    its tokens differed from dense's, session 33's probe)."""
    if mask is None and not causal:
        return None
    if mask is None:
        tq, tk = query.shape[-2], key.shape[-2]
        qpos = torch.arange(tq, device=query.device)[:, None] + (tk - tq)
        mask = (torch.arange(tk, device=query.device)[None, :] <= qpos)[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def _refuse_unrepresentable(module, layer: SphkvLayer, dropout: float, chunk: int, kwargs: dict) -> None:
    """The plan keeps these layers dense; reaching here means the model asked for something at
    run time that the plan could not see. Refuse rather than answer wrongly."""
    if module.training and dropout:
        raise SphkvUnsupportedError("attention dropout in training cannot run on the compressed store; "
                                    "call model.eval() or use the dense model for training", layer_idx=layer.layer_idx)
    if isinstance(getattr(module, "sinks", None), torch.nn.Parameter) and kwargs.get("s_aux") is None:
        raise SphkvUnsupportedError(f"layer {layer.layer_idx}: the attention module has learned sink logits "
                                    "(`sinks`) but did not pass them as s_aux, the way the store takes them "
                                    "(gpt-oss's attention does)", layer_idx=layer.layer_idx)
    for name in ("softcap",):  # sink logits (gpt-oss's s_aux) join the store's softmax: attend_and_update
        if kwargs.get(name) is not None:
            raise SphkvUnsupportedError(f"layer {layer.layer_idx}: attention with {name!r} is not representable "
                                        "by the compressed store", layer_idx=layer.layer_idx)
    window = kwargs.get("sliding_window")
    bound = _sequence_bound(layer, chunk) if window is not None else None
    if bound is not None and bound > window:
        raise SphkvUnsupportedError(f"layer {layer.layer_idx}: sliding window {window} is only exact on the "
                                    f"store when the whole sequence fits in it (here up to {bound} tokens); "
                                    "the plan compressed it for a shorter sequence", layer_idx=layer.layer_idx)


def _refuse_changed_heads(layer: SphkvLayer, key, value) -> None:
    """The store was sized by the cache update's K/V; attention must read those same heads. A
    model that reshapes K/V between the update and the attention (JetMoE tiles its KV heads
    top_k times) would otherwise store the reshaped chunk beside the update's."""
    want = (layer.store.kv_heads, layer.head_dim)
    for name, t in (("keys", key), ("values", value)):
        if (t.shape[1], t.shape[-1]) != want:
            raise SphkvUnsupportedError(
                f"layer {layer.layer_idx}: the attention reads {name} with {t.shape[1]} heads of {t.shape[-1]}, but the "
                f"cache update stored {want[0]} heads of {want[1]}: the model changes K/V between the cache update "
                "and the attention (e.g. JetMoE repeats its KV heads), which the store cannot follow. Keep this "
                "model's cache dense", layer_idx=layer.layer_idx)


def _sequence_bound(layer: SphkvLayer, chunk: int) -> int:
    """How long the layer's sequence can be after this chunk: a static cache's capacity (a
    constant, so nothing is read from the device), a dynamic cache's actual length."""
    return layer.max_cache_len if layer.max_cache_len is not None else layer.seen + chunk


def sphkv_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention interface: (attn_output [B, T, Hq, d], None)."""
    cache = kwargs.pop(CACHE_KWARG, None)
    layer_idx = getattr(module, "layer_idx", None)
    layer = None
    if isinstance(cache, SphkvCache) and layer_idx is not None and not getattr(module, "is_cross_attention", False):
        layer = cache.layers[layer_idx]
    if not isinstance(layer, SphkvLayer):
        return _dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _refuse_unrepresentable(module, layer, dropout, key.shape[2], kwargs)
    if not layer.awaiting_attention:
        other = next((i for i, x in enumerate(cache.layers) if getattr(x, "awaiting_attention", False)), None)
        if other is not None:
            raise SphkvUnsupportedError(
                f"layer {layer.layer_idx}: its attention follows a cache update of slot {other}, not of its own: "
                "the model runs this attention module for another cache slot (looped or recurrent-depth models "
                "such as HRM and Dory reuse layers at a slot offset), and the store answers attention only for "
                "the slot it updated. Keep this model's cache dense", layer_idx=layer.layer_idx)
        raise SphkvUnsupportedError(
            f"layer {layer.layer_idx}: attention over the compressed store without a cache update before it. The store "
            "answers one attention call per update (it stores the chunk it attends with); this model calls "
            "attention again, or without updating the cache (e.g. DiffLlama's two calls with split values). "
            "Keep this model's cache dense", layer_idx=layer.layer_idx)
    if attention_mask is None and query.shape[2] > 1 and not wants_causal(module, kwargs):
        raise SphkvUnsupportedError(f"layer {layer.layer_idx}: the attention module is not causal "
                                    "(is_causal=False); the compressed store computes only causal attention",
                                    layer_idx=layer.layer_idx)
    chunk_mask = None
    if not mask_is_causal_over_padding(attention_mask, layer, key.shape[2]):
        chunk_mask = prefill_mask(attention_mask, layer, key.shape[2], kwargs.get("s_aux"))
    if layer.store is None:
        layer.lazy_initialization(key, value)
    _refuse_changed_heads(layer, key, value)
    valid = chunk_validity(attention_mask, layer, key.shape[2])
    out = attend_and_update(layer, query, key, value, valid,
                            scaling if scaling is not None else getattr(module, "scaling", None),
                            sinks=kwargs.get("s_aux"), chunk_mask=chunk_mask)
    return out.transpose(1, 2).contiguous(), None


def attend_and_update(layer: SphkvLayer, query, key, value, valid, scaling, sinks=None,
                      chunk_mask=None) -> torch.Tensor:
    """Attention over the store plus the chunk, then the chunk enters the store.
    sinks [Hq]: learned sink logits (gpt-oss), one more logit per query head on no value.
    chunk_mask [B, 1, N, N]: a prefill's own mask where it is not causal (prefill_mask).
    Returns the attention output as [B, Hq, T, d], like SDPA."""
    o = layer.options
    N = key.shape[2]
    if layer.max_cache_len is None:
        layer.reserve(N)
    store = layer.store
    tiers = layer.op_tiers
    kv_dtype = str(store.kv_dtype).removeprefix("torch.")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if sinks is not None:
        sinks = sinks.reshape(-1)
        if sinks.numel() != query.shape[1]:
            raise SphkvUnsupportedError(f"layer {layer.layer_idx}: {sinks.numel()} sink logits for {query.shape[1]} "
                                        "query heads; the store takes one per query head", layer_idx=layer.layer_idx)
    if o.center_keys and sinks is None:  # stored keys are k - μ (key_centering.py); sink logits keep μ = 0
        if not layer.stored_any:
            set_key_mean_(layer.key_mean, key, valid, o.sink)
        key = centered(key, layer.key_mean)
    if not layer.stored_any and query.shape[2] == N and sinks is None:
        # Prefill into an empty store: nothing to read from codes, so this is plain causal
        # attention over the chunk; SDPA does it far faster than the store's reference loop.
        out, mass = chunk_attention(query, key, value, valid, scale, o.utility_window, chunk_mask)
    else:
        dim = store.head_dim  # the model's, or zero-padded for the kernels (head_pad.py): no logit changes
        out, mass = call_op("attend", pad_last(query, dim), layer.state, pad_last(key, dim), pad_last(value, dim),
                            valid, tiers, o.seed, kv_dtype, scale,
                            o.utility_window, o.policy == "rdr",  # rdr: decode attention is utility
                            sinks)
        if dim != query.shape[-1]:  # the padded value columns off; contiguous, as the model's code may .view it
            out = out[..., :query.shape[-1]].contiguous()
    layer.store_chunk(key, value, valid, mass, query, scale)  # the cache update and the budgeting node (hf_cache)
    layer.stored_any = True
    layer.awaiting_attention = False
    if layer.max_cache_len is None:
        layer.advance_dynamic(N)
    else:
        layer.cumulative_length.add_(N)
    return out


def chunk_attention(query, key, value, valid, scale: float, obs_window: int, chunk_mask=None):
    """Causal attention of a chunk over itself (queries = all chunk tokens), GQA, with left
    padding valid [B, N] (None: none), plus what sphkv::attend also returns: the attention
    mass the last obs_window queries put on each token, summed over each KV head's group.
    chunk_mask [B, 1, N, N] replaces causal-over-padding where the model's mask says more
    (prefill_mask); the utility mass stays the causal estimate."""
    B, Hq, N, d = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    if chunk_mask is not None:
        mask = chunk_mask | torch.eye(N, dtype=torch.bool, device=query.device)  # no row all -inf
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1),
                                             attn_mask=mask, scale=scale)
        if valid is not None:
            out = out * valid[:, None, :, None].to(out.dtype)  # as the store: padding queries output 0
    elif valid is None:
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1),
                                             is_causal=True, scale=scale)
    else:
        causal = torch.ones(N, N, dtype=torch.bool, device=query.device).tril()
        # a padding query sees only itself (its output is never used), so no row is all -inf
        mask = (causal & valid[:, None, None, :]) | torch.eye(N, dtype=torch.bool, device=query.device)
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(G, 1), value.repeat_interleave(G, 1),
                                             attn_mask=mask, scale=scale)
        out = out * valid[:, None, :, None].to(out.dtype)  # as the store: padding queries output 0
    mass = torch.zeros(B, Hkv, N, dtype=torch.float32, device=query.device)
    w = min(obs_window, N)
    if w:
        qw = query[:, :, N - w:].reshape(B, Hkv, G * w, d).float()
        logits = qw @ key.float().transpose(-1, -2) * scale
        qpos = (N - w + torch.arange(w, device=query.device)).repeat(G)
        vis = torch.arange(N, device=query.device)[None, :] <= qpos[:, None]
        vis = vis[None, None] if valid is None else vis[None, None] & valid[:, None, None, :]
        p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1)
        mass = torch.nan_to_num(p, nan=0.0).sum(2)
    return out, mass


# ---- models that call SDPA in their own code (no AttentionInterface dispatch, e.g. Falcon) --
class RoutedSphkvCache(SphkvCache):
    """The SphkvCache of a model whose attention calls F.scaled_dot_product_attention itself on
    what cache.update() returned. A compressed layer's update returns only the chunk (see
    SphkvLayer.update); that chunk stays `pending` until SdpaRouting answers the SDPA call that
    reads it, from the store. Any other use of a pending chunk is refused (SdpaRouting)."""

    pending: "PendingChunk | None" = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if isinstance(self.layers[layer_idx], SphkvLayer):
            if self.pending is not None:
                raise SphkvUnsupportedError(
                    f"layer {layer_idx} updated the cache before layer {self.pending.layer_idx}'s attention read "
                    "its chunk; only attention computed by F.scaled_dot_product_attention right after the "
                    "cache update can run on the compressed store", layer_idx=self.pending.layer_idx)
            self.pending = PendingChunk(layer_idx, keys, values)
        return keys, values


class PendingChunk:
    def __init__(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        self.layer_idx, self.key, self.value = layer_idx, key, value


# What may be read from a pending chunk besides SDPA: metadata only, never its values.
_METADATA_FUNCTIONS = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.shape.__get__,
                       torch.Tensor.ndim.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__}


class SdpaRouting(torch.overrides.TorchFunctionMode):
    """Active around the forward of a model whose attention is hard-coded SDPA: the SDPA call
    whose key is a compressed layer's pending chunk becomes attention over that layer's store
    plus the chunk (then the chunk enters the store). Every other SDPA call (dense layers)
    runs as is. Any other op on a pending chunk, e.g. a manual q @ k^T, would silently see only
    the chunk instead of the whole history, so it raises."""

    def __init__(self, cache: RoutedSphkvCache):
        super().__init__()
        self.cache = cache

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pending = self.cache.pending
        if pending is not None:
            if func is F.scaled_dot_product_attention and _sdpa_arg(args, kwargs, 1, "key") is pending.key:
                if _sdpa_arg(args, kwargs, 2, "value") is not pending.value:
                    raise SphkvUnsupportedError(f"layer {pending.layer_idx}: SDPA reads the cache update's keys "
                                                "with other values; the store keeps the pair",
                                                layer_idx=pending.layer_idx)
                self.cache.pending = None
                return sdpa_on_store(self.cache.layers[pending.layer_idx], *args, **kwargs)
            if func not in _METADATA_FUNCTIONS and _reads_chunk(args, kwargs, pending):
                raise SphkvUnsupportedError(
                    f"layer {pending.layer_idx}: {getattr(func, '__name__', func)} reads the cache update's "
                    "output; on the compressed store only F.scaled_dot_product_attention may (load the model "
                    "with attn_implementation='sdpa' and output_attentions=False)", layer_idx=pending.layer_idx)
        return func(*args, **kwargs)


def run_routed(cache: RoutedSphkvCache, forward, /, *args, **kwargs):
    """forward(*args, **kwargs) with its SDPA calls routed to the cache's compressed layers."""
    cache.pending = None  # a forward that raised may have left one behind
    with SdpaRouting(cache):
        out = forward(*args, **kwargs)
    if cache.pending is not None:
        layer_idx, cache.pending = cache.pending.layer_idx, None
        raise SphkvUnsupportedError(f"layer {layer_idx} updated the cache but never attended with "
                                    "F.scaled_dot_product_attention; its chunk was not stored", layer_idx=layer_idx)
    return out


def _sdpa_arg(args, kwargs, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


def _reads_chunk(args, kwargs, pending: PendingChunk) -> bool:
    chunk = (pending.key, pending.value)
    for a in (*args, *kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else (a,)
        if any(x is chunk[0] or x is chunk[1] for x in items):
            return True
    return False


def sdpa_on_store(layer: SphkvLayer, query, key, value, attn_mask=None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention(query, key, value, ...) where key/value are the layer's new
    chunk and the past lives in the store: the same [B, Hq, T, d] output, computed from codes.
    (enable_gqa needs no handling: the store always groups query heads over KV heads.)"""
    if dropout_p:
        raise SphkvUnsupportedError(f"layer {layer.layer_idx}: attention dropout ({dropout_p}) cannot run on the "
                                    "compressed store; call model.eval()", layer_idx=layer.layer_idx)
    if attn_mask is None and query.shape[2] > 1:
        if not is_causal:
            raise SphkvUnsupportedError(f"layer {layer.layer_idx}: non-causal attention over several queries "
                                        "cannot run on the compressed store", layer_idx=layer.layer_idx)
        if layer.stored_any:  # SDPA's is_causal aligns top-left: not causal over the stored past
            raise SphkvUnsupportedError(f"layer {layer.layer_idx}: is_causal=True over a non-empty cache "
                                        "(SDPA aligns it top-left); pass the model's attention mask",
                                        layer_idx=layer.layer_idx)
    if not mask_is_causal_over_padding(attn_mask, layer, key.shape[2]):
        raise SphkvUnsupportedError(f"layer {layer.layer_idx}: the attention mask is not causal over the unpadded "
                                    "tokens; a model whose SDPA calls are routed to the store must mask causally",
                                    layer_idx=layer.layer_idx)
    valid = chunk_validity(attn_mask, layer, key.shape[2])
    return attend_and_update(layer, query, key, value, valid, scale)


_registered = False


def register() -> None:
    """Register the "sphkv" attention and mask implementations with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, sphkv_attention)
    # Without a mask function transformers passes attention_mask=None, silently wrong with padding.
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)
    _registered = True
