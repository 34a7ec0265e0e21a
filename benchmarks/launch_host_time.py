"""Host time of the CUDA path's launch code, without a GPU: kernels.attend.attend and
decode_update.decode_update called on CPU tensors with every Triton launch replaced by a no-op
that records the kernel's name. What is left is the Python between the launches (argument
checks, split counts, tables, allocations), which an eager decode step (a plain generate() on a
dynamic cache) pays once per layer on top of Triton's own launch overhead.

    python benchmarks/launch_host_time.py [--shape smollm2] [--tokens 2048] [--calls 300] [--step] [--fake-driver]
                                          [--per-kernel]

On the CPU the decode kernels are the Triton ones, not the GPU's Gluon fragment kernel, so the
launch list differs from the GPU's by that kernel; the rest of the code is the same.

--fake-driver: instead of replacing the launches, give Triton a fake CUDA driver (sm_90 target,
device 0, stream 0): the kernels compile for sm_90 with Triton's bundled ptxas on the first call,
and every launch runs Triton's own launch path (argument binding and specialization, the cache
key, the launch metadata) up to its C launcher, which records the launch instead. Run it with the
Triton the GPU machine has (3.6) to see that version's per-launch host cost.

--per-kernel (with --fake-driver): also the median time of each kernel's JITFunction.run, i.e.
Triton's launch path per kernel.

--step: also a whole eager decode step (model forward over one token, what a plain generate()
runs per token) of a 30-layer Llama with SmolLM2's attention (9 query heads, 3 KV heads, head dim
64) and tiny MLP and vocabulary, so the model's own compute is small and the host's work shows, as
on a GPU: the CUDA path's implementations serve the CPU tensors (launches stubbed) on a dynamic
sphkv cache, against transformers' DynamicCache on the same model. The outputs are meaningless;
only the time counts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from triton.runtime import jit

from bench_decode import SHAPES, build_store
from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import TierSpec

LAUNCHED: list[str] = []


def _no_launch(self, *args, grid, warmup, **kwargs):
    LAUNCHED.append(self.fn.__name__)


def stub_launches(fake_driver: bool) -> None:
    """Every Triton launch recorded in LAUNCHED instead of run: at JITFunction.run, or (fake_driver)
    at the compiled kernel's C launcher, behind a fake CUDA driver."""
    if not fake_driver:
        jit.JITFunction.run = _no_launch
        return
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime import driver

    class FakeCudaDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def load_nothing(kernel):  # CompiledKernel._init_handles: no module to load, a launcher that records
        if kernel.module is None:
            kernel.module, kernel.function = object(), 0
            kernel._run = lambda *args: LAUNCHED.append(kernel.name)

    driver.set_active(FakeCudaDriver())
    compiler.CompiledKernel._init_handles = load_nothing


def per_call_us(fn, calls: int) -> float:
    """Median over 5 rounds of the mean µs per call of `calls` calls."""
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(rounds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--step", action="store_true", help="also time a whole eager decode step (see above)")
    ap.add_argument("--fake-driver", action="store_true", help="Triton's launch path up to its C launcher (see above)")
    ap.add_argument("--per-kernel", action="store_true", help="with --fake-driver: Triton's launch path per kernel")
    args = ap.parse_args(argv)
    stub_launches(args.fake_driver)  # before the kernels' modules build anything
    from sphkv_compile.kernels import attend as kernel_attend
    from sphkv_compile.kernels.decode_update import decode_update

    opts = SphkvOptions()
    Hq, Hkv, d = SHAPES[args.shape]
    B = args.batch
    gen = torch.Generator().manual_seed(0)
    specs = [TierSpec("exact"), TierSpec("uniform", float(opts.bits), "polar", float(opts.bits))]
    states, _, _ = build_store(B, Hkv, d, args.tokens - 1, specs, opts, opts.seed, torch.device("cpu"), gen)
    q = torch.randn(B, Hq, 1, d, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(B, Hkv, 1, d, dtype=torch.bfloat16, generator=gen)

    def attend():
        kernel_attend.attend(q, states, specs, seed=opts.seed, kv_dtype=torch.bfloat16, k_new=kv, v_new=kv)

    def update():
        decode_update(states, specs, kv, kv, None, None, seed=opts.seed, kv_dtype=torch.bfloat16, sink=opts.sink,
                      recent=opts.recent, target=1)

    how = "Triton's launch path up to its C launcher" if args.fake_driver else "launches replaced by no-ops"
    print(f"{args.shape} B={B} T={args.tokens}, {how} (host Python only):")
    for name, fn in (("attend", attend), ("decode_update", update)):
        fn()  # (with --fake-driver: compiles)
        LAUNCHED.clear()
        fn()
        kernels = list(LAUNCHED)
        print(f"  {name}: {per_call_us(fn, args.calls):.1f} us per call; launches {kernels}")
    if args.per_kernel and args.fake_driver:
        per_kernel_launch(lambda: (attend(), update()), args.calls)
    if args.step:
        eager_step(args.tokens)


def per_kernel_launch(fn, calls: int) -> None:
    """Median µs of JITFunction.run per kernel over `calls` calls of fn (Triton's launch path)."""
    real, times = jit.JITFunction.run, {}

    def timed(self, *args, **kwargs):
        t = time.perf_counter()
        out = real(self, *args, **kwargs)
        times.setdefault(self.fn.__name__, []).append(time.perf_counter() - t)
        return out

    jit.JITFunction.run = timed
    try:
        for _ in range(calls):
            fn()
    finally:
        jit.JITFunction.run = real
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts) * 1e6:.1f} us per launch in Triton's launch path")


def eager_step(prompt: int, steps: int = 20) -> None:
    """ms per eager decode step, dense DynamicCache against a dynamic sphkv cache (see --step)."""
    import transformers as tf

    import sphkv_compile.api as sphkv
    from sphkv_compile.kernels import cuda_ops
    try:
        from sphkv_compile import eager_ops
    except ImportError:  # a checkout from before session 36 (compared against): the ops always dispatch
        eager_ops = None

    config = tf.LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=prompt + 64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(3, 256, (1, prompt), generator=torch.Generator().manual_seed(0))
    key = sphkv.cache_keyword(model)

    def ms_per_step(make_cache) -> float:
        rounds = []
        with torch.no_grad():
            for _ in range(3):
                cache = make_cache()
                model(input_ids=ids, use_cache=True, **{key: cache})
                token = ids[:, -1:]
                t = time.perf_counter()
                for _ in range(steps):
                    model(input_ids=token, use_cache=True, **{key: cache})
                rounds.append((time.perf_counter() - t) / steps * 1e3)
        return statistics.median(rounds)

    dense = ms_per_step(lambda: tf.DynamicCache(config=config))
    sphkv.optimize(model, trial=False)
    for name in ("attend", "update_cache", "encode_append"):  # the CUDA path's code on CPU tensors
        fn = getattr(cuda_ops, f"{name}_cuda")
        if eager_ops is not None:
            eager_ops.register_kernel(name, "cpu", fn)
        else:
            torch.library.register_kernel(f"sphkv::{name}", "cpu", fn)
    ours = ms_per_step(lambda: sphkv.new_cache(model))
    print(f"eager decode step, 30 layers, {prompt}-token prompt: dense DynamicCache {dense:.2f} ms, "
          f"sphkv dynamic (CUDA path, launches not run) {ours:.2f} ms: {(ours - dense) / 30 * 1e3:.0f} us more per layer")


if __name__ == "__main__":
    main()
