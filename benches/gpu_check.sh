#!/usr/bin/env bash
# Everything a lent GPU should do, in ONE call of at most 8 minutes: every stage under its own
# timeout, everything written to $OUT as it goes (the device tool returns at most 8 files, two
# folders deep: gpu_check.log, stages.txt, results.tar.gz, and the bench's JSON/markdown/PNG).
#
#   run: bash benches/gpu_check.sh                      (OUT is set by the device tool)
#   DRY=1 OUT=/tmp/x bash benches/gpu_check.sh          (the CPU rehearsal: tiny preset, few steps;
#                                                        tests/bench/test_gpu_check.py runs it)
# Stages: env (driver, torch.version.cuda, nvcc, microdit info) -> build the extension with the
# CUDA toolkit matching torch's (a static runtime newer than the driver fails at the first
# launch) -> gpu-marked tests -> kernel benchmarks -> `microdit bench` of the four phases of
# MicroDiT_XL_2 (reference vs fast, eager vs compiled) -> results JSON and cost report.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
DRY=${DRY:-0}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$OUT/stages.txt"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS="$OUT/results"
mkdir -p "$RESULTS"

stage() {  # stage NAME SECONDS command...: runs under its own timeout, logs, records rc
  local name=$1 limit=$2; shift 2
  echo "=== [$(date -u +%H:%M:%S)] $name (timeout ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== [$(date -u +%H:%M:%S)] $name rc=$rc" | tee -a "$LOG"
  echo "$name $rc" >>"$OUT/stages.txt"
  return 0
}

# The package layout of a plain checkout: microdit.kernels and microdit.configs come from
# kernels/ and configs/ (setup.py's package_dir); an in-place run needs them linked.
[ -e microdit/kernels ] || ln -s ../kernels microdit/kernels
[ -e microdit/configs ] || ln -s ../configs microdit/configs

env_info() {
  (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi: none")
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  (nvcc --version | tail -2 || echo "nvcc: none on PATH")
  "$PY" -m microdit.cli info
}

# nvcc whose CUDA major.minor is torch's: PATH first, then /usr/local/cuda-X.Y.
find_nvcc() {
  local want
  want=$("$PY" -c "import torch; print(torch.version.cuda or '')")
  [ -n "$want" ] || return 1
  for c in "$(command -v nvcc)" "/usr/local/cuda-$want/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    [ -x "$c" ] || continue
    if "$c" --version | grep -q "release $want"; then echo "$c"; return 0; fi
  done
  return 1
}

build() {
  local nvcc
  if [ "$DRY" = 1 ]; then  # the CPU rehearsal: no nvcc; rebuild only an extension that is missing or stale
    echo "nvcc matching torch: $(find_nvcc || echo none)"
    if "$PY" -c "import sys; from microdit import availability as a; sys.exit(0 if a.extension() else 1)"; then
      echo "extension present and current: not rebuilt in the rehearsal"
    else
      MICRODIT_CUDA=0 "$PY" setup.py build_ext --inplace
    fi
    return
  fi
  if ! nvcc=$(find_nvcc); then
    echo "no nvcc matching torch.version.cuda; building CPU-only (the CUDA backends will be unavailable)"
    MICRODIT_CUDA=0 "$PY" setup.py build_ext --inplace
    return
  fi
  echo "nvcc: $nvcc"
  PATH="$(dirname "$nvcc"):$PATH" CUDACXX="$nvcc" MICRODIT_CUDA=1 MICRODIT_CUDA_ARCHS=90 \
    "$PY" setup.py build_ext --inplace
}

if [ "$DRY" = 1 ]; then  # small and slow machine: generous timeouts, tiny shapes
  PRESET=MicroDiT_Test_2; DEV=cpu; STEPS="--steps 1 --warmup 0 --micro-batch 1 --latent-size 8"
  MODES=eager; COMPILED=""; TESTS="tests/bench/test_cost.py"; FP8_BACKENDS="--backends fast"
  KBENCH="benches/bench_train_step.py -k eager"; export MICRODIT_BENCH_PRESET=$PRESET
  T_ENV=120 T_BUILD=300 T_INFO=120 T_TESTS=120 T_KB=180 T_BENCH=400 T_FP8=300 T_REPORT=120
else
  PRESET=MicroDiT_XL_2; DEV=cuda; STEPS="--steps 10 --warmup 3"
  MODES=eager,compiled; COMPILED="--compiled-phases 1"; TESTS="tests -m gpu --continue-on-collection-errors"
  KBENCH="benches -k cuda --ignore=benches/bench_train_step.py"; FP8_BACKENDS=""
  # 20 + 120 + 20 + 40 + 40 + 170 + 40 + 30 = 480 s at most: the 8 minutes of one call.
  T_ENV=20 T_BUILD=120 T_INFO=20 T_TESTS=40 T_KB=40 T_BENCH=170 T_FP8=40 T_REPORT=30
fi
# `timeout` runs programs, not shell functions: the functions run in a child bash.
export -f env_info find_nvcc build
export PY DRY

stage env "$T_ENV" bash -c env_info
stage build "$T_BUILD" bash -c build
stage microdit_info_after_build "$T_INFO" "$PY" -m microdit.cli info
# shellcheck disable=SC2086
stage gpu_tests "$T_TESTS" "$PY" -m pytest -q -x -p no:cacheprovider $TESTS
# shellcheck disable=SC2086
stage kernel_benches "$T_KB" "$PY" -m pytest -q -p no:cacheprovider $KBENCH --benchmark-columns=min,median,rounds
# The headline run: four phases, reference vs fast, eager (all phases first) then compiled; the
# files are rewritten after each phase, so a timeout keeps what was measured.
# shellcheck disable=SC2086
stage bench "$T_BENCH" "$PY" -m microdit.cli bench --preset "$PRESET" --device "$DEV" --phase 1 2 3 4 \
  --modes "$MODES" $COMPILED $STEPS --out "$RESULTS"
# FP8 beside bf16, phase 1, eager (its own results file, in the tarball).
# shellcheck disable=SC2086
stage bench_fp8 "$T_FP8" "$PY" -m microdit.cli bench --preset "$PRESET" --device "$DEV" --phase 1 \
  --modes eager --precision fp8 $FP8_BACKENDS $STEPS --out "$RESULTS/fp8"
# The report again from the file (also proves `bench report` reads what `bench` wrote).
stage report "$T_REPORT" bash -c "'$PY' -m microdit.cli bench report \"\$(ls $RESULTS/*.json | grep -v -- -cost.json | head -1)\" --out '$RESULTS/report'"

mkdir -p "$RESULTS/kernels"
cp benches/results/*-cuda.json "$RESULTS/kernels/" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$OUT" results gpu_check.log stages.txt
cp "$RESULTS"/*.json "$RESULTS"/*.md "$RESULTS"/*.png "$OUT/" 2>/dev/null
echo "=== done; stages:" | tee -a "$LOG"
cat "$OUT/stages.txt"
