#!/usr/bin/env bash
# The whole GPU check of jax_roipool in one command that ends within a time
# budget, for a machine with an NVIDIA GPU whose python3 has jax with CUDA,
# CUDA torch + torchvision, pybind11, scikit-build-core, nvcc and
# compute-sanitizer (no network needed). Steps, in their default order; each
# stops at its own cap or at the end of the budget, whichever comes first:
#
#   build      pip install --no-build-isolation --no-index -e . with the CUDA
#              kernels required (JAX_ROIPOOL_CUDA=ON), then imports them
#   demo       python3 -m jax_roipool: the seed example, on the GPU
#   bench      benchmarks/bench_gpu.py, its table and JSON written beside the logs
#   gpu        tests/test_gpu.py: GPU vs CPU kernels bit for bit, vs torchvision
#   sanitizer  compute-sanitizer memcheck over part of test_gpu.py
#   suite      the rest of the test suite (test_gpu.py is step gpu's)
#   wide       not a default step: the CUDA build with 4 channels per thread
#              (CMake option JAX_ROIPOOL_CUDA_CHANNELS_PER_THREAD), test_gpu.py's
#              random cases and gradients, bench_gpu.py into $OUT/wide; then,
#              as a step of its own (rebuild), the default build (1) again
#
# Steps joined by "+" run side by side: the default runs the three checks
# that time nothing (gpu, sanitizer, suite) together after the benchmark,
# which has the machine to itself, so that all of them fit in the budget.
#
# Usage: benchmarks/gpu_proof.sh [--budget SECONDS] [STEP[+STEP...] ...]
#   (default: 540 s, which leaves a 600 s device command time to return its
#   files; steps: build demo bench gpu+sanitizer+suite)
# Each step's log goes to $OUT (default ./gpu-proof) and the end of each is
# printed, then a summary. The exit status is 1 if any step failed, timed
# out or was skipped for lack of time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-proof}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Several processes (torch and jax, xdist workers) share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# test_gpu.py fails instead of skipping when jax cannot use the GPU.
export JAX_ROIPOOL_REQUIRE_GPU=1

budget=540
if [ "${1:-}" = "--budget" ]; then
  if ! [[ "${2:-}" =~ ^[0-9]+$ ]]; then echo "--budget takes a number of seconds"; exit 2; fi
  budget=$2
  shift 2
fi
deadline=$((SECONDS + budget))
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then steps=(build demo bench gpu+sanitizer+suite); fi
for s in "${steps[@]}"; do
  for name in ${s//+/ }; do
    case $name in
      build | demo | gpu | bench | sanitizer | suite | wide) ;;
      *) echo "unknown step: $name (build, demo, gpu, bench, sanitizer, suite, wide)"; exit 2 ;;
    esac
  done
done

if ! command -v nvcc >/dev/null; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then PATH="$dir:$PATH"; break; fi
  done
fi
export PATH
# compute-sanitizer: on PATH, else the default toolkit's, else the newest.
sanitizer=$(command -v compute-sanitizer ||
  ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null ||
  ls /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)

build_with_channels_per_thread() {
  python3 -m pip install --no-build-isolation --no-index -e . \
    --config-settings=cmake.define.JAX_ROIPOOL_CUDA=ON \
    --config-settings=cmake.define.JAX_ROIPOOL_CUDA_CHANNELS_PER_THREAD="$1" &&
    python3 -c "import jax, jax_roipool; from jax_roipool import _native; \
print('jax', jax.__version__, jax.devices(), 'channels per thread', \
_native.cuda.channels_per_thread()); assert jax.devices('gpu')"
}

wide_build_check() {
  build_with_channels_per_thread 4 &&
    python3 -m pytest -q -x tests/test_gpu.py -k "random_cases_match_cpu or gradients_match_cpu" &&
    python3 benchmarks/bench_gpu.py --skip-reference --results-dir "$OUT_DIR/wide"
}

xdist() {  # pytest-xdist arguments for $1 workers, where it is installed
  if python3 -c "import xdist" 2>/dev/null; then echo "-n $1"; fi
}

export OUT_DIR=$out
export -f build_with_channels_per_thread wide_build_check

# Steps may run side by side, in subshells: each reports through files here.
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
run_step() {  # run_step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2 start=$SECONDS rc line
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, $left s of the budget left"
    echo "$name: skipped (budget)" >>"$results/summary"
    : >"$results/failed"
    return
  fi
  local limit=$((cap < left ? cap : left))
  echo "=== $name (at most $limit s): $*"
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$out/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  case $rc in
    0) line="$name: ok, $took s" ;;
    124 | 137) line="$name: TIMED OUT after $took s" ;;
    *) line="$name: FAILED (exit $rc) after $took s" ;;
  esac
  [ "$rc" -eq 0 ] || : >"$results/failed"
  if [ "$name" = sanitizer ] && grep -q "Device not supported" "$out/$name.log"; then
    line+=$'\n'"  $name: compute-sanitizer does not support this machine's GPU setup"
  fi
  echo "$line" >>"$results/summary"
  # One write, so that the reports of steps run side by side do not interleave.
  printf '%s\n' "=== $name: exit $rc after $took s" "$(tail -n 12 "$out/$name.log")"
}

run_named_step() {
  case $1 in
    build) run_step build 300 build_with_channels_per_thread 1 ;;
    demo) run_step demo 60 python3 -m jax_roipool ;;
    bench) run_step bench 240 python3 benchmarks/bench_gpu.py --results-dir "$out" ;;
    # shellcheck disable=SC2046  # xdist's arguments are split on purpose
    gpu) run_step gpu 300 python3 -m pytest -q -rs $(xdist 4) tests/test_gpu.py ;;
    # One cudaMalloc per buffer, so that memcheck sees the bounds of each.
    # Failed CUDA API calls are not counted: XLA makes some on purpose.
    sanitizer) run_step sanitizer 240 env XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      "${sanitizer:-compute-sanitizer}" --tool memcheck --report-api-errors no --launch-timeout 0 \
      --error-exitcode 1 \
      python3 -m pytest -q -x tests/test_gpu.py \
      -k "random_cases_match_cpu and float32 or gradients_match_cpu and fast_rcnn or per_image or batched_jvps or roi_order and float32" ;;
    # shellcheck disable=SC2046
    suite) run_step suite 300 python3 -m pytest -q -rs $(xdist 8) --ignore=tests/test_gpu.py ;;
    # The default build again, whatever became of the wide one.
    wide) run_step wide 360 wide_build_check
      run_step rebuild 300 build_with_channels_per_thread 1 ;;
  esac
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "nvcc: $(command -v nvcc || echo missing); compute-sanitizer:" \
  "${sanitizer:-missing}; budget $budget s"
for s in "${steps[@]}"; do
  for name in ${s//+/ }; do run_named_step "$name" & done
  wait
done
echo "=== summary (logs in $out)"
cat "$results/summary"
[ ! -e "$results/failed" ]
