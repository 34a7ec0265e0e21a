"""What an optimized transformers model tells its caller: the coverage and performance
warnings (each once per model or cache, with the cause and the fix) and the refusal of a
serving mode sphkv cannot take. `state` is the model's api._ModelState, which holds the
once-only flags."""
from __future__ import annotations

import warnings
import weakref

from .options import SphkvCoverageWarning, SphkvPerformanceWarning


def warn_if_nothing_compressed(state, plans, attention_free: bool) -> None:
    """A cache on which every layer stays dense saves nothing, which otherwise only report()
    would tell: say so, once per model (a sliding window's reason names each call's length)."""
    if not plans or any(p.compressed for p in plans) or attention_free or state.all_dense_warned:
        return
    state.all_dense_warned = True
    reasons = dict.fromkeys(p.reason for p in plans)
    warnings.warn(f"sphkv: none of this model's {len(plans)} layers is compressed, so the cache holds dense K/V "
                  f"and saves no memory: {'; '.join(reasons)}. report() lists every layer with its reason.",
                  SphkvCoverageWarning, stacklevel=3)


def warn_no_attention_weights(state) -> None:
    """sphkv attends from the codes in fused kernels and, like transformers' sdpa, returns no
    attention weights: the compressed layers' entries of `attentions` are missing."""
    if not state.weights_warned:
        state.weights_warned = True
        warnings.warn(
            "sphkv: output_attentions=True, but compressed layers return no attention weights (attention runs "
            "from the codes in fused kernels, as with attn_implementation='sdpa'), so `attentions` leaves them "
            "out. Fix: to inspect weights, run the model without sphkv_compile.optimize() and with "
            "attn_implementation='eager'.", SphkvCoverageWarning, stacklevel=3)


_warned_caches = weakref.WeakSet()  # caches of the caller's own that warn_dense_cache named already


def warn_dense_cache(cache) -> None:
    """A cache of the caller's own (transformers' DynamicCache, StaticCache, ...) keeps dense K/V
    and the model's attention runs over it uncompressed: correct, but not what optimize() was
    called for, so it is said once per cache object. check() passes one on purpose for its
    dense baseline."""
    try:
        if cache in _warned_caches:
            return
        _warned_caches.add(cache)
    except TypeError:  # not weakly referenceable: say it every call rather than never
        pass
    warnings.warn(f"sphkv: this call passes its own {type(cache).__name__}, so attention runs dense over it and "
                  "nothing is compressed (sphkv compresses only its own cache). Fix: pass no cache (generate() and "
                  "the forward make one) or sphkv_compile.new_cache(model); to run dense on purpose, ignore "
                  "SphkvCoverageWarning", SphkvCoverageWarning, stacklevel=3)


def refuse_continuous_batching(*args, **kwargs):
    """transformers' continuous batching (generate_batch, init_continuous_batching,
    cache_implementation='paged') keeps K/V in its own paged cache, served by attention
    implementations of its own: sphkv's store cannot stand in for it, and running it dense would
    silently give up the saving. Every entry point reaches init_continuous_batching, which this
    replaces on an optimized model."""
    raise ValueError(
        "sphkv: continuous batching (generate_batch, init_continuous_batching, cache_implementation='paged') "
        "keeps K/V in transformers' paged cache, which sphkv does not compress. Fix: batch the prompts through "
        "generate() (left-padded, with an attention_mask; the sphkv cache serves batches), or run continuous "
        "batching on a model loaded without sphkv_compile.optimize().")


# RDR's re-budgets run on the host (a few hundred small ops per layer); when they take more than
# this share of a generate() call that lasted at least REBUDGET_WARN_MIN_SECONDS, say so.
REBUDGET_WARN_SHARE = 0.5
REBUDGET_WARN_MIN_SECONDS = 1.0


def warn_if_rebudgets_dominate(seconds: float, rebudgets: dict, rebudget_every: int) -> None:
    """seconds: the generate() call's wall time; rebudgets: report()["rebudgets"] of that call."""
    spent = sum(entry["host_seconds"] for entry in rebudgets.values())
    count = sum(entry["count"] for entry in rebudgets.values())
    if seconds < REBUDGET_WARN_MIN_SECONDS or spent <= REBUDGET_WARN_SHARE * seconds:
        return
    warnings.warn(
        f"sphkv: RDR's re-budgets took {spent:.2f} s of this generate()'s {seconds:.2f} s ({count} layer "
        f"re-budgets, {1000 * spent / count:.1f} ms each, on the host; report()['rebudgets'] has them by kind). "
        f"Fix: a larger rebudget_every (now {rebudget_every}) spreads them over more tokens; "
        f"policy='uniform' has none.", SphkvPerformanceWarning, stacklevel=3)


def warn_if_kernels_do_not_cover(state, device, why: str | None) -> None:
    """On an accelerator, a model the Triton kernels do not cover (why: graph_blocker's cause, an
    odd head dim or 32-bit radii) runs every sphkv op as its torch reference: the memory saving
    holds, the speed does not. report() records it; this says it once per model, where a user
    looking at generate() sees it."""
    if device.type == "cpu" or state.coverage_warned or why is None:
        return
    state.coverage_warned = True
    warnings.warn(
        f"sphkv: {why}. Decode will be many times slower than dense (the KV memory saving still holds), "
        "and the decode step cannot replay from CUDA graphs. Fix: the kernels need a power-of-two head "
        "dim in [16, 256] (pad_head_dim='auto', the default, pads smaller ones on CUDA) and the default "
        "radius bits; otherwise run this model without sphkv if speed matters.",
        SphkvPerformanceWarning, stacklevel=3)


def warn_if_compiled_over_a_dynamic_cache(state, model, dynamic: bool) -> None:
    """A forward the caller compiled (torch.compile(model.forward) or model.compile()) over a
    dynamic sphkv cache breaks its graph wherever the pools grow (page reservations decide on
    the host), and the frames Dynamo resumes after each break use up its recompile limit: the
    tokens stay right but the step runs mostly eagerly, with torch's warnings. Say why, once."""
    compiled = (getattr(model.forward, "_torchdynamo_orig_callable", None) is not None
                or getattr(model, "_compiled_call_impl", None) is not None)
    if dynamic and compiled and not state.compiled_dynamic_warned:
        state.compiled_dynamic_warned = True
        warnings.warn(
            "sphkv: the model's forward is compiled, but this generate() runs on a dynamic sphkv cache, whose "
            "pools grow on the host: the compiled forward breaks its graph at every growth and soon hits "
            "torch._dynamo's recompile limit (tokens stay right, the step runs mostly eagerly). Fix: pass "
            "cache_implementation='static' (or a cache from sphkv_compile.new_cache(model, max_cache_len=...)) "
            "and leave the forward uncompiled: generate() then compiles the decode step itself.",
            SphkvPerformanceWarning, stacklevel=3)


def advise_static(device) -> None:
    """On an accelerator a dynamic cache leaves the decode step uncompiled: every sphkv op is
    launched from Python, which on a small model is many times slower than dense. Say so, with
    the fix."""
    if device.type != "cpu":
        warnings.warn(
            "sphkv: generate() with a dynamic cache runs each decode step's ops from Python (host-bound: many "
            "times slower than dense on small models, docs/PERFORMANCE.md). Fix: pass "
            "cache_implementation='static' to compile the decode step (replayed from CUDA graphs where the "
            "kernels cover the model).",
            SphkvPerformanceWarning, stacklevel=3)
