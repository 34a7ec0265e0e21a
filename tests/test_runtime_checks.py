"""The rewrite's runtime checks: computed on the device (no host read: they run on the meta
device), equal to the mask rule written out element by element, and raised by the compiled
model with the cause named."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sphkv_compile
from sphkv_compile.inductor_passes import masks, runtime_checks, runtime_ops
from sphkv_compile.ops import STATE_TENSORS_PER_TIER
from sphkv_compile.rdr import meter as budget_meter
from tests.models import gpt_fast


@pytest.fixture(autouse=True)
def quick_inner_compiler(monkeypatch):
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")


def rule_code(vis: torch.Tensor, p0: int, n: int, stored: list[int]) -> int:
    """masks.py's rule, element by element in Python: the first failing check's code, 0 if none."""
    B, Tq, Tk = vis.shape
    if p0 + n > Tk:
        return masks.OUTSIDE
    v = vis.tolist()
    valid = [[v[b][Tq - 1][p0 + j] for j in range(n)] for b in range(B)]
    real = [[valid[b][n - Tq + t] for t in range(Tq)] for b in range(B)]
    rows = [(b, t) for b in range(B) for t in range(Tq) if real[b][t]]
    if any(v[b][t][p0 + j] != (valid[b][j] and j <= n - Tq + t) for b, t in rows for j in range(n)):
        return masks.NOT_CAUSAL
    if any(v[b][t][c] for b, t in rows for c in range(p0 + n, Tk)):
        return masks.SEES_FUTURE
    if any(v[b][t][c] != v[b][Tq - 1][c] for b, t in rows for c in range(p0)):
        return masks.PAST_DIFFERS
    if any(sum(v[b][Tq - 1][:p0]) != stored[b] for b in range(B)):
        return masks.PAST_COUNT
    return 0


@st.composite
def masks_and_chunks(draw):
    """A mask that is causal over a store plus padding, then maybe one flipped element, a wrong
    stored count or a chunk pushed past the last column."""
    B, Tq = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n = draw(st.integers(Tq, Tq + 3))
    p0, free = draw(st.integers(0, 6)), draw(st.integers(0, 3))
    Tk = p0 + n + free
    past = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=p0, max_size=p0), min_size=B, max_size=B)),
                        dtype=torch.bool).reshape(B, p0)
    pad = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=B, max_size=B)),
                       dtype=torch.bool)
    causal = torch.arange(n)[None, :] <= (n - Tq + torch.arange(Tq))[:, None]
    vis = torch.zeros(B, Tq, Tk, dtype=torch.bool)
    vis[:, :, :p0] = past[:, None, :]
    vis[:, :, p0:p0 + n] = pad[:, None, :] & causal
    stored = past.sum(-1).tolist()
    change = draw(st.sampled_from(["none", "flip", "count", "outside"]))
    if change == "flip":
        b, t, c = draw(st.integers(0, B - 1)), draw(st.integers(0, Tq - 1)), draw(st.integers(0, Tk - 1))
        vis[b, t, c] = ~vis[b, t, c]
    elif change == "count":
        stored[draw(st.integers(0, B - 1))] += draw(st.sampled_from([-1, 1]))
    elif change == "outside":
        vis = vis[:, :, :p0 + n - 1]
    return vis, p0, n, stored


@settings(max_examples=300, deadline=None)
@given(masks_and_chunks())
def test_the_device_check_equals_the_rule_element_by_element(case):
    vis, p0, n, stored = case
    positions = torch.arange(p0, p0 + n)
    valid, code, shown, held = masks.visibility_on_device(vis, positions, torch.tensor(stored))
    want = rule_code(vis, p0, n, stored)
    assert int(code) == want
    if want == 0:
        assert torch.equal(valid, vis[:, -1, p0:p0 + n])
    if want == masks.PAST_COUNT:
        row = next(b for b in range(vis.shape[0]) if int(vis[b, -1, :p0].sum()) != stored[b])
        assert (int(shown), int(held)) == (int(vis[row, -1, :p0].sum()), stored[row])
    if want == masks.OUTSIDE:
        assert int(held) == vis.shape[-1]
    if want:
        with pytest.raises(masks.MaskNotEquivalent):
            masks.check_visibility(vis, positions, torch.tensor(stored))


def _meta_state(tiers: int = 2, batch: int = 2, kv_heads: int = 2):
    state = []
    for _ in range(tiers):
        state += [torch.empty(8, 16, 4, dtype=torch.int32, device="meta"),
                  torch.empty(8, 16, dtype=torch.float16, device="meta"),
                  torch.empty(batch, kv_heads, 8, dtype=torch.int32, device="meta"),
                  torch.empty(batch, kv_heads, dtype=torch.int32, device="meta"),
                  torch.empty(8, dtype=torch.int32, device="meta"),
                  torch.empty(1, dtype=torch.int32, device="meta")]
    assert len(state) == tiers * STATE_TENSORS_PER_TIER
    return state


@pytest.mark.parametrize("rdr", [False, True])
def test_the_checks_read_nothing_back_to_the_host(rdr):
    """On the meta device any int(), bool() or .tolist() of a tensor raises: the op bodies
    run there, so a decode step's checks never make the host wait for the GPU."""
    batch, kv_heads, q_heads, q_len, k_len = 2, 2, 4, 3, 20
    state = _meta_state(batch=batch, kv_heads=kv_heads)
    checks = torch.empty(runtime_checks.SIZE, dtype=torch.int64, device="meta")
    meter = torch.empty(budget_meter.SIZE + batch + batch * kv_heads, dtype=torch.int64, device="meta")
    positions = torch.empty(q_len, dtype=torch.int64, device="meta")
    runtime_ops.advance_on_device(torch.empty(1, dtype=torch.int64, device="meta"), state, positions, meter, checks)
    vis = torch.empty(batch, q_heads, q_len, k_len, dtype=torch.bool, device="meta")
    counts = [state[i + 3] for i in range(0, len(state), STATE_TENSORS_PER_TIER)]
    valid, code, shown, columns = runtime_ops.mask_validity(vis, torch.empty((), dtype=torch.bool, device="meta"),
                                                            positions, batch, q_heads, q_len)
    runtime_ops.record_validity(code, shown, columns, positions, counts, batch, checks, meter if rdr else None)
    assert valid.shape == (batch, q_len) and valid.dtype == torch.bool


def _compiled_gpt_fast(seed: int):
    torch.manual_seed(seed)
    model = gpt_fast.GPTFast().eval()
    model.setup_caches(1)
    torch._dynamo.reset()
    return model, torch.compile(model, backend="sphkv", options={"bits": 12})


@torch.no_grad()
def test_a_write_that_skips_positions_raises_and_a_new_sequence_starts_clean():
    """Calls 1 and 2 compile the prefill and the decode step; later calls of those shapes reach
    only the runtime checks (a new shape would be checked at compile time instead)."""
    model, compiled = _compiled_gpt_fast(21)
    prompt = torch.randint(0, model.cfg.vocab, (1, 12), generator=torch.Generator().manual_seed(21))
    compiled(prompt, torch.arange(12))
    compiled(prompt[:, :1], torch.tensor([12]))
    with pytest.raises(runtime_checks.SphkvCacheError, match="in this call the cache was written at position 15 but the compressed "
                                                             "store held positions 0..12; a compressed cache cannot"):
        compiled(prompt[:, :1], torch.tensor([15]))
    # the store holds whatever the failing call wrote; position 0 starts over, as dense does
    torch.manual_seed(21)
    dense = gpt_fast.GPTFast().eval()  # the same weights
    dense.setup_caches(1)
    want, _ = gpt_fast.generate(dense, prompt, 6)
    got, _ = gpt_fast.generate(model, prompt, 6, compiled)
    assert torch.equal(got, want)
    compiled(prompt[:, :2], torch.arange(2))  # compiles a two-token step
    with pytest.raises(runtime_checks.SphkvCacheError, match="2 positions starting at 2 that are not contiguous"):
        compiled(prompt[:, :2], torch.tensor([2, 4]))


@torch.no_grad()
def test_a_mask_that_stops_being_causal_raises_with_its_cause():
    """gpt-fast's mask row is the causal mask's row at input_pos: a model that hands in a
    sliding-window row in the middle of decoding no longer matches the rewrite."""
    model, compiled = _compiled_gpt_fast(22)
    prompt = torch.randint(0, model.cfg.vocab, (1, 12), generator=torch.Generator().manual_seed(22))
    compiled(prompt, torch.arange(12))
    compiled(prompt[:, :1], torch.tensor([12]))
    model.causal_mask[13, :4] = False  # the row position 13 reads: its first 4 tokens hidden
    with pytest.raises(masks.MaskNotEquivalent, match="in this call the attention mask .* the mask shows 9 past tokens but the store holds 13"):
        compiled(prompt[:, :1], torch.tensor([13]))


def test_check_runtime_reads_pending_verdicts():
    """check_runtime() (and report()) read what a GPU run leaves unread: here a verdict queued by
    hand, as CheckReader.after_call queues a GPU copy."""
    reader = runtime_checks.CheckReader()
    verdict = runtime_checks.new_checks("cpu")
    verdict[runtime_checks.CODE] = runtime_checks.NOT_CONTIGUOUS
    verdict[runtime_checks.CALL] = 5
    reader.pending.append((None, verdict))
    with pytest.raises(runtime_checks.SphkvCacheError, match="in an earlier compiled call .* not contiguous"):
        sphkv_compile.check_runtime()
    assert not reader.pending
    sphkv_compile.check_runtime()  # nothing left to raise


def test_a_verdict_read_by_a_later_call_says_how_many_calls_ago():
    """On a GPU the call after a failing one raises: the message counts back to the failing call."""
    reader = runtime_checks.CheckReader()
    verdict = runtime_checks.new_checks("cpu")
    verdict[runtime_checks.CODE] = runtime_checks.MISPLACED
    verdict[runtime_checks.P0], verdict[runtime_checks.HELD] = 15, 13
    verdict[runtime_checks.CALL] = runtime_checks._calls  # the latest call so far
    reader.pending.append((None, verdict))
    with pytest.raises(runtime_checks.SphkvCacheError, match=r"1 compiled call\(s\) before this one .* already "
                                                             r"returned\) the cache was written at position 15 but "
                                                             r"the compressed store held positions 0..12"):
        reader.before_call()
