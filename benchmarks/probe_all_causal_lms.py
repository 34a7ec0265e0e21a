"""Every causal-LM architecture the installed transformers registers, shrunk to a tiny random
model and probed on the CPU: greedy generate() at high bits on a dynamic and a static cache
against dense, and which layers were rewritten (with the reasons for those kept dense).

    python benchmarks/probe_all_causal_lms.py [--out LOG] [model_type ...]   # from the repo root

probe_architectures.py hand-writes a tiny config per model; this script derives one from each
config class's defaults (sizes, layer counts, experts and per-layer lists cut down), so it
reaches models nobody has looked at yet. Each model gets one line:

    ok       greedy tokens equal dense's on both caches (n/N layers rewritten; reasons for the rest)
    tie      tokens differ, but teacher-forced on dense's tokens the store moves the logits by more
             than dense's smallest top-2 gap: a near tie the 12-bit codec's error decides
    DIFFERS  tokens differ otherwise: a lead to follow
    REFUSED  sphkv refused the model at run time with an error naming the cause (SphkvUnsupportedError)
    SPHKV    sphkv failed otherwise while dense ran: a lead to follow
    DIED     the probe's process died: a lead to follow
    skip     the probe could not build or run the dense model at its tiny size (not a sphkv result)

Not a test: transformers adds and changes models between versions.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from sphkv_compile import api  # noqa: E402
from sphkv_compile.hf import SphkvUnsupportedError  # noqa: E402
from tests import test_zoo as zoo  # noqa: E402

LAYERS = 2
MEMORY_GB = 10
# config keys (their spellings across models) -> the tiny value; only keys a config already has are set
TINY = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "model_dim", "hidden_size_global"), 256),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim"), 512),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                     "moe_ffn_hidden_size"), 256),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "swa_num_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                     "swa_num_key_value_heads"), 2),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "swa_head_dim"), 64),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"), 256),
    # two experts, both active: a top-1 routing flip is a discrete change no codec error bound covers
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 2),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "moe_top_k"), 2),
    # one expert group, chosen: DeepSeek-V3's grouped routing needs n_group | experts, topk_group <= n_group
    "n_group": 1, "topk_group": 1,
    # Mamba-2 state: one group of B/C (it must divide the heads), a small state
    **dict.fromkeys(("n_groups", "mamba_n_groups", "mamba_ngroups"), 1),
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size"), 16),
    # Jamba/Zamba place attention at layer offset + k * period: the second of the two layers
    "attn_layer_period": LAYERS, "attn_layer_offset": LAYERS - 1,
    "attn_layer_indices": [LAYERS - 1],  # Bamba's default has none: all Mamba, which transformers' masks can't run
    # sparse-attention indexers (DeepSeek-V3.2, Kolibri): Kolibri needs at most the query heads of one KV head
    **dict.fromkeys(("index_n_heads", "index_num_heads"), 2),
    # Gemma 3n's last layers reuse an earlier layer's K/V of their type: two layers hold no producer of both
    "num_kv_shared_layers": 0,
    "n_shared_experts": 1, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 48, "v_head_dim": 64,
    "encoder_hash_byte_group_vocab": 512,  # BLT's hashed n-gram embeddings: one table per n-gram size
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size"), zoo.VOCAB),
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}

# where no rule on config keys fits: model_type -> keys set last, each with why
OVERRIDES = {
    # the default is all Mamba (no attention layer: transformers' masks can't run); keep one of each
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # Zamba ties one shared attention block across its hybrid layers and fails to build with only one
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig lacks, and clamps by clip_qkv,
    # which defaults to None: DBRX's defaults build at no size; DBRX's own values
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0}},
    # LFM2-MoE's default names no layer_types (checkpoints do) and its model needs them
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Qwen4-Exp's indexed_attention layers build the QSA indexer, whose settings default to None:
    # a budget of 4 blocks of 4 tokens, under the probe's 44 tokens, so the sparse selection acts
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 64,
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    # the composite Qwen4-Exp (text + vision): its text model as qwen4_exp_text above
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 64,
                                  "indexer_budget": 16, "indexer_compress_ratio": 4}},
    # dots3's vision and audio adapters take their tower's width and give the text model's
    "dots3_note": {"vision_config": {"adapter_in_dim": 256, "adapter_out_dim": 256},
                   "audio_config": {"adapter_input_size": 256, "adapter_out_dim": 256}},
    # Cohere Compass reads rope_parameters per layer type (None: a NoPE layer); its default names none
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # X-MOD routes each token through its language's adapter; without lang_ids it needs a default language
    "xmod": {"default_language": "en_XX"},
    # Reformer's LM head needs is_decoder; its axial position embeddings factor max_position_embeddings
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 16]},
    # ZAYA validates num_experts_per_tok == 1 (top-1 routing: a flip there is a discrete change, see TINY)
    "zaya": {"num_experts_per_tok": 1},
    # Dory's input, recurrent (looped) and output blocks must sum to num_hidden_layers, and its to_dict
    # doubles every count (an 'mlp' entry after each layer): one layer per block, given undoubled
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}


def tiny_config(model_type: str):
    """The config class's defaults with TINY applied, per-layer lists cut to LAYERS (keeping one
    of each layer type, so a hybrid keeps its softmax layers), or None for MusicGen. A composite
    config (text + vision/audio towers: Gemma 3, Llama 4, Qwen3.5, ...; what AutoModelForCausalLM
    builds for those checkpoints) has every sub-config shrunk alike; the probe feeds it text only."""
    cls = CONFIG_MAPPING[model_type]
    if "text_encoder" in getattr(cls, "sub_configs", {}):
        # MusicGen's text encoder + audio codec + decoder: its decoder reads codebook-major ids
        return None
    return cls.from_dict(_tiny_dict(cls, cls().to_dict(), OVERRIDES.get(model_type, {})))


def _tiny_dict(cls, defaults: dict, overrides: dict) -> dict:
    """The dict of defaults shrunk (tiny_config), sub-configs (BLT's, DBRX's) shrunk alike."""
    layers = next((defaults[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in defaults),
                  None)
    # TINY's spellings through the config's aliases (Kimi's num_experts_per_tok is num_experts_per_token)
    aliases = getattr(cls, "attribute_map", {})
    tiny = {k: v for k, v in TINY.items() if k in defaults}
    for key, value in TINY.items():
        if aliases.get(key, key) in defaults:
            tiny.setdefault(aliases.get(key, key), value)  # a key's own spelling, else its first alias, wins
    if "kv_lora_rank" in tiny and "num_key_value_heads" in tiny:
        # MLA (DeepSeek-V2 and its kin) expands its latent into K/V for every head: no GQA
        tiny["num_key_value_heads"] = tiny["num_attention_heads"]
        if defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
            tiny["head_dim"] = tiny["qk_rope_head_dim"]  # there head_dim sizes the rotary embedding
    for heads, dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("num_heads", "head_dim", "expand"),
                               ("mamba_num_heads", "mamba_head_dim", "expand")):
        # Mamba-2 splits its inner width (expand * hidden_size) into heads: keep heads * head size equal to it
        if (all(k in defaults for k in (heads, dim, expand))
                and defaults[heads] * defaults[dim] == defaults[expand] * defaults["hidden_size"]):
            tiny[heads] = 4
            tiny[dim] = defaults[expand] * tiny["hidden_size"] // 4
    if layers:
        layer_types = defaults.get(aliases.get("layer_types", "layer_types"))
        kept = _layers_kept(layer_types, layers)
        for key, value in defaults.items():
            if isinstance(value, list) and len(value) == layers:
                if key in tiny:  # a size given per layer (Gemma 3n's intermediate_size): the tiny size
                    tiny[key] = [tiny[key]] * len(kept)
                elif not _layer_indices(key, value):  # else left to __post_init__ (see _underived)
                    tiny[key] = [value[i] for i in kept]
            elif (isinstance(value, list) and LAYERS < len(value) < layers and all(isinstance(v, str) for v in value)
                  and len(set(value)) < len(value)):
                # a repeating pattern of layer types (RecurrentGemma's block_types): one of each, in order
                tiny[key] = [value[i] for i in _layers_kept(value, len(value))]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                # per-layer overrides keyed by index (Gemma 4, dots3): cut, their sizes scaled like the base's
                tiny[key] = {k: _scaled(v, defaults, tiny) if isinstance(v, dict) else v
                             for k, v in _cut_layer_dict(value, kept).items()}
    subs = {key: sub_cls for key, sub_cls in getattr(cls, "sub_configs", {}).items()
            if isinstance(defaults.get(key), dict) and dataclasses.is_dataclass(sub_cls) and key not in tiny}
    for key, sub_cls in subs.items():
        tiny[key] = _tiny_dict(sub_cls, defaults[key], overrides.get(key, {}))
    tiny.update({k: v for k, v in overrides.items() if k not in subs})
    return {**_underived(cls, defaults, tiny), **tiny}


def _underived(cls, defaults: dict, tiny: dict) -> dict:
    """The defaults less what __post_init__ derived from the full sizes (qk_head_dim from the MLA
    dims, RWKV's attention_hidden_size from hidden_size, ...): attributes that are no dataclass
    field, and fields defaulting to None, unless TINY sets them. __post_init__ derives them again
    from the tiny sizes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    base = {f.name for f in dataclasses.fields(tf.PreTrainedConfig)} | {"_name_or_path", "model_type", "output_attentions"}
    derived = {k for k in defaults if k not in tiny and k not in base and k not in getattr(cls, "sub_configs", {})
               and (k not in fields or (fields[k].default is None and defaults[k] is not None))}
    return {k: (None if k in derived else v) for k, v in defaults.items() if k in fields or k not in derived}


def _scaled(per_layer: dict, defaults: dict, tiny: dict) -> dict:
    """One layer's overrides of sizes, scaled by the base size's shrink (Gemma 4's full-attention
    head_dim stays twice the sliding one); MLA's head_dim = nope + rope kept where it held."""
    out = {k: v * tiny[k] // defaults[k] if isinstance(v, int) and k in tiny and defaults.get(k)
           and v * tiny[k] % defaults[k] == 0 else v for k, v in per_layer.items()}
    if "qk_nope_head_dim" in out and per_layer["qk_nope_head_dim"] + defaults.get("qk_rope_head_dim", 0) == \
            defaults.get("head_dim") and "head_dim" in tiny:
        out["qk_nope_head_dim"] = tiny["head_dim"] - tiny["qk_rope_head_dim"]
    return out


def _layer_indices(key: str, value: list) -> bool:
    """A per-layer list of layer indices (Kolibri's kv_source_layers; not a 0/1 flag per layer like
    Llama 4's no_rope_layers): cut, it would name layers that are gone."""
    return ("layer" in key and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and max(value) > 1)


def _layers_kept(layer_types, layers: int) -> list[int]:
    """LAYERS layer indices: the first of each layer type (so a hybrid keeps its softmax layers and a
    sliding/full model both kinds), then the first layers."""
    firsts = list({t: i for i, t in reversed(list(enumerate(layer_types or [])))}.values())[::-1]
    return sorted((sorted(firsts) + [i for i in range(layers) if i not in firsts])[:LAYERS])


def _cut_layer_dict(per_layer: dict, kept: list[int]) -> dict:
    width = len(str(next(iter(per_layer))))
    old = {int(k): v for k, v in per_layer.items()}
    return {(f"{new:0{width}d}" if isinstance(next(iter(per_layer)), str) else new): old[i]
            for new, i in enumerate(kept) if i in old}


def probe(model_type: str) -> str:
    try:
        config = tiny_config(model_type)
        if config is None:
            return "skip     MusicGen (text encoder + audio codec + a decoder that reads codebook-major ids)"
        model = zoo.build(lambda: config, 0)
        ids, mask = zoo.prompts(0)
        dense = zoo.greedy(model, ids, mask)
    except Exception as err:  # noqa: BLE001  the probe's own limits, reported and passed over
        return f"skip     dense model at tiny size: {type(err).__name__}: {_short(err)}"
    results, differing, rewritten = [], [], 0
    cache = "dynamic"
    try:
        for cache in ("dynamic", "static"):
            # one optimized copy at a time: phi4_multimodal's default vision and audio towers stay
            # 3.4 GB at tiny text size, and a second copy alive passed MEMORY_GB (session 32)
            fast = None
            gc.collect()
            fast = zoo.optimized(model, **zoo.HIGH_BITS)
            out = zoo.greedy(fast, ids, mask, cache_implementation=cache)
            sites = api.report()["sites"]
            kept = sorted({s["reason"][:90] for s in sites if not s["rewritten"]})
            if not torch.equal(out, dense):
                differing.append(cache)
            rewritten += sum(s["rewritten"] for s in sites)
            results.append(f"{cache} {sum(s['rewritten'] for s in sites)}/{len(sites)}{' ' + str(kept) if kept else ''}")
    except Exception as err:  # noqa: BLE001
        if _with_a_cache_passed_in(model, ids, mask, dense, cache) != "equal":
            return (f"skip     transformers' own {cache} cache fails too (or answers otherwise); sphkv's error: "
                    f"{type(err).__name__}: {_short(err)}")
        if isinstance(err, SphkvUnsupportedError):
            return f"REFUSED  {_short(err)}"
        return f"SPHKV    {type(err).__name__}: {_short(err)}"
    if not differing:
        return f"ok       rewritten: {'; '.join(results)}"
    if all(_with_a_cache_passed_in(model, ids, mask, dense, kind) != "equal" for kind in differing):
        return (f"skip     transformers' own {' and '.join(differing)} cache changes dense's tokens too; "
                f"rewritten: {'; '.join(results)}")
    if not rewritten:
        return f"DIFFERS  every layer dense; rewritten: {'; '.join(results)}"
    change, gap, scale = _diagnose(model, ids, mask, dense)
    label = "tie     " if change >= gap else "DIFFERS "
    return (f"{label} max |logit change| {change:.1e} (logits up to {scale:.1f}) >= smallest top-2 gap in dense "
            f"{gap:.1e}; rewritten: {'; '.join(results)}").replace(">=", ">=" if change >= gap else "<")


def _diagnose(model, ids, mask, dense) -> tuple[float, float, float]:
    """Teacher-forced on dense's tokens: (the largest logit change the store makes, the smallest
    gap between dense's two best logits, the logits' scale). A greedy flip where the change
    exceeds the gap is a tie that the codec's error decides ('tie'), not a wrong answer."""
    full = torch.cat((ids, dense), 1)
    full_mask = torch.cat((mask, torch.ones_like(dense)), 1)
    with torch.no_grad():
        want = zoo.teacher_forced_logits(model, full, full_mask)
        fast = zoo.optimized(model, **zoo.HIGH_BITS)
        got = zoo.teacher_forced_logits(fast, full, full_mask, api.new_cache(fast))
    top2 = want.float().topk(2, dim=-1).values
    return ((got - want).abs().max().item(), (top2[..., 0] - top2[..., 1]).min().item(), want.abs().max().item())


def _with_a_cache_passed_in(model, ids, mask, dense, kind: str = "dynamic") -> str:
    """sphkv hands generate() a cache; some models' generate() breaks, or answers otherwise,
    with a cache passed in (dynamic) or with a static one. 'equal', 'differs' or 'fails'."""
    try:
        if kind == "static":
            out = zoo.greedy(model, ids, mask, cache_implementation="static")
        else:
            out = zoo.greedy(model, ids, mask, **{api.cache_keyword(model): tf.DynamicCache(config=model.config)})
    except Exception:  # noqa: BLE001
        return "fails"
    return "equal" if torch.equal(out, dense) else "differs"


def _limit_memory() -> None:
    """Each probe runs in a worker process capped at MEMORY_GB: a default config that stays huge
    after shrinking fails with a MemoryError instead of taking the machine down."""
    import resource

    cap = MEMORY_GB << 30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    warnings.simplefilter("ignore")


def probe_isolated(model_types, timeout_s: float):
    """Yields (model_type, line), each probe in a worker process that a timeout or a crash replaces."""
    from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing

    pool = None
    for model_type in model_types:
        if pool is None:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_limit_memory)
        future = pool.submit(probe, model_type)
        try:
            yield model_type, future.result(timeout=timeout_s)
            continue
        except FutureTimeout:
            line = f"skip     no answer within {timeout_s:.0f} s (tiny config still too slow on this CPU?)"
        except BrokenProcessPool:
            line = "DIED     the probe's process died (dense or sphkv: run this model_type alone to see which)"
        for process in list(pool._processes.values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        pool = None
        yield model_type, line
    if pool is not None:
        pool.shutdown()


def _short(err: Exception) -> str:
    return str(err).replace("\n", " ")[:240]


def main() -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--out", type=Path, help="also write the lines to this log")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per model type")
    args = parser.parse_args()
    types = args.model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    lines = [f"# transformers {tf.__version__}, torch {torch.__version__}, {len(types)} causal-LM model types, "
             f"each in a process capped at {MEMORY_GB} GB"]
    start = time.time()
    bar = tqdm(total=len(types), unit="model")
    for model_type, result in probe_isolated(types, args.timeout):
        line = f"{model_type:28s} {result}"
        tqdm.write(line)
        lines.append(line)
        bar.update()
    bar.close()
    counts = {k: sum(line.split()[1] == k for line in lines[1:]) for k in ("ok", "tie", "DIFFERS", "REFUSED", "SPHKV", "DIED", "skip")}
    lines.append(f"# {counts} in {time.time() - start:.0f} s")
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
