"""The rate-distortion table's core on small fresh Gaussian data (no model, a few seconds)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sphkv_compile import rd_table as rd
from sphkv_compile.bit_allocation import allocate_bits, predicted_direction_mse
from sphkv_compile.polar_tree import build_tree


def _fresh_sample(head_dim=64):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    return rd.gaussian_sample(head_dim, n_tokens=256, heads=2, n_queries=16, seed=seed)


@pytest.fixture(scope="module")
def rows():
    sample = _fresh_sample()
    return sample, rd.rd_rows(sample, rd.default_methods(sample.head_dim, centered=True), progress=False)


def test_every_error_falls_as_bits_rise(rows):
    _, table = rows
    for family in {r.family for r in table}:
        fam = sorted((r for r in table if r.family == family), key=lambda r: r.key_bits)
        assert len(fam) >= 3, family
        for metric in ("logit_rel_mse", "attn_rel_mse", "value_rel_mse"):
            errs = [getattr(r, metric) for r in fam]
            assert all(a > b for a, b in zip(errs, errs[1:])), (family, metric, errs)


def test_bits_count_everything_stored(rows):
    sample, table = rows
    by_label = {r.method: r for r in table}
    for target in rd.SPHERICAL_TARGETS:
        codec = rd.SphericalCodec(sample.head_dim, bits=target)
        row = by_label[f"spherical {target:g}"]
        assert row.key_bits == row.value_bits == codec.bits_per_element <= target
    for b in rd.BASELINE_BITS:
        for g in rd.KIVI_KEY_GROUPS:
            row = by_label[f"KIVI-{b} g{g}"]
            # fp16 scale + zero per channel per (started) group of tokens; per token for values
            t, d = sample.keys.shape[-2:]
            assert row.key_bits == pytest.approx(b + 32 * math.ceil(t / g) / t)
            assert row.value_bits == pytest.approx(b + 32 / d)
        assert by_label[f"rotated scalar {b}"].key_bits > b  # the radius is counted


def test_logits_match_dense_when_nothing_is_quantized_away():
    """14 bits per angle and a 32-bit radius: the relative error is what the angle codebooks
    predict. To first order each angle of a tree level moves the vector along its own direction
    by (the node's radius)·(angle error), and one level's nodes partition the coordinates, so the
    relative squared error is Σ over levels of that level's codebook MSE (the level-1 circle plus
    each group's angle codebook); isotropic queries see the same share in the logits. The
    estimate averages 512 keys x 16 queries: over seeds 0-7 measured/predicted was 0.97-1.02
    (std 2.2%), so ±15% is over six standard deviations."""
    from sphkv_compile.codebooks import angle_codebook
    from sphkv_compile.polar_tree import build_tree

    sample = _fresh_sample(32)
    row = rd.measure(rd.SphericalMethod(32, 14, radius_bits=32), sample)
    predicted = rd.circle_codebook(14).mse + sum(angle_codebook(g.left_size, g.right_size, 14).mse
                                                 for g in build_tree(32).groups)
    assert row.logit_rel_mse == pytest.approx(predicted, rel=0.15)
    assert row.value_rel_mse == pytest.approx(predicted, rel=0.15)


def test_attention_is_causal():
    # Queries before the last position never see the last key: changing it changes neither
    # the dense reference nor the (per-token) spherical codes of the visible keys.
    sample = _fresh_sample(32)
    t = sample.keys.shape[-2]
    sample.query_pos = torch.randint(0, t - 1, sample.query_pos.shape)
    method = rd.SphericalMethod(32, 3.0)
    before = rd.measure(method, sample)
    sample.keys[..., -1, :] *= 100.0
    sample.values[..., -1, :] *= -100.0
    after = rd.measure(method, sample)
    assert after.logit_rel_mse == pytest.approx(before.logit_rel_mse, rel=1e-9)
    assert after.attn_rel_mse == pytest.approx(before.attn_rel_mse, rel=1e-9)


@given(points=st.lists(st.tuples(st.floats(0.5, 8.0), st.floats(1e-5, 1.0)), min_size=1, max_size=8),
       at=st.floats(0.0, 9.0))
def test_time_sharing_is_the_lower_convex_hull(points, at):
    got = rd.time_shared_mse(points, at)
    lo, hi = min(b for b, _ in points), max(b for b, _ in points)
    if not lo - 1e-9 <= at <= hi + 1e-9:
        assert got is None
        return
    assert got is not None
    # The lower convex hull at `at` is the best mix of two measured points (or one point) that
    # spends exactly `at` bits on average: in one dimension two points suffice.
    mixes = [e for b, e in points if math.isclose(b, at, abs_tol=1e-9)]
    for b0, e0 in points:
        for b1, e1 in points:
            if b0 <= at <= b1 and b1 > b0:
                w = (at - b0) / (b1 - b0)
                mixes.append((1 - w) * e0 + w * e1)
    assert got == pytest.approx(min(mixes), rel=1e-9, abs=1e-12)


def test_value_winner_has_the_lowest_mse():
    sample = _fresh_sample()
    table = rd.value_rows(sample, rd.value_methods(sample.head_dim), progress=False)
    for w in rd.value_codec_winners(table):
        assert set(w["mse"]) == {"spherical", "rotated scalar", "KIVI per-token"}
        assert w["mse"][w["winner"]] == min(w["mse"].values())


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_knapsack_allocation_is_never_worse_than_greedy(head_dim):
    tree = build_tree(head_dim)
    for budget in (head_dim, 2 * head_dim - 16, 3 * head_dim - 16):
        predicted, bits = rd.knapsack_allocation(tree, budget)
        counts = [c for c, _ in rd.group_weights(tree)]
        assert sum(c * b for c, b in zip(counts, bits)) <= budget
        assert predicted == pytest.approx(predicted_direction_mse(tree, bits))
        assert predicted <= predicted_direction_mse(tree, allocate_bits(tree, budget)) + 1e-12


def test_render_and_plot(tmp_path):
    sample = _fresh_sample(32)
    methods = [rd.SphericalMethod(32, 3.0), rd.KiviMethod(32, 3), rd.ScalarMethod(32, 3)]
    report = rd.Report()
    report.results[sample.name] = rd.rd_rows(sample, methods, progress=False)
    report.values[sample.name] = rd.value_rows(sample, methods, progress=False)
    report.notes[sample.name] = sample.note
    report.winners[sample.name] = rd.value_codec_winners(report.values[sample.name])
    text = rd.render(report)
    for m in methods:
        assert f"| {m.label} |" in text
    path = tmp_path / "rd.png"
    rd.plot_rd(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_energy_share_bounds():
    x = torch.randn(2, 1, 16).expand(2, 50, 16)
    assert rd.mean_energy_share(x) == pytest.approx(1.0)
    y = torch.randn(2, 25, 16)
    assert rd.mean_energy_share(torch.cat([y, -y], dim=1)) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= rd.mean_energy_share(torch.randn(3, 40, 8)) <= 1.0
