#!/usr/bin/env bash
# Create ./.venv (if missing) and install sparsefl into it, building the native kernels.
# Idempotent: a second run reuses the venv and ninja's object cache.
#
#   torch==2.13.0 first: on the reference machines it is a CPU wheel already on disk; a bare
#   `torch` requirement would pull a multi-GB CUDA build.  Set SPARSEFL_TORCH to change it
#   (e.g. SPARSEFL_TORCH="torch" on a GPU machine, to keep the CUDA build you have).
# --no-build-isolation: the extension must be compiled against the torch that will run it.
# SPARSEFL_EXTRAS (default "dev,flower"): the optional extras to install; Flower's tests
#   run in CI, so the default includes it (~1 min, ~500 MB with Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPARSEFL_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel ninja
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing ${SPARSEFL_TORCH:-torch==2.13.0}"
  pip install -q "${SPARSEFL_TORCH:-torch==2.13.0}"
fi
echo "[bootstrap] building and installing sparsefl (C++ kernels take ~1 min on 2 cores)"
pip install -q --no-build-isolation -e ".[${SPARSEFL_EXTRAS:-dev,flower}]"
"$VENV/bin/sparsefl" info
