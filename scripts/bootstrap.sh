#!/usr/bin/env bash
# Create ./.venv (if missing) and install sparsefl into it, building the native kernels.
#
#   scripts/bootstrap.sh           what the main job needs (`sparsefl run`): no test tools,
#                                  no Flower/Ray (~500 MB) to wait for
#   scripts/bootstrap.sh --test    also the dev extra and Flower's (CI runs Flower's tests)
#
# Idempotent: a second run reuses the venv; when sparsefl is already installed from this
# checkout it does not reinstall (pip would rebuild every kernel, ~4 min on 2 cores): it
# rebuilds the kernels only if a file under csrc/ (or setup.py) is newer than the built
# extension (setup.py build_ext --inplace), then adds the extras asked for.
#   torch==2.13.0 first: on the reference machines it is a CPU wheel already on disk; a bare
#   `torch` requirement would pull a multi-GB CUDA build.  Set SPARSEFL_TORCH to change it
#   (e.g. SPARSEFL_TORCH="torch" on a GPU machine, to keep the CUDA build you have).
# --no-build-isolation: the extension must be compiled against the torch that will run it.
# SPARSEFL_EXTRAS overrides the extras (default: none; with --test "dev,flower").
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS_DEFAULT=""
for a in "$@"; do
  case "$a" in
    --test) EXTRAS_DEFAULT="dev,flower" ;;
    *) echo "bootstrap: unknown option $a (use --test for the test set-up)" >&2; exit 2 ;;
  esac
done
EXTRAS=${SPARSEFL_EXTRAS-$EXTRAS_DEFAULT}
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
here=$(pwd -P)
# where pip installed sparsefl from (run outside the checkout: `import sparsefl` there
# would find the source tree whether or not it is installed)
vpy=$(cd "$VENV" && pwd -P)/bin/python
installed=$(cd / && "$vpy" -c "import json, importlib.metadata as m
print(json.loads(m.distribution('sparsefl').read_text('direct_url.json'))['url'])" \
  2>/dev/null || true)
[ "$installed" = "file://$here" ] && installed=$here
so=$(ls sparsefl/_C*.so 2>/dev/null | head -1 || true)
if [ "$installed" = "$here" ] && [ -n "$so" ] && \
    [ -z "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ]; then
  echo "[bootstrap] sparsefl already installed from here, kernels up to date"
elif [ "$installed" = "$here" ] && [ -n "$so" ]; then
  echo "[bootstrap] sparsefl already installed from here: rebuilding the kernels"
  "$VENV/bin/python" setup.py -q build_ext --inplace
else
  echo "[bootstrap] building and installing sparsefl (C++ kernels take ~4 min on 2 cores)"
  pip install -q --no-build-isolation -e .
fi
if [ -n "$EXTRAS" ]; then
  # the extras' requirements, read from pyproject.toml (no reinstall of the package)
  reqs=$("$VENV/bin/python" - "$EXTRAS" <<'EOF'
import sys, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for name in sys.argv[1].split(","):
    if name not in extras:
        sys.exit(f"bootstrap: no extra {name!r} in pyproject.toml ({', '.join(extras)})")
    print("\n".join(extras[name]))
EOF
)
  echo "[bootstrap] installing the extras: $EXTRAS"
  mapfile -t req_list <<< "$reqs"
  pip install -q "${req_list[@]}"
fi
"$VENV/bin/sparsefl" info
