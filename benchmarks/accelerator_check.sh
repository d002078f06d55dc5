#!/usr/bin/env bash
# The kernels' accelerator check, in one go: the compiled-kernel tests, then the kernel
# benchmark (table + JSON). Needs only jax (with its GPU or TPU plugin), flax, numpy and pytest:
# pallas_kernels/ imports nothing of openvlm_jax, and the benchmark only its attention module.
#
#   OUT=/tmp/kernels bash benchmarks/accelerator_check.sh      # logs and JSON go to $OUT
#
# Budget: the tests take about a minute (compiles), the benchmark under 5 minutes.
set -o pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
"$python" -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee "$out/devices.log"
"$python" -m pytest -p no:cacheprovider -o addopts='' -q -rs \
  tests/pallas_kernels/test_on_accelerator.py 2>&1 | tee "$out/accelerator_tests.log"
tests_status=$?
backend=$("$python" -c 'import jax; print(jax.default_backend())')
timeout 420 "$python" benchmarks/kernels.py --out="$out/kernels_$backend.json" 2>&1 \
  | tee "$out/kernels_$backend.log"
bench_status=$?
echo "tests exit $tests_status, benchmark exit $bench_status"
exit $(( tests_status || bench_status ))
