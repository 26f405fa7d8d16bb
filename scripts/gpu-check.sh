#!/usr/bin/env bash
# One command for a fresh GPU machine: build sparsefl in place against the CUDA torch
# already installed there, run the GPU tests, benchmark the kernels and one round on the
# GPU, and write a report (JSON + markdown).  No network needed: nothing is installed.
#
#   scripts/gpu-check.sh [OUT_DIR]          (default: gpu-report/)
#
# PYTHON (default python3) must have a CUDA torch and pytest; triton is used if present.
# The extension is built for this GPU only (TORCH_CUDA_ARCH_LIST from its compute
# capability) to keep the build short, and used from the source tree (PYTHONPATH).
# docs/gpu.md says what the numbers mean.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-report}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$(date +%s)
log() { echo "[gpu-check $(( $(date +%s) - start ))s] $*"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: $PY's torch sees no CUDA device (or is not installed); install a CUDA" \
       "torch first, or set PYTHON to an interpreter that has one" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FLWR_TELEMETRY_ENABLED=0
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building for sm $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs"
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "gpu-check: build failed (full log: $OUT/build.log)" >&2
  exit 1
fi
# A venv or conda env may load an older libstdc++ than the one the extension was compiled
# against; a C++ exception with a formatted message then crashes the process instead of
# raising (seen on a lent H200: every bad-input test segfaulted).  Load the compiler's own.
cxxlib=$(${CXX:-g++} -print-file-name=libstdc++.so.6 2>/dev/null)
if [ -n "$cxxlib" ] && [ -f "$cxxlib" ]; then
  export LD_PRELOAD="$cxxlib${LD_PRELOAD:+:$LD_PRELOAD}"
  log "LD_PRELOAD=$LD_PRELOAD"
fi
"$PY" -m sparsefl.cli info | tee "$OUT/info.txt"

log "GPU tests"
"$PY" -m pytest -v --tb=short -p no:cacheprovider tests/test_gpu_ops.py \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

log "benchmarks and one round on the GPU"
"$PY" -m sparsefl.bench.gpu_report --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
log "done: $OUT/gpu_report.md, $OUT/gpu_report.json, $OUT/tests.log (tests rc=$tests_rc," \
    "bench rc=$bench_rc)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
