#!/usr/bin/env bash
# One command for a fresh GPU machine: build sparsefl against the CUDA torch already
# installed there, run the GPU tests, benchmark the kernels and one round on the GPU, and
# write a report (JSON + markdown).  Target: under 8 minutes on an H100/H200-class machine.
#
#   scripts/gpu-check.sh [OUT_DIR]          (default: gpu-report/)
#
# The venv sees the system's packages (--system-site-packages), so the machine's CUDA
# torch and triton are used as they are; SPARSEFL_TORCH=... installs another torch instead.
# The extension is built for this GPU only (TORCH_CUDA_ARCH_LIST from its compute
# capability) to keep the build short.  docs/gpu.md says what the numbers mean.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-report}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VENV=${SPARSEFL_VENV:-.venv-gpu}
start=$(date +%s)
log() { echo "[gpu-check $(( $(date +%s) - start ))s] $*"; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: the system python's torch sees no CUDA device (or is not installed);" \
       "install a CUDA torch first, or set PYTHON to an interpreter that has one" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade setuptools wheel ninja
[ -n "${SPARSEFL_TORCH:-}" ] && pip install -q "$SPARSEFL_TORCH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$VENV/bin/python" -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building for sm $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs"
if ! pip install -q --no-build-isolation -e ".[dev]" > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "gpu-check: build failed (full log: $OUT/build.log)" >&2
  exit 1
fi
"$VENV/bin/sparsefl" info | tee "$OUT/info.txt"

log "GPU tests"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gpu_ops.py \
  tests/test_sam_ops.py tests/test_topk_ops.py tests/test_aggregate_ops.py \
  tests/test_aggregate_tiled.py tests/test_triton_round.py \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

log "benchmarks and one round on the GPU"
"$VENV/bin/python" -m sparsefl.bench.gpu_report --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?
tail -3 "$OUT/bench.log"
log "done: $OUT/gpu_report.md, $OUT/gpu_report.json, $OUT/tests.log (tests rc=$tests_rc," \
    "bench rc=$bench_rc)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
