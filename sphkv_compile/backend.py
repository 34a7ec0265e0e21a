"""The `sphkv` torch.compile backend (entry point `torch_dynamo_backends: sphkv`).

    torch.compile(model, backend="sphkv", options={"bits": 3.5, "sink": 4, "recent": 64})

On the Dynamo graph it finds every attention site and the KV-cache update feeding it
(inductor_passes.detect), rewrites each cache into a compressed store the backend owns
(inductor_passes.rewrite, inductor_passes.stores), leaves everything it cannot prove
equivalent dense with a reason (inductor_passes.fallback), and compiles the result with
Inductor. report() lists every site.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import warnings

import torch

from .report import begin_compile, record_decode_step, record_site
from .options import SphkvOptions

log = logging.getLogger("sphkv")
_MIN_CAT_CAPACITY = 256  # tokens per KV head a fresh cat-cache store starts with


def install_kernels() -> None:
    """Give the sphkv ops their CUDA (Triton) implementations, once. Both entry points need
    it: this backend, and optimize(), whose generate() compiles with Inductor's own backend."""
    try:
        from .inductor_passes import lowering
    except ImportError:
        return
    if not getattr(install_kernels, "done", False):
        lowering.install()
        install_kernels.done = True


def sphkv_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    from .inductor_passes.detect import find_sites
    from .inductor_passes.fallback import StayDense
    from .inductor_passes.rewrite import Rewriter, check_cache_is_private, group_sites
    from .inductor_passes.stores import store_of, target_tier

    options = SphkvOptions.from_dict(kwargs.pop("options", None))
    _warn_if_mode_asks_for_graphs(kwargs.pop("mode", None))
    if kwargs:
        raise TypeError(f"sphkv backend: unexpected arguments {sorted(kwargs)}; use options={{...}}")
    install_kernels()
    begin_compile()

    for n in gm.graph.nodes:  # attention already routed through the op (the HF integration)
        if n.op == "call_function" and n.target in (torch.ops.sphkv.attend.default, torch.ops.sphkv.attend):
            record_site("sphkv_attend", True, None, node=n.name)

    # Dynamo reads its own graph after we return: rewrite a copy (node meta is shared, not copied)
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    sites = find_sites(gm, example_inputs)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        from .inductor_passes.fallback import GRAD_ENABLED
        for s in sites:
            s.reason = s.reason or GRAD_ENABLED
    groups = group_sites(sites)
    rewriter = Rewriter(gm, options, _tiers(options), target_tier(options))
    done = []
    for g in groups:
        try:
            check_cache_is_private(gm.graph, g)
        except StayDense as why:
            for s in g.sites:
                s.reason = why.reason
            continue
        rewriter.rewrite(g, len(done))
        done.append(g)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    _hint_transformers(gm, sites)
    for s in sites:
        _record(s)
        if not s.rewritable and s.key is not None and (store_of(example_inputs[placeholders.index(s.key.past)])
                                                        if s.key.past in placeholders else None) is not None:
            raise RuntimeError(f"sphkv: site {s.output} reads a cache already compressed by sphkv, but this graph "
                               f"cannot rewrite it ({s.reason}); its dense data is gone")
    gm.graph.lint()
    gm.recompile()
    if not done:
        return _inner_compile(gm, example_inputs)
    return CompiledWithStores(gm, list(example_inputs), done, options)


def _warn_if_mode_asks_for_graphs(mode) -> None:
    """mode='reduce-overhead' (CUDA graphs) is not how this backend makes graphs: say so once
    per process rather than let a user time a compiled model that silently runs without the
    graphs they asked for."""
    if mode in (None, "default", "max-autotune-no-cudagraphs") or getattr(_warn_if_mode_asks_for_graphs, "done", False):
        return
    from .options import SphkvPerformanceWarning

    _warn_if_mode_asks_for_graphs.done = True
    warnings.warn(f"sphkv: mode={mode!r} asks for CUDA graphs, which the sphkv backend makes only when its options "
                  "say so, so the model runs compiled without them. Fix: for a module with its own cache, pass "
                  "options={..., 'cuda_graphs': True} instead of mode (experimental: not yet timed on a GPU); for a "
                  "transformers model call sphkv_compile.optimize(model) and let generate() compile with its default "
                  "backend (its decode step replays from CUDA graphs on a static cache).",
                  SphkvPerformanceWarning, stacklevel=3)


def _hint_transformers(gm, sites) -> None:
    """A transformers model compiled with this backend directly: its sites stay dense (the KV
    lives in a Cache object, not in the graph). Each such site's reason names optimize(), and a
    warning says it once per compile."""
    dense = [s for s in sites if not s.rewritable]
    if not dense:
        return
    api = sys.modules.get("sphkv_compile.api")  # (not imported here: it imports transformers)
    if api is not None and len(api.OPTIMIZED_MODELS):
        return  # a process that ran optimize() compiles its models' steps here on purpose
    from .inductor_passes.fallback import TRANSFORMERS_MODEL, from_transformers
    from .options import SphkvCoverageWarning

    if not from_transformers(gm):
        return
    for s in dense:
        s.reason = f"{s.reason}; {TRANSFORMERS_MODEL}"
    warnings.warn(f"sphkv: {len(dense)} attention site(s) stay dense: {TRANSFORMERS_MODEL}", SphkvCoverageWarning,
                  stacklevel=2)


_hinted_cuda_graphs = False


def _hint_cuda_graphs() -> None:
    """Once per process: a decode step without graphs is host-bound (session 41, H100: slower
    than dense without them, faster with them; docs/PERFORMANCE.md)."""
    global _hinted_cuda_graphs
    if _hinted_cuda_graphs:
        return
    _hinted_cuda_graphs = True
    from .options import SphkvPerformanceWarning
    warnings.warn("sphkv: this module's compiled calls run on CUDA without CUDA graphs, so the host launches every "
                  "kernel of every layer, and a decode step can be slower than dense (docs/PERFORMANCE.md). Fix: "
                  "torch.compile(model, backend=\"sphkv\", options={..., \"cuda_graphs\": True}) replays the "
                  "decode steps from CUDA graphs (experimental)", SphkvPerformanceWarning, stacklevel=4)


def _static_fakes(mode, inputs: list, ours: set[int]) -> list:
    """Inside Dynamo's compile, AOT autograd fakes each real input with Dynamo's fake mode, by
    the input's source; the store tensors the backend appends have none, so their sizes became
    symbols Dynamo cannot guard on, and a guard Inductor put on one (Triton's 32-bit indexing
    check) failed Dynamo's guard building (torchtune's cache on the H200, session 41). So do the
    stand-ins for released buffers (new tensors: Dynamo's fakes are memoized by the buffer). The
    stores' shapes key the compiled graphs, so these are faked static here; the user inputs keep
    Dynamo's dynamic sizes."""
    return [mode.from_tensor(t, static_shapes=True) if i in ours and isinstance(t, torch.Tensor) else t
            for i, t in enumerate(inputs)]


def _compile_at_run_time(gm, config_patches):
    """A graph for new store shapes (a cat cache's store grew) is compiled at a call, outside
    Dynamo's compile of the model. Compiled from real inputs it would take every size as a
    constant, the cat cache's past length included, and the next call (one token longer) would
    write at the wrong position. So Dynamo compiles the rewritten graph module itself: its sizes
    stay symbolic where they change, and its own guards recompile where they must."""
    def inner(graph, inputs):
        return _inner_compile(graph, inputs, config_patches)

    return torch.compile(gm, backend=inner, fullgraph=True)


def _inner_compile(gm, inputs, config_patches=None):
    """Inductor; SPHKV_INNER_COMPILER=aot_eager runs the same rewritten graph through AOT
    autograd without Inductor codegen (for quick CPU test runs)."""
    if os.environ.get("SPHKV_INNER_COMPILER") == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        compiled = aot_eager(gm, inputs)
        if config_patches:  # still run our post-grad check? it is an Inductor hook; run it on the graph
            config_patches["post_grad_custom_post_pass"](gm.graph)
        return compiled
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, inputs, config_patches=config_patches)


def _tiers(options) -> str:
    from .ops import tiers_string
    return tiers_string(options.tier_ladder)


def _record(site) -> None:
    details = {"node": site.output.name}
    if site.key is not None:
        details.update(cache=site.key.kind, layout="BTHd" if site.key.seq_dim == 1 else "BHTd",
                       groups=site.groups, mode=site.mode, masks=[m.form for m in site.masks])
    record_site(site.kind, site.rewritable, site.reason, **details)


def _check_store_fits(store, g, options) -> None:
    """A cache buffer already bound to a compressed store (by this compiled model, or by another
    one it was passed to) must suit this graph: the same options (bits, tiers, policy, padding
    decide the record layout) and the same batch, KV heads and head dim."""
    seq = g.key.seq_dim
    wanted = (g.shape[0], g.shape[3 - seq], g.shape[3])
    held = (store.batch, store.kv_heads, store.model_head_dim)
    if held != wanted:
        raise RuntimeError(f"sphkv: the KV cache passed in is compressed for (batch, kv_heads, head_dim) = {held}, "
                           f"but this graph attends with {wanted}. Fix: give this model its own cache buffers")
    if store.base_options != options:
        differ = {f.name: (getattr(store.base_options, f.name), getattr(options, f.name))
                  for f in dataclasses.fields(options) if f.compare
                  and getattr(store.base_options, f.name) != getattr(options, f.name)}
        raise RuntimeError(f"sphkv: the KV cache passed in was compressed by a model compiled with other sphkv "
                           f"options (the cache's, this model's: {differ}). Fix: compile both with the same "
                           f"options, or give each its own cache buffers")


class CompiledWithStores:
    """Calls the Inductor-compiled rewritten graph with each cache's store appended to the
    inputs; creates, grows and binds stores, and releases dense buffers."""

    def __init__(self, gm, example_inputs, groups, options):
        self.gm, self.groups, self.options = gm, groups, options
        self.pristine = copy.deepcopy(gm)  # compile_fx may alter the graph it is given
        self.compiled = {}
        self.max_chunk = {id(g): g.chunk_len for g in groups}
        n_user = len(example_inputs)
        self.n_user = n_user
        from .inductor_passes.runtime_checks import CheckReader
        self.checks = CheckReader()
        self.stand_ins = {}  # one per buffer shape: its memory stays put for CUDA graph replay
        self.replays = {}  # compiled callable's key -> GraphReplay (options cuda_graphs)
        self.warned_rdr_graphs = False
        self.unread_buffers = self._unread_static_buffers(gm)
        stores = [self._store_for(g, example_inputs, for_compile=True) for g in groups]
        self._compile(example_inputs, stores)

    def _unread_static_buffers(self, gm) -> list[int]:
        """User-input indices of the static caches' dense buffers that no node of the rewritten
        graph reads (all of them, unless a rewrite left a use behind)."""
        state_slots = {slot for g in self.groups for slot in g.state_inputs + [g.checks_input]}
        user_placeholders = [n for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
                             if i not in state_slots]
        return sorted({i for g in self.groups if g.static for i in (g.key_input, g.value_input)
                       if not user_placeholders[i].users})

    def _stand_in(self, t: torch.Tensor) -> torch.Tensor:
        from .inductor_passes.stores import zero_memory_like

        key = (tuple(t.shape), t.dtype, t.device)
        if key not in self.stand_ins:
            self.stand_ins[key] = zero_memory_like(*key)
        return self.stand_ins[key]

    def _run(self, key, fn, full):
        """fn(*full), replayed from CUDA graphs where options ask for them and the call runs on CUDA."""
        on_cuda = any(g.device.type == "cuda" for g in self.groups)
        if not (self.options.cuda_graphs and on_cuda):
            if on_cuda and self.options.policy != "rdr":
                _hint_cuda_graphs()
                record_decode_step(False, "option cuda_graphs is off: the host launches every kernel of every layer")
            return fn(*full)
        if self.options.policy == "rdr":
            record_decode_step(False, "option cuda_graphs is ignored under policy 'rdr' (its re-budgets decide on "
                               "the host inside the step)")
            return self._run_without_graphs_under_rdr(fn, full)
        if key not in self.replays:
            from .inductor_passes.graph_replay import GraphReplay
            self.replays[key] = GraphReplay(fn)
        out = self.replays[key](full)
        replayed = sum(r.replays() for r in self.replays.values())
        record_decode_step(bool(replayed), f"option cuda_graphs: {replayed} call shape(s) replayed from CUDA graphs"
                           if replayed else "option cuda_graphs: no call shape captured yet (warm-up calls)")
        return out

    def _run_without_graphs_under_rdr(self, fn, full):
        # RDR re-budgets on the host inside the step; a captured step would replay one decision
        if not self.warned_rdr_graphs:
            from .options import SphkvPerformanceWarning
            self.warned_rdr_graphs = True
            warnings.warn("sphkv: option cuda_graphs is ignored under policy 'rdr' (its re-budgets decide on the "
                          "host inside the step, which a CUDA graph cannot replay); the calls run without graphs",
                          SphkvPerformanceWarning, stacklevel=4)
        return fn(*full)

    def _compile(self, user_inputs, stores, key=None):
        from torch._guards import detect_fake_mode

        from .inductor_passes.graph_pass import SphkvGraphPass

        key = key or tuple(s.shapes() for s in stores)
        if key not in self.compiled:
            attends = sum(len(g.sites) for g in self.groups)
            gm = copy.deepcopy(self.pristine)
            patches = {"post_grad_custom_post_pass": SphkvGraphPass(self.options, attends, len(self.groups))}
            inputs = self._assemble(list(user_inputs), stores)
            mode = detect_fake_mode(inputs)
            if mode is None:
                self.compiled[key] = _compile_at_run_time(gm, patches)
            else:  # inside Dynamo's compile of the model
                ours = {slot for g in self.groups for slot in g.state_inputs + [g.checks_input]}
                ours |= {i for i, t in enumerate(inputs) if any(t is s for s in self.stand_ins.values())}
                self.compiled[key] = _inner_compile(gm, _static_fakes(mode, inputs, ours), patches)
        return self.compiled[key]

    def _assemble(self, user_inputs, stores):
        """User inputs with each group's store tensors at the placeholder slots the rewrite made.
        A static cache's dense buffers, which the rewritten graph no longer reads, go in as
        stand-ins of their shape that hold no memory: the buffer is dense when the graph is
        compiled and released after its first call, and Inductor on CUDA asserts every input's
        strides (torch 2.11 skips Dynamo's guard on a module buffer's strides, so the graph
        compiled on the dense buffer was called again on the released one: session 40)."""
        total = self.n_user + sum(len(g.state_inputs) + 1 for g in self.groups)
        args = [None] * total
        user_inputs = list(user_inputs)
        for i in self.unread_buffers:
            user_inputs[i] = self._stand_in(user_inputs[i])
        extra = {}
        for g, s in zip(self.groups, stores):
            for slot, t in zip(g.state_inputs, s.tensors()):
                extra[slot] = t
            extra[g.checks_input] = self.checks.tensor(g.device)
        it = iter(user_inputs)
        for i in range(total):
            args[i] = extra[i] if i in extra else next(it)
        return args

    def _store_for(self, g, inputs, for_compile=False):
        from .inductor_passes.stores import CompressedCache, bind, store_of, written_since_release
        from .options import SphkvCacheWarning

        k_buf, v_buf = inputs[g.key_input], inputs[g.value_input]
        store = store_of(k_buf)
        if store is not None and store_of(v_buf) is not store:
            raise RuntimeError("sphkv: keys and values passed in belong to different compressed caches")
        seq = g.key.seq_dim
        if store is None:
            B, d = g.shape[0], g.shape[3]
            hkv = g.shape[3 - seq]
            if g.static:
                capacity = g.shape[seq]
            else:
                capacity = max(_MIN_CAT_CAPACITY, 2 * g.shape[seq], 2 * k_buf.shape[seq])
            store = CompressedCache(B, hkv, d, capacity, self.options, g.dtype, g.device,
                                    max_tokens=capacity if g.static else None)
            if not g.static and k_buf.shape[seq] > 0 and not for_compile:
                canon = (lambda t: t.transpose(1, 2) if seq == 1 else t)
                store.ingest(canon(k_buf).contiguous(), canon(v_buf).contiguous())
            if g.static:
                bind(k_buf, store)
                bind(v_buf, store)
        else:
            _check_store_fits(store, g, self.options)
            if g.static and (written_since_release(k_buf) | written_since_release(v_buf)):
                warnings.warn("sphkv: a KV cache buffer that sphkv released (it holds one element; the compressed "
                              "store holds the tokens) was written by code outside the compiled model, such as an "
                              "uncompiled forward of the module. That forward's attention read the released buffer, "
                              "so its output was wrong. Fix: give the uncompiled module fresh buffers (gpt-fast: "
                              "setup_caches) before calling it", SphkvCacheWarning, stacklevel=3)
            if not g.static:
                need = k_buf.shape[seq] + self.max_chunk[id(g)]
                if need > store.capacity:
                    store.grow(max(2 * store.capacity, need))
        return store

    def __call__(self, *args):
        from .inductor_passes.stores import bind, release_buffer

        args = list(args)
        self.checks.before_call()  # raises for an earlier call whose checks failed
        stores = [self._store_for(g, args) for g in self.groups]
        key = tuple(s.shapes() for s in stores)
        fn = self._compile(args, stores, key)
        full = self._assemble(args, stores)
        out = self._run(key, fn, full)  # aot_module_simplified returns the unboxed convention here
        self.checks.after_call()  # on the CPU raises now; on a GPU queues the verdict's copy
        for g, s in zip(self.groups, stores):
            if g.static:
                release_buffer(args[g.key_input])
                release_buffer(args[g.value_input])
            else:
                for i in g.key_outputs + g.value_outputs:
                    bind(out[i], s)
                    self.max_chunk[id(g)] = max(self.max_chunk[id(g)], out[i].shape[g.key.seq_dim]
                                                - args[g.key_input].shape[g.key.seq_dim])
        return out
