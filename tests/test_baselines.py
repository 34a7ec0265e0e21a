"""KIVI-style baseline: round trip bounds, monotone error, honest bit accounting."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sphkv_compile.baselines import (kivi_bits_per_element, kivi_dequantize, kivi_keys, kivi_quantize,
                                     kivi_values)

shapes = st.tuples(st.integers(1, 3), st.integers(1, 70), st.integers(1, 40))


def _data(seed, shape, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * scale


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, bits=st.sampled_from([2, 3, 4]),
       group=st.integers(1, 40), axis=st.sampled_from(["channel", "token"]),
       scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_round_trip_error_within_half_step(seed, shape, bits, group, axis, scale):
    x = _data(seed, shape, scale)
    q = kivi_quantize(x, bits, group, axis)
    y = kivi_dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert q.codes.min() >= 0 and q.codes.max() < 2**bits
    # Every element lies within half a step of its group's grid, plus the fp16 rounding of
    # the stored scale and zero: relative 2^-11 each (normal range), absolute 2^-25 each
    # (subnormal range), with the scale's error multiplied by a code of up to 2^bits - 1.
    s = q.scale.float()
    z = q.zero.float()
    if axis == "channel":
        idx = torch.arange(x.shape[-2]) // q.group_size
        step, zero = s[..., idx, :], z[..., idx, :]
    else:
        idx = torch.arange(x.shape[-1]) // q.group_size
        step, zero = s[..., :, idx], z[..., :, idx]
    fp16_slack = 2**-10 * (zero.abs() + step * 2**bits) + 2**-24 * 2**bits
    assert ((y - x).abs() <= 0.5 * step + fp16_slack + 1e-6 * scale).all()


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, group=st.integers(1, 40))
def test_constant_groups_are_exact(seed, shape, group):
    # A group whose elements are all equal has scale 0 and decodes to its zero point.
    x = _data(seed, shape[:-2] + (1, shape[-1])).expand(*shape[:-2], shape[-2], shape[-1]).contiguous()
    x = x.half().float()  # representable in fp16, so the stored zero is exact
    y = kivi_dequantize(kivi_keys(x, 2, group))
    assert torch.equal(y, x)


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_error_falls_as_bits_rise(axis):
    x = _data(torch.randint(0, 2**31 - 1, ()).item(), (4, 256, 64))
    errs = [float((kivi_dequantize(kivi_quantize(x, b, 32, axis)) - x).pow(2).sum()) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@given(n_tokens=st.integers(1, 300), head_dim=st.integers(1, 160), bits=st.sampled_from([2, 3, 4]),
       group=st.integers(1, 128))
def test_bits_per_element_counts_codes_and_fp16_metadata(n_tokens, head_dim, bits, group):
    x = torch.randn(n_tokens, head_dim)
    k = kivi_keys(x, bits, group)
    v = kivi_values(x, bits, group)
    for q, axis in ((k, "channel"), (v, "token")):
        assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
        stored = q.codes.numel() * bits + 16 * (q.scale.numel() + q.zero.numel())
        assert q.bits_per_element == pytest.approx(stored / x.numel())
        assert q.bits_per_element == pytest.approx(kivi_bits_per_element(bits, group, axis, n_tokens, head_dim))
        assert q.bits_per_element > bits  # metadata is never free
    # Keys: one scale and zero per channel per started group of tokens.
    assert k.scale.numel() == head_dim * -(-n_tokens // group)


def test_value_default_is_one_scale_per_token():
    v = torch.randn(2, 50, 64)
    q = kivi_values(v, 2)
    assert q.scale.shape == (2, 50, 1)
    assert q.bits_per_element == pytest.approx(2 + 32 / 64)


def test_keys_are_per_channel_values_per_token():
    # A channel 1000x larger than the rest: per-channel statistics keep the small channels
    # accurate, per-token statistics cannot.
    x = torch.randn(128, 64)
    x[:, 5] *= 1000
    small = [c for c in range(64) if c != 5]
    err_k = (kivi_dequantize(kivi_keys(x, 3)) - x)[:, small].pow(2).mean()
    err_v = (kivi_dequantize(kivi_values(x, 3)) - x)[:, small].pow(2).mean()
    assert err_k * 100 < err_v


@pytest.mark.parametrize("bad, match", [
    (dict(bits=9), "bits"), (dict(bits=2.0), "bits"), (dict(group_size=0), "group_size"),
    (dict(axis="row"), "axis")])
def test_bad_arguments_name_the_cause(bad, match):
    args = dict(bits=2, group_size=32, axis="channel") | bad
    with pytest.raises(ValueError, match=match):
        kivi_quantize(torch.randn(4, 8), **args)


def test_non_finite_and_fp16_overflow_are_clear_errors():
    x = torch.randn(8, 16)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kivi_keys(x, 2)
    with pytest.raises(ValueError, match="fp16"):
        kivi_keys(torch.full((8, 16), 1e6), 2)
    with pytest.raises(TypeError, match="floating"):
        kivi_keys(torch.ones(8, 16, dtype=torch.int32), 2)
