#!/usr/bin/env bash
# One command for a fresh GPU machine: build sparsefl in place against the CUDA torch
# already installed there, run the GPU tests, benchmark the kernels and one round on the
# GPU, and write a report (JSON + markdown).  No network needed: nothing is installed.
#
#   scripts/gpu-check.sh [--quick|--full] [--dry-run] [OUT_DIR]   (default: gpu-report/)
#
# --quick (default): 5 timing rounds, the 10-client aggregation, the GPU tests under a
# 150 s limit -- sized to finish build + tests + report in about 6 minutes on one
# H100/H200 (measured on an H200: build ~50 s for one arch).  --full: 30 rounds, the
# 100-client cases, no test limit.  --dry-run: no GPU needed -- the same steps on the
# CPU with the installed extension (no build), the GPU tests skipping, and the report's
# code at toy sizes -- to check the script before lent minutes are spent on it.
# The report is saved after every section, so a run cut by the device's time limit still
# returns what it measured.  Exit status: 0 all passed; 1 tests or report failed; 2 no
# GPU; 3 the extension on this GPU host has no CUDA kernels (a CPU-only build).
#
# PYTHON (default python3) must have a CUDA torch and pytest; triton is used if present.
# The extension is built for this GPU only (TORCH_CUDA_ARCH_LIST from its compute
# capability) to keep the build short, and used from the source tree (PYTHONPATH).
# docs/gpu.md says what the numbers mean.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=quick DRY=0 OUT=gpu-report
for a in "$@"; do
  case "$a" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --dry-run) DRY=1 ;;
    -*) echo "gpu-check: unknown option $a" >&2; exit 2 ;;
    *) OUT=$a ;;
  esac
done
mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$(date +%s)
log() { echo "[gpu-check $(( $(date +%s) - start ))s] $*"; }

if [ "$DRY" = 1 ]; then
  log "dry run on the CPU: installed extension, GPU tests skip, report at toy sizes"
  export FLWR_TELEMETRY_ENABLED=0
  "$PY" -m sparsefl.cli info > "$OUT/info.txt" || exit 1
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_ops.py > "$OUT/tests.log" 2>&1
  tests_rc=$?
  tail -1 "$OUT/tests.log"
  "$PY" -m sparsefl.bench.gpu_report --out "$OUT" --dry-run > "$OUT/bench.log" 2>&1
  bench_rc=$?
  log "dry run done (tests rc=$tests_rc, report rc=$bench_rc): $OUT/gpu_report.md"
  exit $(( tests_rc != 0 || bench_rc != 0 ))
fi

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

cuda_kernels=$("$PY" -c "import sparsefl._native as n; print(int(n.has_cuda_kernels()))" 2>/dev/null)
[ "$cuda_kernels" = 1 ] || log "WARNING: the extension has no CUDA kernels (exit 3 at the end)"

log "GPU tests ($MODE)"
limit=$([ "$MODE" = quick ] && echo 150 || echo 0)
timeout "$limit" "$PY" -m pytest -v --tb=short -p no:cacheprovider tests/test_gpu_ops.py \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

log "benchmarks and one round on the GPU ($MODE)"
"$PY" -m sparsefl.bench.gpu_report --out "$OUT" $([ "$MODE" = full ] && echo --full) 2>&1 \
  | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
log "done: $OUT/gpu_report.md, $OUT/gpu_report.json, $OUT/tests.log (tests rc=$tests_rc," \
    "bench rc=$bench_rc)"
[ "$cuda_kernels" = 1 ] || exit 3
exit $(( tests_rc != 0 || (bench_rc != 0 && bench_rc != 3) ))
