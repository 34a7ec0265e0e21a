"""RDR on real tier states: budget, protection, page invariants, determinism, bounded memory."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sphkv_compile import rdr
from sphkv_compile.ops import tiers_string
from sphkv_compile.options import SphkvOptions
from sphkv_compile.rdr.budget import dense_bytes, protected_bytes
from sphkv_compile.rdr.costs import choice_table
from sphkv_compile.rdr.update import page_slack_bytes, token_bytes
from sphkv_compile.store import LayerStore, TierState, gather_tokens, split_exact
from sphkv_compile.tiers import DEFAULT_TIERS, record_words

D = 32  # head_dim: small, so the codecs are cheap; every default tier is distinct at 32
KV = torch.bfloat16
SEED = 3


def table():
    return choice_table(DEFAULT_TIERS, D, SEED, KV)


def check_pages(states: list[TierState]):
    """Each tier's pool: pages in use are distinct, owned by one (row, head), enough for the
    count, and exactly the complement of the free list (no leak, no double use)."""
    for s in states:
        ps = s.page_size
        used = []
        for b in range(s.count.shape[0]):
            for h in range(s.count.shape[1]):
                n = int(s.count[b, h])
                pages = s.pages[b, h]
                need = -(-n // ps)
                assert (pages[:need] >= 0).all() and (pages[need:] == -1).all()
                used += pages[:need].tolist()
        free = s.free[: int(s.free_top[0])].tolist()
        assert len(set(used)) == len(used), "a page is shared"
        assert sorted(used + free) == list(range(s.pool.shape[0])), "pages leaked or double-listed"


def exact_kv(states):
    e = table().exact_index
    rec, _, valid = gather_tokens(states[e])
    k, v = split_exact(rec, D, KV)
    return k, v, valid


def run_sequence(seed, batch, heads, prompt, steps, fraction, sink, recent, every, check=None):
    """A prompt chunk then `steps` single-token appends through the custom op on fixed pools
    sized by pool_pages; `check(states, history_k)` runs after every call."""
    gen = torch.Generator().manual_seed(seed)
    total = prompt + steps
    budget = max(int(fraction * dense_bytes(total, heads, D)),
                 protected_bytes(DEFAULT_TIERS, heads, D, seed=SEED, kv_dtype=KV, sink=sink, recent=recent,
                                 rebudget_every=every))
    sizes = rdr.pool_pages(DEFAULT_TIERS, budget, batch, heads, D, 8, seed=SEED, kv_dtype=KV)
    states = []
    for spec, (num_pages, max_pages) in zip(DEFAULT_TIERS, sizes):
        kw, vw = record_words(spec, D, SEED, KV)
        if spec.exact:  # the prompt chunk may be appended before a re-budget
            max_pages = max(max_pages, -(-(prompt + every) // 8))
            num_pages = max(num_pages, batch * heads * max_pages)
        states.append(TierState.allocate(batch, heads, num_pages, 8, kw + vw, max_pages, "cpu"))
    flat = [t for s in states for t in s.tensors()]
    history = []
    for n in [prompt] + [1] * steps:
        k = torch.randn(batch, heads, n, D, generator=gen)
        v = torch.randn(batch, heads, n, D, generator=gen)
        u = torch.rand(batch, heads, n, generator=gen) ** 4
        history.append(k.to(KV))
        torch.ops.sphkv.rdr_update(flat, k, v, None, u, tiers_string(DEFAULT_TIERS), SEED, "bfloat16", sink,
                                   recent, 1, budget, every)
        if check:
            check(states, torch.cat(history, 2), budget)
    return states, budget


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**20), batch=st.integers(1, 2), heads=st.integers(1, 3), prompt=st.integers(1, 120),
       steps=st.integers(0, 40), fraction=st.sampled_from([1 / 16, 1 / 8, 1 / 4, 1 / 2]),
       sink=st.integers(0, 4), recent=st.integers(0, 12), every=st.integers(1, 8))
def test_budget_protection_and_pages_over_appends_and_rebudgets(seed, batch, heads, prompt, steps, fraction, sink,
                                                                 recent, every):
    def check(states, history, budget):
        assert (token_bytes(states, table()) <= budget).all()
        check_pages(states)
        k, _, valid = exact_kv(states)
        T = history.shape[2]
        for b in range(batch):
            for h in range(heads):
                kept = k[b, h][valid[b, h]]
                ns = min(sink, T)
                assert torch.equal(kept[:ns], history[b, h, :ns]), "a sink left the exact tier"
                nr = min(recent, T - ns)
                if nr:
                    assert torch.equal(kept[-nr:], history[b, h, T - nr:]), "a recent token left the exact tier"

    run_sequence(seed, batch, heads, prompt, steps, fraction, sink, recent, every, check)


def test_deterministic_for_a_seed():
    a, _ = run_sequence(11, 2, 2, 90, 20, 1 / 8, 2, 6, 4)
    b, _ = run_sequence(11, 2, 2, 90, 20, 1 / 8, 2, 6, 4)
    for sa, sb in zip(a, b):
        for ta, tb in zip(sa.tensors(), sb.tensors()):
            assert torch.equal(ta, tb)


def test_bounded_memory_long_generation_at_one_eighth():
    """Generation 6x longer than the tokens the budget could hold exact: at every step the
    token bytes stay <= the budget, and the bytes of pages in use stay <= budget + the
    documented page slack (< one page per row, head and tier); decode attention accumulates
    utility like the real decode loop."""
    heads, sink, recent, every, max_tokens = 2, 4, 16, 8, 512
    budget = rdr.layer_budget_bytes(1 / 8, max_tokens, heads, D)
    store = LayerStore(1, heads, D, DEFAULT_TIERS, kv_dtype=KV, page_size=8, seed=SEED)
    gen = torch.Generator().manual_seed(0)
    tab = table()
    steps = 6 * budget // (heads * tab.exact_bytes)
    rebudgets = 0
    for step in range(steps):
        q = torch.randn(1, 3 * heads, 1, D, generator=gen)
        k = torch.randn(1, heads, 1, D, generator=gen)
        v = torch.randn(1, heads, 1, D, generator=gen)
        _, mass = store.attend(q, k, v, accumulate=True)
        rebudgets += rdr.apply(store, k, v, None, mass, budget_bytes=budget, sink=sink, recent=recent,
                               rebudget_every=every)
        assert int(token_bytes(store.states, tab)[0]) <= budget, f"over budget at step {step}"
        in_pages = sum(-(-int(c) // s.page_size) * s.page_size * tab.bytes[t]
                       for t, s in enumerate(store.states) for c in s.count.flatten())
        assert in_pages <= budget + page_slack_bytes(store.states, tab)
    assert rebudgets >= steps // (2 * every), "re-budgeting should recur during generation"
    assert store.token_counts()["exact"] < steps


def test_large_budget_is_dense_attention():
    """With room for every token exact, RDR keeps everything exact: attention equals dense."""
    gen = torch.Generator().manual_seed(5)
    store = LayerStore(1, 2, D, DEFAULT_TIERS, kv_dtype=torch.float32, page_size=8, seed=SEED)
    k = torch.randn(1, 2, 40, D, generator=gen)
    v = torch.randn(1, 2, 40, D, generator=gen)
    rdr.apply(store, k, v, None, torch.rand(1, 2, 40, generator=gen), budget_bytes=10 ** 9, sink=2, recent=4,
              rebudget_every=4)
    q = torch.randn(1, 4, 3, D, generator=gen)
    got, _ = store.attend(q)
    scores = (q.reshape(1, 2, 6, D) @ k.transpose(-1, -2)) * D ** -0.5
    dense = (torch.softmax(scores, -1) @ v).reshape(1, 4, 3, D)
    assert torch.allclose(got, dense, atol=1e-5)


def test_tight_budget_keeps_high_utility_tokens_finer():
    """Among unprotected tokens, higher utility never gets a coarser choice than a lower one
    with the same norms (the allocation is monotone in u)."""
    store = LayerStore(1, 1, D, DEFAULT_TIERS, kv_dtype=KV, page_size=8, seed=SEED)
    base = torch.randn(1, 1, 1, D)
    n = 64
    k = base.expand(1, 1, n, D).clone()
    v = base.expand(1, 1, n, D).clone()
    u = torch.linspace(0.01, 1, n)[None, None]
    tokens = rdr.update.collect(store.states, list(DEFAULT_TIERS), table(), k, v, None, u, head_dim=D, seed=SEED,
                                kv_dtype=KV, sink=0, recent=0)
    budget = torch.tensor([n * table().bytes[2] * 1.0])
    choice = rdr.allocate(tokens.distortion.reshape(1, n, -1), torch.tensor(table().bytes), budget)[0]
    costs = torch.tensor(table().bytes)[choice]
    assert (costs[1:] >= costs[:-1]).all()


def test_budget_too_small_is_an_error_up_front():
    opts = SphkvOptions(budget=1 / 64, policy="rdr", sink=4, recent=64, rebudget_every=64)
    with pytest.raises(rdr.RdrBudgetError, match="raise the budget"):
        rdr.check_options(opts, max_tokens=2048, kv_heads=3, head_dim=64, kv_dtype=KV)
    assert rdr.check_options(SphkvOptions(budget=1 / 8, policy="rdr"), 8192, 3, 64, KV) > 0


def test_op_traces_with_its_fake_impl():
    """The fake impl (what torch.compile traces) agrees with the real op on every mutated
    tensor's metadata, and the schema's mutation annotations hold (torch.library.opcheck)."""
    states = [TierState.allocate(1, 2, 4, 8, sum(record_words(s, D, SEED, KV)), 4, "cpu") for s in DEFAULT_TIERS]
    flat = [t for s in states for t in s.tensors()]
    k = torch.randn(1, 2, 3, D)
    torch.library.opcheck(torch.ops.sphkv.rdr_update.default,
                          (flat, k, k, None, None, tiers_string(DEFAULT_TIERS), SEED, "bfloat16", 1, 1, 1, 10 ** 6, 4),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("d", [64, 128])
def test_demotion_through_a_device_encoder_matches_the_rotated_reencode(monkeypatch, d):
    """Where a device registers a faster encoder (the Triton one on CUDA), a re-budget's demotion
    hands it the decoded tokens un-rotated and in the cache's dtype instead of re-encoding in the
    rotated domain. That only re-rounds (the rotation's float32 round trip and the cast to the
    cache dtype): every code, radius included, is the reference's or its neighbour (level-1
    angles are circular), and few codes move: a regression guard at 2%, not a derived bound
    (measured at most 0.66% per field, at d=64 from high to mid). The Triton encoder itself is
    checked against float64 in tests/test_kernels_gpu.py; this path runs it only on a GPU."""
    from sphkv_compile import store
    from sphkv_compile.rdr.convert import convert_records, decode_kv
    from sphkv_compile.tiers import tier_codecs

    high = DEFAULT_TIERS[1]
    g = torch.Generator().manual_seed(d)
    k = torch.randn(4000, d, generator=g).to(torch.bfloat16)
    v = torch.randn(4000, d, generator=g).to(torch.bfloat16)
    rec = store.encode_records(high, k, v, 0, torch.bfloat16)
    for dst in DEFAULT_TIERS[2:]:
        reference = convert_records(high, dst, rec, d, 0, torch.bfloat16)
        decoded = []  # the device's decoder is used when one is registered (kernels.record_decode on CUDA)
        monkeypatch.setitem(store._DEVICE_ENCODERS, "cpu", lambda *a: store.encode_records(*a))
        monkeypatch.setitem(store._DEVICE_DECODERS, "cpu",
                            lambda *a: decoded.append(a[0]) or decode_kv(*a, rotated=False))
        via_device = convert_records(high, dst, rec, d, 0, torch.bfloat16)
        monkeypatch.delitem(store._DEVICE_ENCODERS, "cpu")
        monkeypatch.delitem(store._DEVICE_DECODERS, "cpu")
        assert decoded == [high]
        kc, vc = tier_codecs(dst, d, 0)
        for codec, part in ((kc, slice(0, kc.words)), (vc, slice(kc.words, None))):
            fields = zip(codec.layout.unpack(reference[:, part]), codec.layout.unpack(via_device[:, part]))
            for f, (a, b) in enumerate(fields):
                diff = (a - b).abs()
                if f == 1:  # level-1 angles live on a circle of 2^bits codes
                    diff = torch.minimum(diff, (1 << codec.level_bits[0]) - diff)
                assert int(diff.max()) <= 1, (dst.name, f)
                assert float((diff > 0).float().mean()) < 0.02, (dst.name, f)
