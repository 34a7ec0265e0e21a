"""`sphkv_compile.optimize(model, **options)`: one call that puts a transformers model's KV
cache on the compressed store.

    model = sphkv_compile.optimize(model, bits=3.5)
    model.generate(ids, max_new_tokens=64)                          # dynamic cache, eager
    model.generate(ids, max_new_tokens=64, cache_implementation="static")   # fixed pools
    model.forward = torch.compile(model.forward, backend="sphkv")   # compiled, same results
                                                    # (with a static cache: a dynamic one warns why)

What it does (in place; returns the model):
- switches the attention implementation to "sphkv" (hf.py), remembering the original one
  for the layers that must stay dense (hf_plan.py says which, and why); a model that calls
  SDPA in its own code instead (Falcon) keeps "sdpa", and its forward runs under
  hf.SdpaRouting, which answers the SDPA call after each compressed cache update from the store;
- wraps `generate` so that, unless a cache is passed, it builds an SphkvCache: static (sized
  prompt + max_new_tokens) when cache_implementation="static" is asked for, else dynamic;
- wraps `forward` so a call with use_cache and no cache also gets an SphkvCache, and so the
  cache reaches the attention function (the `sphkv_cache` keyword).
`sphkv_compile.report()` then lists every attention layer, whether it was rewritten, why
not, and the measured resident KV bytes against a dense 16-bit cache.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
import warnings
import weakref

import torch

from . import beam_decode, compile_rules, hf_advice
from .backend import install_kernels
from .report import begin_compile, clear_kv_sources, rebudgets, record_decode_step, record_site, reset_rebudgets
from .report import preserved as report_preserved
from .report import report  # noqa: F401  (api.report(), beside optimize())
from .hf import CACHE_KWARG, DENSE_IMPL_ATTR, IMPL_NAME, RoutedSphkvCache, check_attended, pass_cache_on, register, run_routed
from .head_pad import choose_stored_head_dim
from .hf_cache import SphkvCache, snapshot_kv_bytes, storage_dtype, tracking_preserved
from .hf_plan import (attention_free, cache_updating_classes, calls_sdpa_itself, compressed_geometries, model_dtype,
                      plan_layers)
from .hf_trial import TRIAL_PROMPT, trial_forward
from .hf_advice import warn_if_rebudgets_dominate
from .options import SphkvCoverageWarning, SphkvOptions, SphkvOptionsError, SphkvPerformanceWarning  # noqa: F401  (api.Sphkv*Warning)

STATIC_IMPLEMENTATIONS = ("static", "hybrid", "sliding_window", "hybrid_chunked")
_STATE_ATTR = "_sphkv_state"
# the models optimize() prepared (the backend's hint to call optimize() is for processes with none)
OPTIMIZED_MODELS: "weakref.WeakSet" = weakref.WeakSet()


class _ModelState:
    """What optimize() attached to a model."""

    def __init__(self, options: SphkvOptions, original_forward, original_generate, original_impl, kv_dtype):
        self.options = options
        self.kv_dtype = kv_dtype
        self.original_forward = original_forward
        self.original_generate = original_generate
        self.original_impl = original_impl
        self.coverage_warned = False  # hf_advice.warn_if_kernels_do_not_cover: once per model
        self.trial_done = False  # hf_trial's trial forward ran (once per model: refusals are the code's)
        self.weights_warned = False  # hf_advice.warn_no_attention_weights: once per model
        self.all_dense_warned = False  # hf_advice.warn_if_nothing_compressed: once per model
        self.compiled_dynamic_warned = False  # hf_advice.warn_if_compiled_over_a_dynamic_cache: once per model
        self.static_capacity = 0  # the largest static cache generate() built (_static_capacity)


def _cache_keyword(fn) -> str:
    """transformers >= 5.2x calls the cache `cache`; earlier 5.x `past_key_values`."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """The keyword under which this model's forward (and generate) take the cache."""
    state = getattr(model, _STATE_ATTR, None)
    return _cache_keyword(state.original_forward if state is not None else model.forward)


def new_cache(model, max_cache_len: int | None = None, max_tokens: int | None = None) -> SphkvCache:
    """An SphkvCache for an optimized model: static when max_cache_len is given, else dynamic.
    max_tokens: for a dynamic cache, the longest sequence it will see, if known (generate
    knows it); a sliding window at least that long cannot mask anything (hf_plan)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("call sphkv_compile.optimize(model) first")
    plans = plan_layers(model, max_cache_len, max_tokens)
    routed = calls_sdpa_itself(model)
    cache_class = RoutedSphkvCache if routed else SphkvCache
    cache = cache_class(state.options, plans, max_cache_len, compressed_geometries(model, plans), state.kv_dtype,
                        config=_text_config(model))
    _record_sites(plans, state.original_impl, _dispatch(model))
    hf_advice.warn_if_nothing_compressed(state, plans, attention_free(model.config))
    return cache


def _dispatch(model) -> str:
    """How compressed layers are reached (report()): transformers' AttentionInterface, or the
    model's own SDPA calls routed to the store."""
    return "sdpa_routing" if calls_sdpa_itself(model) else "attention_interface"


def _keeps_its_own_cache(model) -> bool:
    """A model without attention heads (Mamba, xLSTM) has no K/V to store: sphkv hands it no
    cache, and its own runs as without sphkv (xLSTM keeps its recurrent state in a cache class
    of its own, and failed on sphkv's; session 33's probe). report() lists every layer with the
    reason and counts no KV bytes."""
    if not attention_free(model.config):
        return False
    _record_sites(plan_layers(model, None), getattr(model, _STATE_ATTR).original_impl, "none: no attention")
    clear_kv_sources()
    return True


def _record_sites(plans, original_impl, dispatch: str) -> None:
    """The eager path's report: one site per decoder layer. (A compiled forward replaces these
    with what the backend found in the graph.) dispatch: how compressed layers are reached,
    through transformers' AttentionInterface or by routing the model's own SDPA calls."""
    begin_compile()
    for p in plans:
        record_site("hf_attention", p.compressed, p.reason, layer=p.layer_idx, dispatch=dispatch,
                    dense_implementation=None if p.compressed else original_impl)


def optimize(model, kv_dtype: torch.dtype | None = None, trial: bool = True, **options):
    """Put `model`'s KV cache on the compressed store (see the module docstring). Options are
    those of torch.compile(..., backend="sphkv", options=...), validated the same way.

    kv_dtype: dtype of the exact tier (sinks, recent window). Default: the model's dtype if it
    is 16-bit, else bfloat16; pass torch.float32 to keep a float32 model's exact tokens exact.
    trial: run a short forward now (hf_trial.py), so that attention the store cannot follow is
    planned dense with the reason (and a warning) instead of raising in the first generate()."""
    opts = SphkvOptions.from_dict(options)
    if opts.cuda_graphs:
        raise SphkvOptionsError("sphkv option cuda_graphs is for torch.compile(module, backend='sphkv'); optimize() "
                                "leaves CUDA graphs to generate(), which replays a static cache's decode step from them "
                                "(cache_implementation='static'). Fix: drop cuda_graphs")
    if kv_dtype is not None and not (isinstance(kv_dtype, torch.dtype) and kv_dtype.is_floating_point):
        raise ValueError(f"kv_dtype must be a floating torch.dtype, got {kv_dtype!r}")
    if not hasattr(model, "config") or not hasattr(model, "generate"):
        raise TypeError(f"optimize() takes a transformers generative model, got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError("optimize() supports decoder-only models; encoder-decoder models keep their dense cache")
    register()
    install_kernels()  # on CUDA the ops run the Triton kernels (generate() compiles with Inductor, not sphkv)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:  # re-optimizing: new options, same wrappers
        state.options, state.kv_dtype = opts, kv_dtype
        if trial:
            _run_trial(model)  # if it could not run before (e.g. the model was in training mode)
        return model
    original_impl = model.config._attn_implementation
    for config in {id(c): c for c in (model.config, _text_config(model))}.values():
        setattr(config, DENSE_IMPL_ATTR, original_impl)
    if not calls_sdpa_itself(model):
        _set_attn_implementation(model, IMPL_NAME)
        updating = cache_updating_classes(model)
        for module in model.modules():  # where the model drops the attention keywords (hf.pass_cache_on)
            if type(module) in updating and _takes_keywords(type(module).forward):
                module.register_forward_pre_hook(pass_cache_on, with_kwargs=True)
    # else: attention is hard-coded in the model (e.g. Falcon); its forward runs under
    # hf.SdpaRouting, which answers its SDPA calls from the store (_wrap_forward)
    state = _ModelState(opts, model.forward, model.generate, original_impl, kv_dtype)
    setattr(model, _STATE_ATTR, state)
    OPTIMIZED_MODELS.add(model)
    model.forward = _wrap_forward(model, state.original_forward)
    model.generate = _wrap_generate(model, state.original_generate, _cache_keyword(state.original_forward))
    if hasattr(model, "init_continuous_batching"):
        model.init_continuous_batching = hf_advice.refuse_continuous_batching
    if trial:
        _run_trial(model)
    return model


def _run_trial(model) -> None:
    """hf_trial.trial_forward, once per model, where it can tell something: every module in eval
    mode (a module left training could refuse for its dropout, which says nothing about the
    code), weights that are real (not on the meta device), and layers the trial's cache
    compresses. report() and the cache it measures stay as they were."""
    state = getattr(model, _STATE_ATTR)
    if state.trial_done or any(m.training for m in model.modules()):
        return
    if any(p.device.type == "meta" for p in model.parameters()):
        return
    state.trial_done = True
    if not any(p.compressed for p in plan_layers(model, None, TRIAL_PROMPT + 1)):
        return
    with report_preserved(), tracking_preserved():
        refused, unfinished = trial_forward(model, cache_keyword(model),
                                            lambda m: new_cache(m, max_tokens=TRIAL_PROMPT + 1))
    if refused:
        reason = next(iter(refused.values()))
        warnings.warn(f"sphkv: {len(refused)} of {len(plan_layers(model, None))} layers stay dense (a dense cache, "
                      f"no memory saving there): {reason}. report() lists them once a cache is built.",
                      SphkvCoverageWarning, stacklevel=3)
    if unfinished is not None:
        warnings.warn(f"sphkv: optimize()'s trial forward did not finish ({unfinished}); attention the store "
                      "cannot follow may still raise in generate(). Pass trial=False to skip the trial.",
                      SphkvCoverageWarning, stacklevel=3)


def _takes_keywords(fn) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the config field is what the modules read
        model.config._attn_implementation = name


def _take_older_cache_keyword(kwargs: dict, key: str) -> None:
    """A cache passed under `past_key_values`, which transformers still maps to `cache`, moves
    to `key`: it is the caller's cache, not a reason to make a new one (a forward would then
    attend over nothing)."""
    if key != "past_key_values" and kwargs.get(key) is None and kwargs.get("past_key_values") is not None:
        kwargs[key] = kwargs.pop("past_key_values")


def _wrap_forward(model, forward):
    key = _cache_keyword(forward)

    @functools.wraps(forward)
    def sphkv_forward(*args, **kwargs):
        _take_older_cache_keyword(kwargs, key)
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(_text_config(model), "use_cache", True)
        if (cache is None and use_cache and not model.training and not torch.compiler.is_compiling()
                and not attention_free(model.config)):  # (generate() reports why: _keeps_its_own_cache)
            cache = kwargs[key] = new_cache(model)
        weights = kwargs.get("output_attentions")
        if weights is None:  # the config's default, read only when the call does not say
            weights = getattr(_text_config(model), "output_attentions", False)
        if weights:
            hf_advice.warn_no_attention_weights(getattr(model, _STATE_ATTR))
        if isinstance(cache, RoutedSphkvCache):
            return run_routed(cache, forward, *args, **kwargs)
        if isinstance(cache, SphkvCache):
            kwargs[CACHE_KWARG] = cache
            out = forward(*args, **kwargs)
            check_attended(cache)
            return out
        if cache is not None and not torch.compiler.is_compiling() and not attention_free(model.config):
            hf_advice.warn_dense_cache(cache)
        return forward(*args, **kwargs)

    return sphkv_forward


def _generation_config(kwargs: dict, model):
    """The generation config this generate() call runs with (its keywords may still override
    single settings: compile_rules.setting)."""
    return kwargs.get("generation_config") or model.generation_config


def _wrap_generate(model, generate, key: str):
    """key: the cache keyword of the model's forward, which generate accepts too."""

    @functools.wraps(generate)
    def sphkv_generate(*args, **kwargs):
        reset_rebudgets()  # report()["rebudgets"] then describes this call
        _take_older_cache_keyword(kwargs, key)
        if kwargs.get(key) is None:
            config = _generation_config(kwargs, model)
            if _keeps_its_own_cache(model):
                return generate(*args, **kwargs)  # no attention: the model's own cache, untouched
            impl = kwargs.pop("cache_implementation", None) or getattr(config, "cache_implementation", None)
            if impl == "paged":
                hf_advice.refuse_continuous_batching()
            if impl not in (None, "dynamic", *STATIC_IMPLEMENTATIONS):
                raise ValueError(f"cache_implementation={impl!r} is not available with sphkv; "
                                 "use 'dynamic' or 'static'")
            total = _generation_length(args, kwargs, config)
            if total is not None:
                total += _prompt_lookup_overrun(kwargs, config)
            if impl in STATIC_IMPLEMENTATIONS and total is None:
                raise ValueError("a static sphkv cache needs the prompt (input_ids or inputs_embeds) and "
                                 "max_new_tokens or max_length to size its pools")
            if impl is not None and getattr(config, "cache_implementation", None) is not None:
                config = _copy_without_cache_implementation(config)
                kwargs["generation_config"] = config
            if impl in STATIC_IMPLEMENTATIONS:
                kwargs[key] = new_cache(model, _static_capacity(model, total))
            else:
                hf_advice.advise_static(model.device)
                kwargs[key] = new_cache(model, max_tokens=total)
        cache = kwargs.get(key)
        steps = contextlib.nullcontext()
        if isinstance(cache, SphkvCache):
            _raise_if_longer_than_cache(args, kwargs, model, cache)
            _check_drafts(kwargs, model, cache)
            hf_advice.warn_if_compiled_over_a_dynamic_cache(getattr(model, _STATE_ATTR), model, cache.capacity is None)
            graphs, why = _decode_step_mode(kwargs, model, cache)
            steps, graphs, why = _beam_search_steps(kwargs, model, cache, graphs, why)
            record_decode_step(graphs, why)
            if graphs and cache.options.policy == "rdr":
                kwargs["logits_processor"] = _with_rebudget(kwargs.get("logits_processor"), cache)
        started = time.perf_counter()
        try:
            with steps:
                out = generate(*args, **kwargs)
        finally:
            if isinstance(cache, SphkvCache):
                snapshot_kv_bytes(cache)  # report() keeps the numbers after the cache is freed
        if isinstance(cache, SphkvCache):
            cache.raise_if_over_budget()  # what decode steps replayed from CUDA graphs recorded
            warn_if_rebudgets_dominate(time.perf_counter() - started, rebudgets(), cache.options.rebudget_every)
        return out

    return sphkv_generate


def _static_capacity(model, total: int) -> int:
    """Positions of the static cache generate() builds: at least the largest it built before for
    this model, as transformers does for its StaticCache. The pools' shapes then stay the same
    from call to call, so a shorter generation replays the compiled decode step instead of
    recompiling it; the memory is that of the longest generation so far. A cache from
    new_cache(model, max_cache_len=...) is sized exactly."""
    state = getattr(model, _STATE_ATTR)
    state.static_capacity = max(state.static_capacity, total)
    return state.static_capacity


def _check_drafts(kwargs: dict, model, cache: SphkvCache) -> None:
    """Assisted and prompt-lookup decoding crop the cache after rejected drafts, which reaches
    only the newest `recent` tokens (cache_crop.py): a setting that cannot work is refused
    before the prefill, naming the fix, rather than at the first crop or by transformers'
    generic check."""
    config = _generation_config(kwargs, model)
    drafts = _drafts(kwargs, config)
    if not drafts:
        return
    recent = cache.options.recent
    if recent <= 0:
        raise ValueError(f"sphkv: {drafts[0]} (assisted decoding) removes rejected draft tokens from the cache, "
                         "which recent=0 does not allow (no newest token is sure to be exact). Fix: "
                         "optimize(model, recent=...) at least as long as the drafts")
    k = compile_rules.setting(kwargs, config, "prompt_lookup_num_tokens")
    if k is not None and int(k) > recent:
        raise ValueError(f"sphkv: prompt_lookup_num_tokens={int(k)} drafts more tokens than the {recent} newest the "
                         f"cache can remove after a rejection (recent={recent}). Fix: prompt_lookup_num_tokens <= "
                         f"{recent}, or optimize(model, recent={int(k)})")
    assistant = compile_rules.setting(kwargs, config, "assistant_model")
    n = _draft_model_tokens(assistant) if assistant is not None else None
    if n is not None and n > recent:
        raise ValueError(f"sphkv: the draft model drafts {n} tokens (num_assistant_tokens in its generation config), "
                         f"more than the {recent} newest the cache can remove after a rejection (recent={recent}). "
                         f"Fix: assistant_model.generation_config.num_assistant_tokens <= {recent} (with "
                         f"num_assistant_tokens_schedule='constant'), or optimize(model, recent={n})")


def _beam_search_steps(kwargs: dict, model, cache: SphkvCache, graphs: bool, why: str):
    """Beam search: transformers leaves its decode step uncompiled; compile it here where it
    would compile a greedy one (beam_decode.py). Returns (context for the generate() call,
    CUDA graphs?, why) for report()."""
    config = _generation_config(kwargs, model)
    if beam_decode.num_beams(kwargs, config) <= 1:
        return contextlib.nullcontext(), graphs, why
    compile_cfg = compile_rules.compile_config(kwargs, config, model)
    blocker = beam_decode.why_not_compiled(model, cache, kwargs, config, compile_cfg)
    if blocker is not None:
        return contextlib.nullcontext(), False, f"beam search runs uncompiled: {blocker}"
    return (beam_decode.compiled_decode_steps(model, compile_cfg), graphs,
            f"beam search, its decode step compiled by sphkv (transformers compiles only greedy/sampling): {why}")


def _with_rebudget(processors, cache: SphkvCache):
    """The caller's logits processors plus one that runs RDR's re-budget check after every
    forward, outside the CUDA graphs the decode step replays from (SphkvCache.rebudget_due)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class RebudgetBetweenSteps(LogitsProcessor):
        def __call__(self, input_ids, scores):
            cache.rebudget_due()
            return scores

    return LogitsProcessorList([*(processors or []), RebudgetBetweenSteps()])


def graph_blocker(model, max_cache_len: int | None = None) -> str | None:
    """Why a CUDA graph cannot replay this model's decode step on the sphkv cache (None: it
    can). A replay runs only what was captured, so the step must decide nothing on the host:
    every op on the Triton kernels (the torch references read counts back to the host). A byte
    budget is then checked on the device while captured; under policy 'rdr' the decode token
    joins the exact tier on the device and re-budgets run between steps (rdr/node.py)."""
    state = getattr(model, _STATE_ATTR)
    o = state.options
    try:
        from .kernels import cuda_ops
        from .kernels.attend import unsupported_reason
    except ImportError as err:
        return f"the Triton kernels are unavailable ({err}); the ops run their torch references"
    if not cuda_ops.registered():
        return "the Triton kernels are not registered for the sphkv ops; the ops run their torch references"
    q_dtype = model_dtype(model)
    kv_dtype = storage_dtype(state.kv_dtype, q_dtype)
    for kv_heads, head_dim in compressed_geometries(model, plan_layers(model, max_cache_len)):
        # what the stores will hold (head_pad.py decides it for them the same way)
        stored = choose_stored_head_dim(o, kv_heads, head_dim, model.device, q_dtype, kv_dtype, max_cache_len)
        why = unsupported_reason(q_dtype, o.tier_ladder, stored, o.seed, kv_dtype)
        if why is not None:
            return f"the kernels do not cover this model ({why}); the ops run their torch references"
    return None


def _decode_step_mode(kwargs: dict, model, cache: SphkvCache) -> tuple[bool, str]:
    """Settle how this generate() call compiles its decode step, and say how, for report():
    (CUDA graphs?, why). generate() compiles a static cache's decode step with mode
    'reduce-overhead' (CUDA graphs) by default; that stays unless graph_blocker names a cause.
    Then the default becomes mode 'default', and a compile config asking for CUDA graphs is
    refused, naming the cause and the fix."""
    from transformers.generation.configuration_utils import CompileConfig

    config = _generation_config(kwargs, model)
    asked = kwargs.get("compile_config", getattr(config, "compile_config", None))
    why = graph_blocker(model, cache.capacity)
    hf_advice.warn_if_kernels_do_not_cover(getattr(model, _STATE_ATTR), model.device, why)
    why = why or _drafts_block_graphs(kwargs, config)
    if why is not None and asked is None and model.device.type != "cpu":  # generate() auto-compiles off the CPU
        kwargs["compile_config"] = asked = CompileConfig(mode="default")
    elif why is not None and asked is not None and asked.backend != "sphkv" and _asks_for_graphs(asked):
        raise ValueError(
            f"sphkv: compile_config asks for CUDA graphs (mode {asked.mode!r} or triton.cudagraphs), which "
            f"cannot replay this cache's decode step: {why}. Fix: pass "
            "compile_config=CompileConfig(mode='default') or mode='max-autotune-no-cudagraphs'.")
    blocker = compile_rules.compile_blocker(model, cache, kwargs, config,
                                            compile_rules.compile_config(kwargs, config, model))
    if blocker is not None:
        return False, blocker
    if why is not None:
        return False, why
    if asked is not None and asked.backend == "sphkv":
        return False, "the sphkv backend makes no CUDA graphs"
    if asked is not None and not _asks_for_graphs(asked):
        return False, f"compile_config asks for mode {asked.mode!r}"
    if cache.options.policy == "rdr":
        return True, "static cache, every op on the Triton kernels, RDR re-budgets between steps"
    return True, "static cache, uniform policy, every op on the Triton kernels"


DRAFT_SETTINGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _drafts(kwargs: dict, config) -> list[str]:
    """The assisted-decoding settings this generate() call uses (drafts verified in chunks;
    use_mtp=False is a flag turned off)."""
    return [name for name in DRAFT_SETTINGS if compile_rules.setting(kwargs, config, name) not in (None, False)]


def _draft_model_tokens(assistant) -> int | None:
    """How many tokens a draft model drafts at first (its generation config, else transformers'
    default for it); None if that cannot be told."""
    config = getattr(assistant, "generation_config", None)
    n = getattr(config, "num_assistant_tokens", None)
    if n is None and hasattr(config, "_get_default_generation_params"):
        n = config._get_default_generation_params().get("num_assistant_tokens")
    return None if n is None else int(n)


def _drafts_block_graphs(kwargs: dict, config) -> str | None:
    """Assisted decoding verifies each draft in a chunk of several tokens; the cache update of a
    chunk decides on the host (the device kernels take one token per step), which a CUDA graph
    cannot replay. Such a call compiles its steps without graphs."""
    drafts = _drafts(kwargs, config)
    if drafts:
        return (f"{drafts[0]} (assisted decoding) verifies drafts in chunks of several tokens, whose cache update "
                "reads back to the host")
    return None


def _asks_for_graphs(config) -> bool:
    """Does this CompileConfig make CUDA graphs? Modes 'reduce-overhead' and 'max-autotune' do
    (Inductor's mode table), as does the option triton.cudagraphs."""
    return config.mode in ("reduce-overhead", "max-autotune") or bool((config.options or {}).get("triton.cudagraphs"))


def _copy_without_cache_implementation(config):
    import copy

    config = copy.deepcopy(config)
    config.cache_implementation = None
    return config


# transformers generates this many new tokens when neither max_new_tokens nor max_length is set
# (GenerationMixin._prepare_generated_length, transformers 5; 4.x had max_length=20 in the config,
# which _cached_positions reads as max_length)
HF_DEFAULT_NEW_TOKENS = 20


def _raise_if_longer_than_cache(args, kwargs, model, cache: SphkvCache) -> None:
    """A static cache holds max_cache_len positions (the attention mask and the position pools are
    sized by it): a longer generation would index past them, which on a GPU is a device-side
    assert in a generated kernel, far from the cause. Refused up front, even if an EOS might
    have stopped the generation in time."""
    if cache.capacity is None:
        return
    needed = _cached_positions(args, kwargs, model)
    if needed is not None and needed[0] > cache.capacity:
        positions, how = needed
        raise ValueError(f"this generate() call needs {positions} cache positions ({how}; the last token is "
                         f"never fed back) but the static sphkv cache was built with max_cache_len="
                         f"{cache.capacity}: build it with new_cache(model, max_cache_len={positions}) or more, "
                         f"or generate fewer tokens")


def _prompt_lookup_overrun(kwargs: dict, config) -> int:
    """Cache positions this generate() call needs beyond the max_length - 1 a static cache is
    sized for: prompt lookup (transformers 5.25) drafts up to prompt_lookup_num_tokens tokens
    while two positions are left, without capping the draft by that room, so its last verify
    chunk can reach k - 1 positions further (transformers' own StaticCache fails there too)."""
    k = compile_rules.setting(kwargs, config, "prompt_lookup_num_tokens")
    return max(0, int(k) - 1) if k else 0


def _prompt_length(args, kwargs) -> int | None:
    """Tokens in generate()'s prompt: its input_ids (by keyword or as the first argument), else
    its inputs_embeds (batch, tokens, hidden); None when neither is given."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None:
        return ids.shape[-1]
    embeds = kwargs.get("inputs_embeds")
    return None if embeds is None else embeds.shape[1]


def _cached_positions(args, kwargs, model) -> tuple[int, str] | None:
    """(positions the cache must hold, how that was worked out), as transformers sizes a static
    cache: max_length - 1. None when the prompt is not known up front."""
    config = _generation_config(kwargs, model)
    asked = _requested_length(args, kwargs, config)
    if asked is None:
        prompt = _prompt_length(args, kwargs)
        if prompt is None:
            return None
        total = prompt + HF_DEFAULT_NEW_TOKENS
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        asked = (min(total, limit) if limit else total,
                 f"prompt {prompt} + transformers' default of {HF_DEFAULT_NEW_TOKENS} new tokens")
    overrun = _prompt_lookup_overrun(kwargs, config)
    return asked[0] - 1 + overrun, f"{asked[1]} - 1" + (f" + {overrun} for prompt lookup's last draft" if overrun else "")


def _requested_length(args, kwargs, config) -> tuple[int, str] | None:
    """(prompt + new tokens, how) from this call's max_new_tokens or max_length; None when neither
    is set, or the prompt is not known up front. With inputs_embeds alone transformers counts
    max_length as prompt + new tokens too (and sizes a static cache the same way)."""
    prompt = _prompt_length(args, kwargs)
    if prompt is None:
        return None
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return prompt + int(new), f"prompt {prompt} + max_new_tokens {int(new)}"
    total = kwargs.get("max_length", getattr(config, "max_length", None))
    return None if total is None else (int(total), f"max_length {int(total)}")


def _generation_length(args, kwargs, config) -> int | None:
    """Prompt + new tokens of this generate call (None when it cannot be told up front)."""
    asked = _requested_length(args, kwargs, config)
    return None if asked is None else asked[0]
