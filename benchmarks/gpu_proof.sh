#!/usr/bin/env bash
# The whole GPU check of jax_roipool, for a machine with an NVIDIA GPU whose
# python3 has jax with CUDA, CUDA torch + torchvision, pybind11,
# scikit-build-core, nvcc and compute-sanitizer (no network needed):
#
#   build      pip install --no-build-isolation -e . (the CUDA kernels included,
#              one thread per output element)
#   demo       python3 -m jax_roipool: the seed example, on the GPU by default
#   gpu        tests/test_gpu.py: GPU vs CPU kernels bit for bit, vs torchvision
#   bench      benchmarks/bench_gpu.py, its table and JSON written beside the logs
#   sanitizer  compute-sanitizer memcheck over a GPU test run
#   suite      the whole test suite (pytest-xdist when installed)
#   wide       the CUDA build with 4 channels per thread (CMake option
#              JAX_ROIPOOL_CUDA_CHANNELS_PER_THREAD): test_gpu.py's random
#              cases and gradients, then bench_gpu.py (into $OUT/wide); ends
#              by rebuilding the default (1)
#
# Usage: benchmarks/gpu_proof.sh [STEP ...]   (default: build demo gpu bench
# sanitizer suite; where one command may only run for minutes, split the
# steps across commands, e.g. "build demo gpu bench", then "wide sanitizer
# suite")
# Each step's log goes to $OUT (default ./gpu-proof); the end of each is
# printed. The exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-proof}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Several processes (torch and jax, xdist workers) share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0

run_step() {
  local name=$1 start=$SECONDS rc
  shift
  echo "=== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  tail -n 12 "$out/$name.log"
  if [ "$rc" -ne 0 ]; then status=1; fi
}

build_with_channels_per_thread() {
  python3 -m pip install --no-build-isolation -e . \
    --config-settings=cmake.define.JAX_ROIPOOL_CUDA_CHANNELS_PER_THREAD="$1"
}

wide_build_check() {
  build_with_channels_per_thread 4 &&
    python3 -m pytest -q -x tests/test_gpu.py -k "random_cases_match_cpu or gradients_match_cpu" &&
    python3 benchmarks/bench_gpu.py --skip-reference --results-dir "$out/wide"
  local rc=$?
  build_with_channels_per_thread 1 || rc=1
  return $rc
}

xdist_args() {
  if python3 -c "import xdist" 2>/dev/null; then echo "-n 8"; fi
}

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then steps=(build demo gpu bench sanitizer suite); fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for s in "${steps[@]}"; do
  case $s in
    build) run_step build build_with_channels_per_thread 1 ;;
    demo) run_step demo python3 -m jax_roipool ;;
    gpu) run_step gpu python3 -m pytest -q -rs tests/test_gpu.py ;;
    # One cudaMalloc per buffer, so that memcheck sees the bounds of each.
    sanitizer) run_step sanitizer env XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest -q -x tests/test_gpu.py \
      -k "random_cases_match_cpu and float32 or gradients_match_cpu or per_image" ;;
    bench) run_step bench python3 benchmarks/bench_gpu.py --results-dir "$out" ;;
    # shellcheck disable=SC2046
    suite) run_step suite python3 -m pytest -q -rs $(xdist_args) ;;
    wide) run_step wide wide_build_check ;;
    *) echo "unknown step: $s (build, demo, gpu, bench, sanitizer, suite, wide)"; exit 2 ;;
  esac
done
exit $status
