"""Architectures beyond the test zoo, probed on the CPU: tiny random transformers models (the
zoo's sizes), greedy generate() at high bits on a dynamic and a static cache against dense,
and which layers were rewritten (with the reasons for those kept dense).

    python benchmarks/probe_architectures.py [name ...]      # from the repository root

Not a test: transformers adds and changes models between versions, and a failure here is a
lead to follow, not a regression of this repository (the zoo in tests/test_zoo.py is that).
"""
import sys
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
import transformers as tf

from tests import test_zoo as z
from sphkv_compile import api
L = z._llama_like
C = z._common
H, NL, NH = z.HIDDEN, z.LAYERS, z.HEADS
cands = {
 "gemma3": lambda: tf.Gemma3TextConfig(**C(hidden_size=H, intermediate_size=2*H, num_hidden_layers=NL, num_attention_heads=NH, num_key_value_heads=2, head_dim=H//NH, max_position_embeddings=256, sliding_window=512, attn_logit_softcapping=None)),
 "olmo": lambda: L(tf.OlmoConfig),
 "olmo2": lambda: L(tf.Olmo2Config),
 "cohere": lambda: L(tf.CohereConfig),
 "stablelm": lambda: L(tf.StableLmConfig),
 "granite": lambda: L(tf.GraniteConfig),
 "starcoder2": lambda: L(tf.Starcoder2Config, sliding_window=None),
 "phi": lambda: tf.PhiConfig(**C(hidden_size=H, intermediate_size=2*H, num_hidden_layers=NL, num_attention_heads=NH, max_position_embeddings=256)),
 "gptj": lambda: tf.GPTJConfig(**C(n_embd=H, n_layer=NL, n_head=NH, n_positions=256, rotary_dim=16)),
 "gpt_neo": lambda: tf.GPTNeoConfig(**C(hidden_size=H, num_layers=NL, num_heads=NH, attention_types=[[["global"], NL]], max_position_embeddings=256)),
 "codegen": lambda: tf.CodeGenConfig(**C(n_embd=H, n_layer=NL, n_head=NH, n_positions=256, rotary_dim=16)),
 "bloom": lambda: tf.BloomConfig(**C(hidden_size=H, n_layer=NL, n_head=NH)),
 "qwen2_moe": lambda: L(tf.Qwen2MoeConfig, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=H, shared_expert_intermediate_size=H, use_sliding_window=False),
 "glm": lambda: L(tf.GlmConfig),
 "smollm3": lambda: L(tf.SmolLM3Config) if hasattr(tf, "SmolLM3Config") else None,
 "llama_d96": lambda: tf.LlamaConfig(**C(hidden_size=384, intermediate_size=512, num_hidden_layers=NL, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
}
cands.update({
 "biogpt": lambda: tf.BioGptConfig(**C(hidden_size=H, intermediate_size=2*H, num_hidden_layers=NL, num_attention_heads=NH, max_position_embeddings=256)),
 "qwen3_next": lambda: L(tf.Qwen3NextConfig, head_dim=64, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=H, shared_expert_intermediate_size=H, layer_types=["linear_attention", "full_attention"]),
 "qwen3_5": lambda: L(tf.Qwen3_5TextConfig, head_dim=64, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32, layer_types=["linear_attention", "full_attention"]) if hasattr(tf, "Qwen3_5TextConfig") else None,
 "jamba": lambda: L(tf.JambaConfig, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2, use_mamba_kernels=False),
})
# session 12
def has(name):
    return hasattr(tf, name)


def mla(cls):
    return cls(**C(hidden_size=H, intermediate_size=2*H, num_hidden_layers=NL, num_attention_heads=NH, num_key_value_heads=NH, max_position_embeddings=256, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=H, first_k_dense_replace=NL, n_group=1, topk_group=1))


cands.update({
 "gpt_oss": lambda: L(tf.GptOssConfig, head_dim=H//NH, num_local_experts=2, num_experts_per_tok=1, sliding_window=8, layer_types=["full_attention"]*NL),
 "deepseek_v3": lambda: mla(tf.DeepseekV3Config),
 "deepseek_v2": lambda: mla(tf.DeepseekV2Config),
 "olmoe": lambda: L(tf.OlmoeConfig, num_experts=2, num_experts_per_tok=1),
 "cohere2": lambda: L(tf.Cohere2Config, sliding_window=8, layer_types=["full_attention"]*NL),
 "exaone4": lambda: L(tf.Exaone4Config, sliding_window=None, layer_types=["full_attention"]*NL) if has("Exaone4Config") else None,
 "glm4": lambda: L(tf.Glm4Config),
 "helium": lambda: L(tf.HeliumConfig, head_dim=H//NH) if has("HeliumConfig") else None,
 "nemotron": lambda: L(tf.NemotronConfig),
 "arcee": lambda: L(tf.ArceeConfig) if has("ArceeConfig") else None,
 "phimoe": lambda: L(tf.PhimoeConfig, num_local_experts=2, num_experts_per_tok=1, sliding_window=None),
 "ernie4_5": lambda: L(tf.Ernie4_5Config) if has("Ernie4_5Config") else None,
 "seed_oss": lambda: L(tf.SeedOssConfig) if has("SeedOssConfig") else None,
 "apertus": lambda: L(tf.ApertusConfig) if has("ApertusConfig") else None,
 "falcon_h1": lambda: L(tf.FalconH1Config, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64) if has("FalconH1Config") else None,
 "minimax": lambda: L(tf.MiniMaxConfig, num_local_experts=2, num_experts_per_tok=1, layer_types=["full_attention"]*NL, sliding_window=None) if has("MiniMaxConfig") else None,
 "dots1": lambda: L(tf.Dots1Config, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=H, first_k_dense_replace=NL) if has("Dots1Config") else None,
 "llama4_text": lambda: L(tf.Llama4TextConfig, num_local_experts=1, head_dim=H//NH, no_rope_layers=[1]*NL, attention_chunk_size=8192) if has("Llama4TextConfig") else None,
})


def model_of(model_class, config):
    torch.manual_seed(0)
    return model_class(config).eval()


# not AutoModelForCausalLM configs: these build the model (text-only prompts)
cands.update({
 "mllama": lambda: model_of(tf.MllamaForCausalLM, tf.MllamaTextConfig(**C(hidden_size=H, intermediate_size=2*H, num_hidden_layers=4, num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=256, cross_attention_layers=[1]))),
 "llava": lambda: model_of(tf.LlavaForConditionalGeneration, tf.LlavaConfig(text_config=L(tf.LlamaConfig), vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14), image_token_index=5)),
 "qwen2_vl": lambda: model_of(tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig(text_config=dict(vocab_size=z.VOCAB, hidden_size=H, intermediate_size=2*H, num_hidden_layers=NL, num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=256, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, pad_token_id=0, bos_token_id=1, eos_token_id=2), vision_config=dict(depth=1, embed_dim=32, hidden_size=H, num_heads=2, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2), image_token_id=5, video_token_id=6, vision_start_token_id=7)),
 "bart_decoder": lambda: model_of(tf.BartForCausalLM, tf.BartConfig(**C(d_model=H, encoder_layers=NL, decoder_layers=NL, encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=2*H, decoder_ffn_dim=2*H, max_position_embeddings=256, decoder_start_token_id=2))),
})
only = sys.argv[1:] or list(cands)
for name in only:
    try:
        built = cands[name]()
        model = built if isinstance(built, torch.nn.Module) else z.build(lambda: built, 0)
        ids, mask = z.prompts(0)
        dense = z.greedy(model, ids, mask)
        res = []
        for cache in ("dynamic", "static"):
            fast = z.optimized(model, **z.HIGH_BITS)
            out = z.greedy(fast, ids, mask, cache_implementation=cache)
            sites = api.report()["sites"]
            rew = sum(s["rewritten"] for s in sites)
            reasons = {s["reason"][:80] for s in sites if not s["rewritten"]}
            res.append(f"{cache}: equal={torch.equal(out, dense)} rewritten={rew}/{len(sites)} {reasons or ''}")
        print(name, "|", " | ".join(res), flush=True)
    except Exception as e:
        print(name, "ERROR", type(e).__name__, str(e)[:300].replace("\n", " "), flush=True)
