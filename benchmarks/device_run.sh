#!/bin/bash
# One device call: install, GPU kernel tests, benchmark. Logs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python -m pip install -e . --no-deps --no-build-isolation -q > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
check() { (cd /tmp && python -c "import sphkv_compile.kernels, sys; print(sys.executable, sphkv_compile.kernels.__file__)") >> $OUT/pip.log 2>&1; }
check || { python -m pip install . --no-deps --no-build-isolation -q >> $OUT/pip.log 2>&1; check; } || { cat $OUT/pip.log; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv > $OUT/gpu.txt 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py ${TEST_ARGS} 2>&1 | tee $OUT/gpu_tests.log | tail -25
fi
timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_decode.py --out $OUT ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log | tail -60
