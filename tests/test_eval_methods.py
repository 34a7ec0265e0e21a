"""The eval harness's methods hold at most their byte budget and give well-formed caches
(model-free: synthetic captures)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sphkv_compile.eval.caches import causal_chunk_attention
from sphkv_compile.eval.hook import LayerCapture, _grouped_mass
from sphkv_compile.eval.methods import METHODS, Settings, keep_indices
from sphkv_compile.rdr.budget import dense_bytes

CFG = Settings(sink=2, recent=8, obs_window=8, page_size=8)


def capture(seed, H, T, d=64):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, T, d, generator=gen) * 3
    v = torch.randn(1, H, T, d, generator=gen)
    q = torch.randn(1, 3 * H, T, d, generator=gen)
    return LayerCapture(k, v, _grouped_mass(q, k, T - 8, d ** -0.5), _grouped_mass(q, k, 0, d ** -0.5),
                        q[:, :, T - 8:] * d ** -0.5), q


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
@pytest.mark.parametrize("fraction", [1 / 4, 1 / 16])
def test_methods_hold_at_most_the_budget(method, fraction):
    cap, q = capture(1, 2, 200)
    budget = int(fraction * dense_bytes(200, 2, 64))
    cache, held = METHODS[method](cap, budget, CFG)
    assert 0 < held <= budget
    chunk = torch.randn(1, 2, 3, 64)
    out = cache.attend(q[:, :, -3:], chunk, chunk, 64 ** -0.5)
    assert out.shape == (1, 6, 3, 64) and torch.isfinite(out).all()


def test_dense_cache_is_exact_attention():
    cap, q = capture(2, 1, 40)
    k_new, v_new = cap.keys[:, :, 30:], cap.values[:, :, 30:]
    # the chunk of the last 10 prompt tokens over the first 30 stored == full causal attention
    part = METHODS["dense"](LayerCapture(cap.keys[:, :, :30], cap.values[:, :, :30], cap.observed, None), 0, CFG)[0]
    got = part.attend(q[:, :, 30:], k_new, v_new, 0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q, cap.keys, cap.values, is_causal=True, scale=0.125,
                                                           enable_gqa=True)[:, :, 30:]
    assert torch.allclose(got, ref, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 60), n=st.integers(0, 70), last=st.integers(0, 20), first=st.integers(0, 5),
       seed=st.integers(0, 1000))
def test_keep_indices(T, n, last, first, seed):
    scores = torch.rand(1, 2, T, generator=torch.Generator().manual_seed(seed))
    idx = keep_indices(scores, n, always_last=last, always_first=first)
    m = min(n, T)
    assert idx.shape == (1, 2, m)
    for h in range(2):
        kept = set(idx[0, h].tolist())
        assert len(kept) == m
        f = min(first, m)
        assert set(range(f)) <= kept
        assert set(range(T - min(last, m - f), T)) <= kept


@pytest.mark.parametrize("method", ["uniform", "rdr"])
@pytest.mark.parametrize("seed", [3, 4])
def test_centered_spherical_methods_attend_closer_to_dense_when_keys_share_a_mean(method, seed):
    """The harness's uniform and rdr store keys centered, as the product does (center_keys):
    with keys sharing a large mean, at 1/4 of dense bytes, a chunk's attention over the store is
    closer to dense attention than the *_uncentered ablation's, within the same bytes."""
    cap, q = capture(seed, 2, 200)
    shared = 4 * torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(seed))
    cap = LayerCapture(cap.keys + shared, cap.values, cap.observed, cap.accumulated, cap.window_queries)
    budget = int(dense_bytes(200, 2, 64) / 4)
    k_new, v_new = cap.keys[:, :, -4:], cap.values[:, :, -4:]
    stored = LayerCapture(cap.keys[:, :, :-4], cap.values[:, :, :-4], cap.observed[..., :-4], None,
                          cap.window_queries)
    ref = causal_chunk_attention(q[:, :, -4:], stored.keys, stored.values, k_new, v_new, 64 ** -0.5)
    errors, held = {}, {}
    for name in (method, f"{method}_uncentered"):
        cache, held[name] = METHODS[name](stored, budget, CFG)
        errors[name] = float((cache.attend(q[:, :, -4:], k_new, v_new, 64 ** -0.5) - ref).norm())
    assert held[method] == held[f"{method}_uncentered"]
    assert errors[method] < errors[f"{method}_uncentered"], errors
