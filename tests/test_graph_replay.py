"""The backend's CUDA graph replay (inductor_passes/graph_replay.py), its bookkeeping checked on
the CPU with a stand-in graph that runs the callable at capture and again at every replay,
writing into the tensors the capture returned, as a CUDA graph does. The GPU run of the real
thing is tests/test_backend_gpu.py."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import sphkv_compile
from sphkv_compile.inductor_passes import graph_replay
from sphkv_compile.inductor_passes.graph_replay import WARMUP, GraphReplay
from sphkv_compile.options import SphkvPerformanceWarning
from tests.models import gpt_fast


class StandInGraph:
    """Captures fn(*args) by running it once; replay() runs it on the same argument objects and
    copies the results into the captured outputs. The first replay after a capture runs
    nothing, as the capture's own run stands for it (a CUDA capture runs nothing, and
    GraphReplay replays once right after it)."""
    capturing = None  # the graph inside its capture block
    captures = 0

    def __init__(self):
        self.fn = self.args = self.outputs = None
        self.fresh = False

    def replay(self):
        if self.fresh:
            self.fresh = False
            return
        for o, new in zip(self.outputs, self.fn(*self.args)):
            if isinstance(o, torch.Tensor):
                o.copy_(new)


@contextlib.contextmanager
def stand_in_capture(graph):
    StandInGraph.captures += 1
    StandInGraph.capturing = graph
    try:
        yield
    finally:
        StandInGraph.capturing = None
    graph.fresh = True


def graphed(fn):
    """GraphReplay of fn whose captures record fn's call on the stand-in graph."""
    def recording(*args):
        out = fn(*args)
        graph = StandInGraph.capturing
        if graph is not None:
            graph.fn, graph.args, graph.outputs = fn, args, list(out)
        return out
    return GraphReplay(recording, new_graph=StandInGraph, capture=stand_in_capture)


@pytest.fixture(autouse=True)
def fresh_counts():
    StandInGraph.captures, StandInGraph.capturing = 0, None


def test_warm_up_then_capture_then_replay_copies_moving_inputs_and_reads_fixed_ones_in_place():
    weight = torch.randn(4)
    state = torch.zeros(4)  # mutated in place every call, like a store
    calls = []

    def fn(x, w, s):
        calls.append(1)
        s.add_(x)
        return [x * w + s]

    replay = graphed(fn)
    want_state = torch.zeros(4)
    for step in range(6):
        x = torch.full((4,), float(step))  # a new tensor each call: copied into the graph's input
        out = replay([x, weight, state])[0]
        want_state += x
        torch.testing.assert_close(out, x * weight + want_state)
        torch.testing.assert_close(state, want_state)
    assert StandInGraph.captures == 1 and len(calls) == 6
    (entry,) = replay.entries.values()
    assert entry.moving == {0} and set(entry.in_place) == {1, 2}
    kept = replay([torch.ones(4), weight, state])[0]
    expected = weight + want_state + 1
    replay([torch.ones(4), weight, state])  # overwrites the graph's own output
    torch.testing.assert_close(kept, expected)  # a returned output is the caller's copy


def test_an_in_place_argument_that_moves_is_captured_again_and_copied_from_then_on():
    def fn(x, w):
        return [x + w]

    replay = graphed(fn)
    w = torch.ones(3)
    for _ in range(WARMUP + 2):
        replay([torch.randn(3), w])
    w2 = torch.full((3,), 5.0)  # the "fixed" argument now lives elsewhere
    x = torch.randn(3)
    torch.testing.assert_close(replay([x, w2])[0], x + 5)
    assert StandInGraph.captures == 2
    (entry,) = replay.entries.values()
    assert entry.moving == {0, 1}
    x = torch.randn(3)
    torch.testing.assert_close(replay([x, torch.full((3,), 7.0)])[0], x + 7)
    assert StandInGraph.captures == 2


def test_an_output_that_is_an_in_place_argument_comes_back_as_that_argument():
    buf = torch.zeros(2)

    def fn(x, b):
        b.add_(x)
        return [b, x * 2]

    replay = graphed(fn)
    for _ in range(WARMUP + 2):
        out = replay([torch.ones(2), buf])
    assert out[0] is buf
    torch.testing.assert_close(buf, torch.full((2,), float(WARMUP + 2)))


def test_a_call_that_cannot_be_captured_warns_once_and_runs_without_graphs():
    def fn(x):
        if StandInGraph.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return [x + 1]

    replay = GraphReplay(fn, new_graph=StandInGraph, capture=stand_in_capture)
    for _ in range(WARMUP):
        replay([torch.zeros(1)])
    with pytest.warns(SphkvPerformanceWarning, match="could not be captured.*not permitted"):
        out = replay([torch.zeros(1)])
    torch.testing.assert_close(out[0], torch.ones(1))
    (entry,) = replay.entries.values()
    assert entry.failed and replay([torch.zeros(1)])[0].item() == 1.0


def test_only_the_latest_signatures_are_kept():
    replay = graphed(lambda x: [x])
    for n in range(graph_replay.MAX_SIGNATURES + 3):
        replay([torch.zeros(n + 1)])
    assert len(replay.entries) == graph_replay.MAX_SIGNATURES


@torch.no_grad()
def test_a_compiled_gpt_fast_decodes_as_dense_through_the_replay(monkeypatch):
    """options cuda_graphs on a model whose stores are on the CPU, with the replay forced on and
    the stand-in graph: 12-bit tokens equal dense's over prefill and 12 decode steps, and the
    decode steps were replayed."""
    monkeypatch.setenv("SPHKV_INNER_COMPILER", "aot_eager")
    from sphkv_compile import backend

    made = []

    def run(self, key, fn, full):
        if key not in self.replays:
            self.replays[key] = graphed(fn)
            made.append(self.replays[key])
        return self.replays[key](full)
    monkeypatch.setattr(backend.CompiledWithStores, "_run", run)
    torch.manual_seed(31)
    model = gpt_fast.GPTFast().eval()
    model.setup_caches(1)
    dense = copy.deepcopy(model)
    prompt = torch.randint(0, model.cfg.vocab, (1, 10), generator=torch.Generator().manual_seed(31))
    want, _ = gpt_fast.generate(dense, prompt, 12)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sphkv", options={"bits": 12, "cuda_graphs": True})
    got, _ = gpt_fast.generate(model, prompt, 12, compiled)
    assert torch.equal(got, want)
    assert StandInGraph.captures >= 1 and sum(r.replays() for r in made) >= 1
    assert all(s["rewritten"] for s in sphkv_compile.report()["sites"])


def test_cuda_graphs_is_validated_and_refused_by_optimize():
    from sphkv_compile.options import SphkvOptions, SphkvOptionsError
    with pytest.raises(SphkvOptionsError, match="cuda_graphs"):
        SphkvOptions.from_dict({"cuda_graphs": "yes"})
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(SphkvOptionsError, match="cuda_graphs is for torch.compile.*Fix: drop cuda_graphs"):
        sphkv_compile.optimize(transformers.LlamaForCausalLM(config), cuda_graphs=True)


def test_under_rdr_cuda_graphs_warns_and_runs_without_graphs(monkeypatch):
    """RDR's re-budget decides on the host inside the step: never captured."""
    from sphkv_compile import backend
    from sphkv_compile.options import SphkvOptions

    stub = backend.CompiledWithStores.__new__(backend.CompiledWithStores)
    stub.options = SphkvOptions.from_dict({"policy": "rdr", "budget": 0.5, "cuda_graphs": True})
    stub.groups = [type("Group", (), {"device": torch.device("cuda")})()]
    stub.replays, stub.warned_rdr_graphs = {}, False
    with pytest.warns(SphkvPerformanceWarning, match="ignored under policy 'rdr'"):
        out = stub._run("key", lambda *a: [a[0] + 1], [torch.zeros(1)])
    assert out[0].item() == 1.0 and not stub.replays
    step = sphkv_compile.report()["decode_step"]
    assert step["cuda_graphs"] is False and "ignored under policy 'rdr'" in step["reason"]


def test_report_says_when_the_backend_starts_replaying_from_cuda_graphs(monkeypatch):
    """report()["decode_step"] follows the backend's replay: warm-up calls first, then the
    captured shape (a stand-in graph on the CPU)."""
    from sphkv_compile import backend
    from sphkv_compile.options import SphkvOptions

    monkeypatch.setattr(graph_replay, "GraphReplay", lambda fn: graphed(fn))
    stub = backend.CompiledWithStores.__new__(backend.CompiledWithStores)
    stub.options = SphkvOptions.from_dict({"cuda_graphs": True})
    stub.groups = [type("Group", (), {"device": torch.device("cuda")})()]
    stub.replays = {}
    reasons = []
    for _ in range(WARMUP + 2):
        out = stub._run("key", lambda x: [x + 1], [torch.zeros(1)])
        assert out[0].item() == 1.0
        reasons.append(sphkv_compile.report()["decode_step"])
    assert reasons[0] == {"cuda_graphs": False, "reason": "option cuda_graphs: no call shape captured yet (warm-up calls)"}
    assert reasons[-1] == {"cuda_graphs": True, "reason": "option cuda_graphs: 1 call shape(s) replayed from CUDA graphs"}
    # another compiled graph (a new prompt length's prefill) records its own state; this one's
    # next call puts its own back
    from sphkv_compile.report import record_decode_step
    record_decode_step(False, "option cuda_graphs: no call shape captured yet (warm-up calls)")
    stub._run("key", lambda x: [x + 1], [torch.zeros(1)])
    assert sphkv_compile.report()["decode_step"] == reasons[-1]


def test_calls_that_never_repeat_their_shapes_warn_that_nothing_is_replayed():
    """A cat cache grows every call: no signature comes back, so nothing is captured; say so."""
    replay = graphed(lambda x: [x * 2])
    with pytest.warns(SphkvPerformanceWarning, match="replayed nothing in 16 calls"):
        for n in range(graph_replay.NEVER_REPEATED_WARNING):
            torch.testing.assert_close(replay([torch.ones(n + 1)])[0], torch.full((n + 1,), 2.0))
    assert StandInGraph.captures == 0


def test_a_signature_whose_warm_up_waits_for_the_gpu_is_never_captured():
    """A prefill-shaped call reads the GPU on the host: capturing it would fail after its ops'
    Python code ran, so it is not tried; 16 calls with nothing replayed say where it waited."""
    @contextlib.contextmanager
    def waits_at_store(args):
        yield ["store.py:123"]

    replay = GraphReplay(lambda x: [x + 1], new_graph=StandInGraph, capture=stand_in_capture,
                         watch_waits=waits_at_store)
    with pytest.warns(SphkvPerformanceWarning, match=r"wait for the GPU \(first at store.py:123\)"):
        for _ in range(graph_replay.NEVER_REPEATED_WARNING):
            torch.testing.assert_close(replay([torch.zeros(2)])[0], torch.ones(2))
    assert StandInGraph.captures == 0


def test_a_warm_up_that_waits_once_is_watched_again_and_then_captured():
    """A first decode call's autotuning waits for the GPU once (the H100's first replay test,
    session 41): the next warm-up call is watched again, and a call that no longer waits is
    followed by the capture; the values stay those of the plain calls throughout."""
    waited = []

    @contextlib.contextmanager
    def waits_on_first_watch(args):
        found = [] if waited else ["autotune.py:1"]
        waited.append(1)
        yield found

    replay = graphed(lambda x: [x + 1])
    replay.watch_waits = waits_on_first_watch
    for _ in range(WARMUP + 3):
        torch.testing.assert_close(replay([torch.zeros(2)])[0], torch.ones(2))
    assert len(waited) == 2  # watched twice: the call that waited and the one after
    assert StandInGraph.captures == 1
    assert graph_replay.WAITING_WARMUPS > 1


def test_calls_on_cuda_without_graphs_say_once_how_to_replay_them(monkeypatch):
    """Without cuda_graphs a CUDA decode step is host-bound (slower than dense on the H100,
    session 41): the first such call names the option, later ones stay quiet."""
    import warnings

    from sphkv_compile import backend
    from sphkv_compile.options import SphkvOptions

    monkeypatch.setattr(backend, "_hinted_cuda_graphs", False)
    stub = backend.CompiledWithStores.__new__(backend.CompiledWithStores)
    stub.options = SphkvOptions.from_dict({})
    stub.groups = [type("Group", (), {"device": torch.device("cuda")})()]
    stub.replays = {}
    with pytest.warns(SphkvPerformanceWarning, match=r"without CUDA graphs.*\"cuda_graphs\": True"):
        out = stub._run("key", lambda *a: [a[0] + 1], [torch.zeros(1)])
    assert out[0].item() == 1.0 and not stub.replays
    assert sphkv_compile.report()["decode_step"]["cuda_graphs"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", SphkvPerformanceWarning)
        stub._run("key", lambda *a: [a[0] + 1], [torch.zeros(1)])
