"""The tiny random Llama (2 layers, 4 query / 2 KV heads, head dim 32) several tests build."""
from __future__ import annotations

import torch
import transformers as tf


def tiny_llama(max_positions: int = 256, seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(config).eval()
