"""A Llama whose attention calls F.scaled_dot_product_attention in its own code, on what the
cache update returned, instead of dispatching through transformers' AttentionInterface: the
shape of Falcon up to transformers 5.24 and of many remote-code models. sphkv reaches such a
model only by routing those SDPA calls to the store (hf.SdpaRouting); this model keeps that
path under test whatever the installed transformers' own models do.

Like Falcon, it computes the weights itself (q @ k^T, softmax) under eager attention or when
asked for them (output_attentions), which on the store must be refused, not answered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers as tf
from transformers.models.llama import modeling_llama

MODEL_TYPE = "sphkv_test_own_sdpa_llama"


class OwnSdpaLlamaConfig(tf.LlamaConfig):
    model_type = MODEL_TYPE


class OwnSdpaAttention(modeling_llama.LlamaAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        weights = None
        if self.config._attn_implementation == "eager" or kwargs.get("output_attentions"):
            # the model's own matmul-softmax (Falcon's eager branch)
            kr = k.repeat_interleave(self.num_key_value_groups, dim=1)
            vr = v.repeat_interleave(self.num_key_value_groups, dim=1)
            logits = q @ kr.transpose(-1, -2) * self.scaling
            if attention_mask is not None:
                logits = (logits.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                          else logits + attention_mask)
            weights = torch.softmax(logits.float(), -1).to(q.dtype)
            out = weights @ vr
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling,
                                                 is_causal=attention_mask is None and q.shape[2] > 1,
                                                 enable_gqa=self.num_key_value_groups > 1)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), weights


class OwnSdpaLlamaForCausalLM(tf.LlamaForCausalLM):
    config_class = OwnSdpaLlamaConfig
    _supports_attention_backend = False  # its attention does not read the interface

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.__class__ = OwnSdpaAttention  # same weights, own forward


def register() -> None:
    """Make AutoModelForCausalLM.from_config build it (idempotent)."""
    if MODEL_TYPE not in tf.CONFIG_MAPPING:
        tf.AutoConfig.register(MODEL_TYPE, OwnSdpaLlamaConfig)
        tf.AutoModelForCausalLM.register(OwnSdpaLlamaConfig, OwnSdpaLlamaForCausalLM)
