"""The backend entry point: options, mode, the custom pass's cache identity, and sites the
HF integration already routed through sphkv::attend."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import sphkv_compile
from sphkv_compile.backend import sphkv_backend
from sphkv_compile.inductor_passes.graph_pass import SphkvGraphPass, hashed_sources
from sphkv_compile.options import SphkvOptions, SphkvPerformanceWarning


@pytest.fixture(autouse=True)
def quick_inner_compiler(monkeypatch):
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")


def _decode_module():
    def f(q, pk, pv, k, v):
        kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        return F.scaled_dot_product_attention(q, kk, vv), kk, vv
    return f


def _inputs():
    return (torch.randn(1, 2, 1, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32),
            torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))


@pytest.mark.parametrize("bad, name", [({"bits": 0.5}, "bits"), ({"policy": "lru"}, "policy"),
                                       ({"budget": 3.0}, "budget"), ({"sink": -1}, "sink"),
                                       ({"bitz": 3}, "bitz")])
def test_bad_options_raise_a_clear_error(bad, name):
    torch._dynamo.reset()
    with pytest.raises(Exception, match=name):
        torch.compile(_decode_module(), backend="sphkv", options=bad)(*_inputs())


def test_mode_from_hf_compile_config_is_tolerated_and_the_missing_graphs_are_named(monkeypatch):
    """mode='reduce-overhead' (a CompileConfig's default, or torch.compile's mode) compiles and
    runs, and a warning says once that no CUDA graphs are made, naming the fix."""
    from sphkv_compile import backend as backend_module
    monkeypatch.delattr(backend_module._warn_if_mode_asks_for_graphs, "done", raising=False)
    torch._dynamo.reset()
    backend = lambda gm, ex: sphkv_backend(gm, ex, mode="reduce-overhead", options={"bits": 12})  # noqa: E731
    args = _inputs()
    with pytest.warns(SphkvPerformanceWarning, match="asks for CUDA graphs.*optimize"):
        out, kk, _ = torch.compile(_decode_module(), backend=backend)(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvPerformanceWarning)  # once per process
        torch._dynamo.reset()
        torch.compile(_decode_module(), backend=backend)(*_inputs())
    ref, *_ = _decode_module()(*args)
    assert sphkv_compile.report()["sites"][0]["rewritten"]
    # 6 tokens sit inside the default sink + recent window, all exact: float32 rounding only
    torch.testing.assert_close(out, ref)
    assert kk.shape == (1, 2, 6, 32) and kk.untyped_storage().nbytes() <= kk.element_size()


def test_pass_uuid_hashes_sources_and_options():
    names = {p.name for p in hashed_sources()}
    assert {"detect.py", "rewrite.py", "lowering.py", "ops.py", "store.py", "codec.py"} <= names
    assert any(p.parent.name == "kernels" for p in hashed_sources())
    a = SphkvGraphPass(SphkvOptions.from_dict({"bits": 3.5}), 1, 1).uuid()
    b = SphkvGraphPass(SphkvOptions.from_dict({"bits": 4.0}), 1, 1).uuid()
    assert a != b and a == SphkvGraphPass(SphkvOptions.from_dict({"bits": 3.5}), 1, 1).uuid()


def test_sites_already_using_sphkv_attend_are_recorded_as_rewritten():
    from sphkv_compile.ops import tiers_string
    from sphkv_compile.store import LayerStore
    opts = SphkvOptions.from_dict({})
    store = LayerStore(1, 2, 32, opts.tier_ladder, kv_dtype=torch.float32)
    store.append(torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32))
    state = [t for s in store.states for t in s.tensors()]
    tiers = tiers_string(opts.tier_ladder)

    def f(q, k, v, state):
        out, _ = torch.ops.sphkv.attend(q, state, k, v, None, tiers, 0, "float32", 32 ** -0.5, 0, False)
        return out

    torch._dynamo.reset()
    q, k, v = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    out = torch.compile(f, backend="sphkv")(q, k, v, state)
    assert torch.allclose(out, f(q, k, v, state))
    sites = sphkv_compile.report()["sites"]
    assert [s["kind"] for s in sites] == ["sphkv_attend"] and sites[0]["rewritten"]


def test_cat_store_grows_past_its_first_capacity(monkeypatch):
    """A cat cache has no maximum length: the store doubles (and the rewritten graph is
    recompiled for the new store shapes, not re-traced by Dynamo) and stays correct."""
    import sphkv_compile.backend as backend
    from tests.models.attention_zoo import Spec
    from tests.test_fuzz_pass import check_case

    from sphkv_compile.inductor_passes.stores import CompressedCache

    grown = []
    original_grow = CompressedCache.grow

    def counting_grow(self, capacity):
        if self.capacity:
            grown.append((self.capacity, capacity))
        original_grow(self, capacity)

    monkeypatch.setattr(backend, "_MIN_CAT_CAPACITY", 4)
    monkeypatch.setattr(CompressedCache, "grow", counting_grow)
    check_case(Spec(cache="cat"), [3] + [1] * 7, 0, 12)
    assert sphkv_compile.report()["sites"][0]["rewritten"]
    assert grown, "the store never had to grow"


@torch.no_grad()
def test_a_transformers_model_compiled_directly_is_told_to_use_optimize(monkeypatch):
    """torch.compile(hf_model, backend="sphkv") sees one forward's graph, whose KV lives in a
    transformers Cache outside it: the sites stay dense, and their reasons and a warning name
    sphkv_compile.optimize (what gives forward and generate() the compressed cache)."""
    import weakref

    import transformers as tf

    from sphkv_compile import api
    from sphkv_compile.options import SphkvCoverageWarning

    monkeypatch.setattr(api, "OPTIMIZED_MODELS", weakref.WeakSet())  # a process that never ran optimize()
    torch._dynamo.reset()
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 128, (1, 6))
    with pytest.warns(SphkvCoverageWarning, match="optimize"):
        out = torch.compile(model, backend="sphkv")(ids, use_cache=True)
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    sites = sphkv_compile.report()["sites"]
    assert len(sites) == 2 and not any(s["rewritten"] for s in sites)
    assert all("sphkv_compile.optimize(model)" in s["reason"] for s in sites), sites
