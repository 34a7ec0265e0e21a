"""RDR's distortion model (rdr.costs.distortion) and the key gain the meter carries for it."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sphkv_compile import rdr
from sphkv_compile.rdr import meter as M
from sphkv_compile.rdr.capacity import guaranteed_tokens, tier_pages
from sphkv_compile.rdr.costs import choice_table, distortion
from sphkv_compile.rdr.utility import query_key_gain
from sphkv_compile.tiers import DEFAULT_TIERS

TABLE = choice_table(tuple(DEFAULT_TIERS), 64, 0, torch.float16)


def _g(sigma2: float) -> float:
    return math.exp(2 * sigma2) - 2 * math.exp(sigma2 / 2) + 1


def _gaussian_mean(f, sigma2: float) -> float:
    """E f(δ) for δ ~ N(0, σ²), by 120-point Gauss-Hermite quadrature."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(120)
    return float((w * f(math.sqrt(sigma2) * x)).sum() / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("sigma2", [0.02, 0.2, 0.6])
def test_key_noise_moves_the_output_as_the_model_says(sigma2):
    """One query, n keys; Gaussian noise of power ε·r² on key i (attention share a ≈ 1%) moves
    its logit by δ ~ N(0, σ²), σ² = s²‖q‖²·ε·r²/d (the key gain times ε r²), and the softmax
    output by exactly a(e^δ-1)(v_i - o) / (1 + a(e^δ-1)). The model drops the denominator:
    a²·g(σ²)·‖v_i - o‖², g = E(e^δ-1)². Checked in two steps, each at a derived tolerance:
    - a Monte Carlo of the noisy keys matches the exact expression's mean (quadrature) within
      4 standard errors of the draws;
    - the model is within its first-order bound of that mean: with x = a(e^δ-1) >= -a,
      |1/(1+x)² - 1| <= 2|x|/(1-a)³, so the relative gap is at most 2a/(1-a)³·E|e^δ-1|³ / g."""
    gen = torch.Generator().manual_seed(7)
    d, n, s = 64, 200, 64 ** -0.5
    q = torch.randn(d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(n, d, generator=gen, dtype=torch.float64)
    p = torch.softmax(k @ q * s, 0)
    o = p @ v
    i = int(torch.argmin((p - 0.01).abs()))
    a, dev2 = float(p[i]), float((v[i] - o) @ (v[i] - o))
    gain = s * s * float(q @ q) / d
    eps = sigma2 / (gain * float(k[i] @ k[i]))
    draws = 200_000
    noise = torch.randn(draws, d, generator=gen, dtype=torch.float64) * math.sqrt(eps * float(k[i] @ k[i]) / d)
    logits = (k @ q * s).expand(draws, n).clone()
    logits[:, i] += noise @ q * s
    err = (torch.softmax(logits, 1) @ v - o).pow(2).sum(1)
    import numpy as np

    exact = dev2 * _gaussian_mean(lambda t: (a * np.expm1(t)) ** 2 / (1 + a * np.expm1(t)) ** 2, sigma2)
    assert abs(float(err.mean()) - exact) <= 4 * float(err.std()) / math.sqrt(draws), (float(err.mean()), exact)
    g = _gaussian_mean(lambda t: np.expm1(t) ** 2, sigma2)
    assert g == pytest.approx(_g(sigma2), rel=1e-9)  # the closed form the cost model uses
    predicted = a * a * g * dev2
    bound = 2 * a / (1 - a) ** 3 * _gaussian_mean(lambda t: np.abs(np.expm1(t)) ** 3, sigma2) / g
    assert abs(exact / predicted - 1) <= bound, (exact, predicted, bound)


@st.composite
def tokens(draw):
    B, H, n, d = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 40)), 64
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 1e4]))  # zero vectors and huge norms
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, n, d, generator=gen) * scale
    values = torch.randn(B, H, n, d, generator=gen) * draw(st.sampled_from([0.0, 1.0, 1e3]))
    utility = torch.rand(B, H, n, generator=gen) ** 3
    valid = torch.rand(B, H, n, generator=gen) < 0.9
    gain = torch.rand(B, H, generator=gen) * draw(st.sampled_from([0.0, 0.1, 10.0]))
    return utility, keys.pow(2).sum(-1), values, valid, gain


@settings(max_examples=80, deadline=None)
@given(tokens())
def test_distortion_is_finite_zero_for_exact_and_never_grows_with_bytes(case):
    utility, r2, values, valid, gain = case
    for key_gain in (None, gain):
        D = distortion(TABLE, utility, r2, values, valid, key_gain)
        assert torch.isfinite(D).all() and (D >= 0).all()
        assert (D[..., TABLE.exact_index] == 0).all()
        order = sorted(range(len(TABLE.bytes)), key=lambda t: -TABLE.bytes[t])  # most bytes first
        for finer, coarser in zip(order, order[1:]):
            if coarser != TABLE.drop_index:  # drop is priced apart: dropping may beat a useless tier
                assert (D[..., finer] <= D[..., coarser] * (1 + 1e-5) + 1e-30).all()


def test_without_key_gain_errors_are_priced_per_unit_norm():
    utility, r2 = torch.tensor([[[0.5, 2.0]]]), torch.tensor([[[4.0, 9.0]]])
    values = torch.ones(1, 1, 2, 64)
    D = distortion(TABLE, utility, r2, values, torch.ones(1, 1, 2, dtype=torch.bool))
    for t in range(len(TABLE.bytes)):
        expect = utility * (TABLE.eps_k[t] * r2 + TABLE.eps_v[t] * 64)
        torch.testing.assert_close(D[..., t], expect)


def test_with_key_gain_drop_costs_the_value_deviation_and_key_errors_grow_with_the_gain():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(1, 2, 30, 64, generator=gen)
    utility = torch.rand(1, 2, 30, generator=gen)
    valid = torch.ones(1, 2, 30, dtype=torch.bool)
    r2 = torch.full((1, 2, 30), 64.0)
    low, high = torch.tensor([[0.01, 0.01]]), torch.tensor([[1.0, 1.0]])
    D_low, D_high = (distortion(TABLE, utility, r2, values, valid, g) for g in (low, high))
    mean = (utility / utility.sum(-1, keepdim=True))[..., None].mul(values).sum(2, keepdim=True)
    torch.testing.assert_close(D_low[..., TABLE.drop_index], utility * (values - mean).pow(2).sum(-1))
    compressed = [t for t in range(TABLE.drop_index) if t != TABLE.exact_index]
    assert (D_high[..., compressed] > D_low[..., compressed]).all()  # a larger logit scale: key errors cost more


def test_query_key_gain_is_the_logit_variance_per_unit_key_error():
    q = torch.randn(2, 6, 40, 32)
    gain = query_key_gain(q, 3, 0.25, 8)
    expect = (q[:, :, -8:] * 0.25).pow(2).sum(-1).reshape(2, 3, 2 * 8).mean(-1) / 32
    torch.testing.assert_close(gain, expect)


def test_meter_keeps_a_running_key_gain_per_row_and_head():
    m = M.new_meter(2, 3)
    assert M.key_gain(m) is None and M.entered(m).tolist() == [0, 0]
    first = torch.tensor([[0.5, 1.0, 2.0], [0.25, 0.125, 4.0]])
    torch.testing.assert_close(M.observe_queries(m, first), first)
    torch.testing.assert_close(M.key_gain(m), first)
    returned = M.observe_queries(m, torch.zeros(2, 3))
    torch.testing.assert_close(M.key_gain(m), first * M.GAIN_MEMORY, atol=2 * M.GAIN_UNITS, rtol=0)
    assert torch.equal(returned, M.key_gain(m))  # what the update prices with is what the meter keeps
    M.count_entered(m, 5, None, 2)
    assert M.entered(m).tolist() == [5, 5]
    M.reset(m)
    assert M.key_gain(m) is None and M.entered(m).tolist() == [0, 0] and M.read(m)["calls"] == 0


@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 16])
def test_pool_prior_follows_the_distortion_option(fraction):
    """The fixed pools are sized from a prior allocation; under 'logit' it prices key errors by
    their softmax error, so the 6-bit tier gets more room and the 2- and 3.5-bit tiers less,
    and both layouts still hold at most the budget."""
    tokens, H, d, ps = 2048, 3, 64, 16
    budget = rdr.layer_budget_bytes(fraction, tokens, H, d)
    pages = {name: tier_pages(DEFAULT_TIERS, budget, H, d, ps, seed=0, kv_dtype=torch.float16, protected=100,
                              tokens=tokens, distortion=name) for name in ("unit", "logit")}
    for p in pages.values():
        assert sum(guaranteed_tokens(n, H, ps) * b for n, b in zip(p, TABLE.bytes)) <= budget
    high, mid, low = (TABLE.names.index(n) for n in ("high", "mid", "low"))
    assert pages["logit"][high] > pages["unit"][high]
    assert pages["logit"][mid] + pages["logit"][low] < pages["unit"][mid] + pages["unit"][low]
