#!/bin/bash
# One device call: install, GPU kernel tests, kernel benchmark, optionally (E2E=1) the
# end-to-end decode. Logs under $OUT. One call holds 10 minutes: split the steps over calls
# (SKIP_TESTS=1, TEST_K="expr with spaces" (pytest -k; TEST_ARGS is word-split), SKIP_BENCH=1, BENCH_ARGS=--quick, SWEEP=1, SWEEP_ENCODE=1, LOWERING=1, E2E=1, BREAKDOWN=1, RDR=1, REBUDGET=1,
# BEAMS=1, OPTIMIZE_TIME=1, DYNAMIC=1, EAGER_HOST=1, ASSISTED=1, BACKEND=1) rather than let a timeout cut them.
#
# Compile caches: each call starts on a bare machine, and the kernel compiles take minutes
# (the GPU test suite compiles ~20 kernel variants). SAVE_CACHE=1 returns Triton's and
# Inductor's caches as $OUT/compile-cache.tgz.part* (15 MiB each: the device tool returns
# files of at most 16 MiB); copy them to .devcache/ here and pass carry=[".devcache"] to the
# next call, which unpacks them first.
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .devcache/compile-cache.tgz.part* >/dev/null 2>&1; then
  cat .devcache/compile-cache.tgz.part* | tar xz -C / 2>/dev/null && echo "compile caches unpacked"
fi
python -m pip install -e . --no-deps --no-build-isolation -q > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
check() { (cd /tmp && python -c "import sphkv_compile.kernels, sys; print(sys.executable, sphkv_compile.kernels.__file__)") >> $OUT/pip.log 2>&1; }
check || { python -m pip install . --no-deps --no-build-isolation -q >> $OUT/pip.log 2>&1; check; } || { cat $OUT/pip.log; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv > $OUT/gpu.txt 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # -v and --durations: a run cut short by the timeout still says which tests passed and how long each took
  # a test over PER_TEST seconds prints every thread's stack (and fails, where pytest-timeout is installed);
  # 300: the head-dim-256 case compiles for ~200 s on a cold cache (session 9)
  per_test="-o faulthandler_timeout=${PER_TEST:-300}"
  python -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=${PER_TEST:-300}"
  SPHKV_REPORT_AT_ONCE=1 timeout ${TEST_TIMEOUT:-480} python -m pytest -v ${TEST_X--x} -p no:cacheprovider --durations=0 $per_test \
    tests/test_kernels_gpu.py tests/test_backend_gpu.py ${TEST_ARGS} ${TEST_K:+-k "$TEST_K"} 2>&1 | grep --line-buffered -v DEBUG | tee $OUT/gpu_tests_with_warnings.log | grep --line-buffered -v "Warning\|warnings.warn" | tee $OUT/gpu_tests.log | tail -${TEST_TAIL:-40}
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_decode.py --out $OUT ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log | tail -60
fi
if [ "${SWEEP:-0}" = 1 ]; then  # launch settings of the decode kernels (benchmarks/sweep_coded.py)
  (cd benchmarks && timeout ${SWEEP_TIMEOUT:-300} python sweep_coded.py --out $OUT 2>&1 | grep --line-buffered -v Warn | tee $OUT/sweep.log | tail -15)
fi
if [ "${SWEEP_ENCODE:-0}" = 1 ]; then  # encoder launch settings and rotation paths (benchmarks/sweep_encode.py)
  (cd benchmarks && timeout ${SWEEP_ENCODE_TIMEOUT:-200} python sweep_encode.py --out $OUT 2>&1 | grep --line-buffered -v Warn | tee $OUT/sweep_encode.log | tail -15)
fi
if [ "${LOWERING:-0}" = 1 ]; then  # the compiled op against the bare kernels (benchmarks/lowering_overhead.py)
  (cd benchmarks && timeout ${LOWERING_TIMEOUT:-200} python lowering_overhead.py --out $OUT 2>&1 | grep --line-buffered -v Warn | tee $OUT/lowering.log | tail -8)
fi
if [ "${E2E:-0}" = 1 ]; then  # end-to-end generate() at 32k (benchmarks/e2e_decode.py), about 5 minutes
  (cd benchmarks && timeout ${E2E_TIMEOUT:-330} python e2e_decode.py --steps 8 --warmup 3 --out $OUT ${E2E_ARGS} 2>&1 \
    | grep --line-buffered -v Warn | tee $OUT/e2e.log | tail -12)
fi
if [ "${BREAKDOWN:-0}" = 1 ]; then  # one decode call's device time, kernel by kernel (benchmarks/breakdown_decode.py)
  (cd benchmarks && timeout ${BREAKDOWN_TIMEOUT:-300} python breakdown_decode.py --out $OUT 2>&1 | grep --line-buffered -v Warn | tee $OUT/breakdown.log | tail -60)
fi
if [ "${RDR:-0}" = 1 ]; then  # RDR's decode step through generate() against dense (benchmarks/profile_hf_decode.py)
  (cd benchmarks && timeout ${RDR_TIMEOUT:-400} python profile_hf_decode.py --policy rdr --steps 32 --out $OUT 2>&1 \
    | grep --line-buffered -v Warn | tee $OUT/profile_rdr.log | tail -40)
fi
if [ "${DYNAMIC:-0}" = 1 ]; then  # plain generate(): dynamic caches, uncompiled, both policies; host reads per eager step
  (cd benchmarks && for policy in uniform rdr; do
     timeout ${DYNAMIC_TIMEOUT:-200} python profile_hf_decode.py --dynamic --policy $policy --steps 32 --timing-only 2>&1 \
       | grep --line-buffered -v Warn | tee $OUT/dynamic_$policy.log | tail -3; done)
  for policy in uniform rdr; do python benchmarks/eager_step_host_reads.py --device cuda --policy $policy 2>&1 \
    | grep --line-buffered -v Warn | tee $OUT/host_reads_$policy.log; done
fi
if [ "${EAGER_HOST:-0}" = 1 ]; then  # an eager decode step's host time by Python function, both policies (benchmarks/profile_eager_host.py)
  (cd benchmarks && for policy in uniform rdr; do
     timeout ${EAGER_HOST_TIMEOUT:-170} python profile_eager_host.py --policy $policy --steps 16 --rows 45 2>&1 \
       | grep --line-buffered -v Warn | tee $OUT/eager_host_$policy.log | head -4; done)
fi
if [ "${REBUDGET:-0}" = 1 ]; then  # RDR's allocation per layer on the CPU and the GPU (benchmarks/rebudget_host_time.py)
  (cd benchmarks && timeout ${REBUDGET_TIMEOUT:-200} python rebudget_host_time.py --tile 1 4 16 43 2>&1 \
    | grep --line-buffered -v Warn | tee $OUT/rebudget.log | tail -8)
fi
if [ "${BEAMS:-0}" = 1 ]; then  # beam search through generate() against dense, and the reorder's share of a step
  (cd benchmarks && timeout ${BEAMS_TIMEOUT:-200} python profile_hf_decode.py --beams 4 --steps 16 --timing-only 2>&1 \
    | grep --line-buffered -v Warn | tee $OUT/beams.log | tail -3
   timeout ${BEAMS_TIMEOUT:-200} python reorder_share.py --device cuda --prompt 2048 --beams 4 --static 2>&1 | grep --line-buffered -v Warn \
    | tee $OUT/reorder_share.log | tail -1)
fi
if [ "${OPTIMIZE_TIME:-0}" = 1 ]; then  # optimize()'s trial against the first generate(), cold caches (benchmarks/optimize_time.py)
  (cd benchmarks && timeout ${OPTIMIZE_TIME_TIMEOUT:-300} python optimize_time.py --out $OUT ${OPTIMIZE_TIME_ARGS} 2>&1 \
    | grep --line-buffered -v Warn | tee $OUT/optimize_time.log | tail -8)
fi
if [ "${ASSISTED:-0}" = 1 ]; then  # prompt lookup on the embedded SmolLM2, dense vs sphkv (benchmarks/assisted_decode.py)
  timeout ${ASSISTED_TIMEOUT:-300} python benchmarks/assisted_decode.py --static ${ASSISTED_ARGS} 2>&1 \
    | grep --line-buffered -v "Warn\|Convert\|Loading" | tee $OUT/assisted_decode.log | tail -14
fi
if [ "${BACKEND:-0}" = 1 ]; then  # torch.compile(module, backend="sphkv") on a gpt-fast-style model vs dense with CUDA graphs
  timeout ${BACKEND_TIMEOUT:-420} python benchmarks/backend_decode.py --out $OUT ${BACKEND_ARGS} 2>&1 \
    | grep --line-buffered -v "Warn\|warnings.warn" | tee $OUT/backend_decode.log | tail -4
fi
if [ "${SAVE_CACHE:-0}" = 1 ]; then
  tar cz -C / root/.triton/cache tmp/torchinductor_root 2>/dev/null | split -b 15M - $OUT/compile-cache.tgz.part
  ls -la $OUT/compile-cache.tgz.part*
fi
