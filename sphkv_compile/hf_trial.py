"""optimize()'s trial forward: a short prompt and one decode step through a throwaway sphkv
cache, before the user's first token. The plan (hf_plan.py) reads configs and source; some
attention code only shows at run time what the store cannot follow (DiffLlama calls attention
twice per cache update, JetMoE repeats its KV heads after the update, Doge adds a learned mask).
Each of those raises hf.SphkvUnsupportedError naming its layer; here that layer, and every
layer built from the same attention class and layer type (the same code refuses the same
way), is planned dense for good, with the refusal as its reason. Without the trial the user's
first generate() would raise it instead.

The trial is deterministic (fixed token ids, the RNG state restored) and costs at most a prefill
of TRIAL_PROMPT tokens and a one-token step per refusing attention class (a refusal cuts them
short), plus the pair that passes.
A refusal that needs a real input (a padded batch, a sequence past a sliding window, a custom
4D mask) still raises at run time, naming its cause.
"""
from __future__ import annotations

import torch

from .hf import SphkvUnsupportedError
from .hf_plan import REFUSED_LAYERS_ATTR, cache_updating_classes, text_config

TRIAL_PROMPT = 5  # shorter than any real sliding window, so a window never refuses here


def trial_forward(model, cache_keyword: str, build_cache) -> tuple[dict[int, str], str | None]:
    """Run the trial until it passes; returns ({layer: reason} kept dense by it, why the trial
    could not finish or None). build_cache(model) -> a dynamic SphkvCache under today's plan
    (which honours the refusals found so far)."""
    config = text_config(model.config)
    ids = _trial_ids(model)
    if ids is None:
        return {}, "the config has no vocab_size to pick the trial's token ids from"
    refused: dict[int, str] = {}
    for _ in range(int(config.num_hidden_layers) + 1):
        try:
            cache = build_cache(model)
        except Exception:  # noqa: BLE001  e.g. a budget too small: generate() builds the same cache and says why
            return refused, None
        try:
            _prefill_and_step(model, cache_keyword, cache, ids)
            return refused, None
        except SphkvUnsupportedError as err:
            if err.layer_idx is None:  # nothing to keep dense: the run-time check will say it again
                return refused, f"a refusal that names no layer: {err}"
            found = _layers_like(model, err.layer_idx)
            new = {i: _reason(err, i) for i in found if i not in refused}
            if not new:  # the plan did not keep the refused layer dense: stop rather than loop
                return refused, f"layer {err.layer_idx} was refused again after it was planned dense: {err}"
            refused.update(new)
            setattr(model, REFUSED_LAYERS_ATTR, dict(refused))
        except Exception as err:  # noqa: BLE001  the model cannot run this input; the plan stays unchecked
            return refused, f"{type(err).__name__}: {err}"
    return refused, "the trial kept refusing"


def _reason(err: SphkvUnsupportedError, layer_idx: int) -> str:
    if err.layer_idx in (None, layer_idx):
        return f"refused in optimize()'s trial forward: {err}"
    return f"same attention code as layer {err.layer_idx}, which optimize()'s trial forward saw refused: {err}"


def _prefill_and_step(model, key: str, cache, ids: torch.Tensor) -> None:
    """A prompt, then one decode step, the way generate() feeds them (a 2D mask of ones)."""
    n = ids.shape[-1] - 1
    ones = torch.ones_like(ids)
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        model(input_ids=ids[:, :n], attention_mask=ones[:, :n], use_cache=True, **{key: cache})
        model(input_ids=ids[:, n:], attention_mask=ones, use_cache=True, **{key: cache})


def _trial_ids(model) -> torch.Tensor | None:
    """TRIAL_PROMPT + 1 ordinary token ids on the embedding's device: from the middle of the
    vocabulary, avoiding every special id the configs name (an image token id would ask a
    multimodal model for pixels)."""
    configs = [c for c in (model.config, text_config(model.config)) if c is not None]
    vocab = getattr(configs[-1], "vocab_size", None)
    if not vocab:
        return None
    special = {v for c in configs for k, v in vars(c).items()
               if isinstance(v, int) and (k.endswith("token_id") or k.endswith("token_index"))}
    picked = [t for t in range(vocab // 3, vocab) if t not in special][:TRIAL_PROMPT + 1]
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = model.device
    return torch.tensor([picked], device=device)


def _layers_like(model, layer_idx: int) -> list[int]:
    """The cache layers whose attention module has the same class and layer type as layer
    `layer_idx`'s."""
    config = text_config(model.config)
    layers = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    updating = cache_updating_classes(model)
    owner = {m.layer_idx: type(m) for m in model.modules()
             if type(m) in updating and isinstance(getattr(m, "layer_idx", None), int)}
    if layer_idx not in owner:
        return [layer_idx]
    kind = (owner[layer_idx], types[layer_idx] if layer_idx < len(types) else None)
    return [i for i, cls in owner.items() if i < layers and (cls, types[i] if i < len(types) else None) == kind]
