"""Configs whose attention geometry varies per layer (transformers' per_layer_config): Gemma 4's
global layers have another head dim (and KV head count) than its sliding ones, and reading
head_dim off such a config raises. Each compressed layer's store takes its own geometry; the
up-front budget check and graph_blocker look at every compressed layer's."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from sphkv_compile import api
from sphkv_compile.hf_plan import compressed_geometries, layer_geometries, plan_layers
from sphkv_compile.rdr.budget import SphkvBudgetError
from tests import test_zoo as zoo

pytestmark = pytest.mark.skipif(not hasattr(tf, "Gemma4TextConfig"), reason="transformers without Gemma 4")


def _gemma4():
    return tf.Gemma4TextConfig(**zoo._common(
        hidden_size=zoo.HIDDEN, intermediate_size=2 * zoo.HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, layer_types=["sliding_attention", "full_attention"], sliding_window=512,
        per_layer_config={1: {"head_dim": 128, "num_key_value_heads": 1}}, max_position_embeddings=256,
        vocab_size_per_layer_input=zoo.VOCAB))


def test_each_layer_keeps_its_own_geometry_and_generate_equals_dense():
    model = zoo.build(_gemma4, 0)
    assert layer_geometries(model) == [(2, 64), (1, 128)]
    ids, mask = zoo.prompts(0)
    dense = zoo.greedy(model, ids, mask)
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    assert compressed_geometries(fast, plan_layers(fast, None)) == [(2, 64), (1, 128)]
    for static in (False, True):
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=zoo.NEW, min_new_tokens=zoo.NEW, do_sample=False,
                            pad_token_id=0, return_dict_in_generate=True,
                            **({"cache_implementation": "static"} if static else {}))
        assert torch.equal(out.sequences[:, zoo.PROMPT:], dense), static
        stores = [layer.store for layer in out.past_key_values.layers]
        assert [(s.kv_heads, s.head_dim) for s in stores] == [(2, 64), (1, 128)]
    assert all(s["rewritten"] for s in api.report()["sites"])


def test_the_budget_is_checked_for_every_compressed_geometry(monkeypatch):
    """new_cache checks the byte budget up front once per distinct geometry of the compressed
    layers (the store of each layer is sized for its own), and a budget too small is refused."""
    from sphkv_compile import rdr

    checked = []
    check = rdr.check_budget
    monkeypatch.setattr(rdr, "check_budget", lambda o, kv_heads, head_dim, *a: checked.append((kv_heads, head_dim))
                        or check(o, kv_heads, head_dim, *a))
    fast = api.optimize(zoo.build(_gemma4, 0), bits=3.5, budget=0.5)
    checked.clear()  # optimize()'s trial forward built a cache of its own
    api.new_cache(fast, max_cache_len=256)
    assert checked == [(2, 64), (1, 128)]
    tight = api.optimize(zoo.build(_gemma4, 0), bits=3.5, budget=0.02, sink=4, recent=64)
    with pytest.raises(SphkvBudgetError):
        api.new_cache(tight, max_cache_len=256)



@pytest.mark.skipif(not hasattr(tf, "Dots3NoteTextConfig"), reason="transformers without dots3")
def test_head_counts_that_vary_per_layer_do_not_break_the_plan():
    """dots3 sets its head counts per layer (per_layer_config): reading num_attention_heads off
    the global config raises transformers' AmbiguousGlobalPerLayerAttributeError, which the
    plan's model-wide checks did (session 33's probe: optimize() crashed). Its layers are
    multi-head latent attention, so they stay dense with that reason, and generate() gives
    dense's tokens."""
    def config():
        return tf.Dots3NoteTextConfig(**zoo._common(
            hidden_size=zoo.HIDDEN, intermediate_size=2 * zoo.HIDDEN, moe_intermediate_size=zoo.HIDDEN,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=64, n_routed_experts=2,
            num_experts_per_tok=2, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=64,
            index_n_heads=2, mlp_layer_types=["dense", "sparse"], max_position_embeddings=256,
            layer_types=["indexed_attention", "sliding_attention"],
            per_layer_config={1: {"num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 64}}))

    model = zoo.build(config, 0)
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        model.config.num_attention_heads
    ids, mask = zoo.prompts(0)
    dense = zoo.greedy(model, ids, mask)
    fast = zoo.optimized(model, **zoo.HIGH_BITS)
    assert torch.equal(zoo.greedy(fast, ids, mask), dense)
    sites = api.report()["sites"]
    assert sites and all(not s["rewritten"] and "multi-head latent attention" in s["reason"] for s in sites), sites
