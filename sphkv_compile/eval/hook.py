"""Drives SmolLM2 with a private attention function, so each method's compressed cache is
what the model attends to.

A forward runs with use_cache=False and explicit position ids, so every layer's attention
receives only the current chunk's post-RoPE q, k, v. In `prefill` mode the chunk is the whole
prompt: attention is dense and causal, and the session records per layer the keys, values,
the observation-window mass (the last `obs_window` queries, summed over each KV head's query
group) and, when asked, H2O's accumulated mass (every query). In `continue` mode each layer
attends through its method's cache (stored prefix + the causal chunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMPL_NAME = "_sphkv_eval_attention"
_SESSION: "Session | None" = None


@dataclass
class LayerCapture:
    keys: torch.Tensor  # [1, Hkv, T, d] float32, post-RoPE
    values: torch.Tensor
    observed: torch.Tensor  # [1, Hkv, T]
    accumulated: torch.Tensor | None  # [1, Hkv, T] or None
    window_queries: torch.Tensor | None = None  # [1, Hq, W, d]: the observation window's queries, scaled


@dataclass
class Session:
    mode: str = "prefill"
    obs_window: int = 32
    want_accumulated: bool = False
    captures: dict[int, LayerCapture] = field(default_factory=dict)
    caches: dict = field(default_factory=dict)  # layer -> object with attend(q, k, v) -> [1, Hq, Tq, d]


def _grouped_mass(q: torch.Tensor, k: torch.Tensor, rows_from: int, scale: float, chunk: int = 512) -> torch.Tensor:
    """Causal attention mass of queries rows_from.. on every key, summed over queries and each
    KV head's group: [1, Hkv, T]."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    mass = torch.zeros(B, Hkv, T)
    for s in range(rows_from, T, chunk):
        e = min(T, s + chunk)
        qc = q[:, :, s:e].reshape(B, Hkv, G * (e - s), d)
        lg = qc @ k.transpose(-1, -2) * scale
        pos = torch.arange(s, e).repeat(G)
        lg = lg.masked_fill(torch.arange(T)[None, :] > pos[:, None], float("-inf"))
        mass += torch.softmax(lg, -1).sum(2)
    return mass


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    session = _SESSION
    if session is None:
        raise RuntimeError("the eval attention ran outside an eval session (use hook.session())")
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query.float(), key.float(), value.float()
    if session.mode == "prefill":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        T = q.shape[2]
        session.captures[layer] = LayerCapture(
            k, v, _grouped_mass(q, k, T - min(session.obs_window, T), scale),
            _grouped_mass(q, k, 0, scale) if session.want_accumulated else None,
            q[:, :, T - min(session.obs_window, T):] * scale)
    else:
        out = session.caches[layer].attend(q, k, v, scale)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL_NAME, _attention)
    # a custom implementation needs a mask function too (it ignores the mask: batch 1, causal)
    AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)


@torch.no_grad()
def forward(model, ids: torch.Tensor, start: int, session: Session) -> torch.Tensor:
    """Logits [T, vocab] of ids [1, T] placed at positions start.., through `session`."""
    global _SESSION
    register()
    previous = model.config._attn_implementation
    _SESSION = session
    model.set_attn_implementation(IMPL_NAME)
    try:
        pos = torch.arange(start, start + ids.shape[1])[None]
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
    finally:
        model.set_attn_implementation(previous)
        _SESSION = None
