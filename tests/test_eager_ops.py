"""eager_ops.call_op: in eager inference it calls the ops' implementations without the
dispatcher, with the op's results and state changes; everywhere else (grad on, a dispatch mode,
a compile) the op itself runs."""
from __future__ import annotations

import copy

import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sphkv_compile import eager_ops
from test_ops import TIERS, flat, randn, sized_store


def _store_after_prompt(seed, B=1, H=2, d=32):
    store = sized_store(B, H, d, 96)
    store.update(randn(B, H, 30, d, seed=seed), randn(B, H, 30, d, seed=seed + 1), sink=2, recent=6, target="mid")
    return store


@given(seed=st.integers(0, 10_000), group=st.sampled_from([1, 3]), chunk=st.sampled_from([1, 3]))
@settings(max_examples=5, deadline=None)
@torch.no_grad()
def test_call_op_gives_the_ops_outputs_and_state(seed, group, chunk):
    """A decode (or chunk) step through call_op and through torch.ops.sphkv: equal outputs,
    utility masses and every state tensor, bit for bit."""
    B, H, d = 1, 2, 32
    direct, dispatched = _store_after_prompt(seed), _store_after_prompt(seed)
    q = randn(B, H * group, chunk, d, seed=seed + 2)
    k, v = randn(B, H, chunk, d, seed=seed + 3), randn(B, H, chunk, d, seed=seed + 4)
    args = (k, v, None, TIERS, 0, "float32", d ** -0.5, 2, True)
    out_a, mass_a = eager_ops.call_op("attend", q, flat(direct), *args)
    out_b, mass_b = torch.ops.sphkv.attend(q, flat(dispatched), *args)
    assert torch.equal(out_a, out_b) and torch.equal(mass_a, mass_b)
    eager_ops.call_op("update_cache", flat(direct), k, v, None, mass_a, TIERS, 0, "float32", 2, 6, 2)
    torch.ops.sphkv.update_cache(flat(dispatched), k, v, None, mass_b, TIERS, 0, "float32", 2, 6, 2)
    for a, b in zip(flat(direct), flat(dispatched)):
        assert torch.equal(a, b)


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_call_op_takes_the_op_outside_eager_inference(monkeypatch):
    """The implementation is called directly only with grad off, outside a dispatch mode, a
    torch-function mode and a compile; otherwise through torch.ops.sphkv (seen here: the spy
    replaces only the direct path)."""
    store = _store_after_prompt(7)
    q, k = randn(1, 2, 1, 32, seed=8), randn(1, 2, 1, 32, seed=9)
    direct = []
    reference = eager_ops._IMPLEMENTATIONS[("attend", "default")]

    def spy(*args):
        direct.append(1)
        return reference(*args)

    monkeypatch.setitem(eager_ops._IMPLEMENTATIONS, ("attend", "default"), spy)
    state = copy.deepcopy(flat(store))

    def call():
        return eager_ops.call_op("attend", q, state, k, k, None, TIERS, 0, "float32", 0.2, 0, False)

    with torch.no_grad():
        want = call()[0]
    assert direct == [1]
    with torch.enable_grad():
        assert torch.equal(call()[0], want)
    with torch.no_grad(), _Passthrough():
        assert torch.equal(call()[0], want)
    with torch.no_grad(), torch.device("cpu"):  # a torch-function mode
        assert torch.equal(call()[0], want)
    with torch.no_grad():
        compiled = torch.compile(call, backend="eager", fullgraph=True)
        assert torch.equal(compiled()[0], want)
    assert direct == [1]
