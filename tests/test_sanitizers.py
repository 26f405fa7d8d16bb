"""The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer (issue #8, item 3).

Builds sparsefl._C again with -fsanitize=address,undefined into a temporary copy of the
package, then runs the kernel tests that exercise the C++ backend (shapes, dtypes, edge
cases, bad input) in a subprocess with the sanitizer runtimes preloaded.  Any report
aborts that process (halt_on_error), which fails this test.  Slow (~4 min on 2 cores):
CI runs it as its own step after the README's test command (`.ci/run`, which sets
SPARSEFL_SANITIZERS=1), so the README's suite stays within a newcomer's wait (issue #27).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _runtime(name: str) -> str | None:
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SPARSEFL_SANITIZERS") != "1",
                    reason="the sanitizer build is CI's own step: SPARSEFL_SANITIZERS=1 "
                    "(.ci/run sets it)")
def test_cpu_kernels_pass_their_tests_under_asan_and_ubsan(tmp_path):
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if not (asan and ubsan):
        pytest.skip("gcc's libasan/libubsan not found")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", "venv", "build", "results", "runs", ".git", "*.so", "__pycache__",
        ".hypothesis", ".pytest_cache"))
    env = {**os.environ,
           # -O1 (after setup.py's -O3, so it wins): the usual level for ASan, and the
           # sanitized build of the kernels compiles several times faster than at -O3
           "SPARSEFL_CXXFLAGS": "-O1 -fsanitize=address,undefined -fno-omit-frame-pointer "
                                "-fno-sanitize-recover=undefined",
           "SPARSEFL_LDFLAGS": "-fsanitize=address,undefined"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    pkg = src / "sparsefl"
    shutil.copytree(src / "kernels", pkg / "triton_kernels", dirs_exist_ok=True)
    run_env = {**os.environ, "PYTHONPATH": str(src), "LD_PRELOAD": f"{asan}:{ubsan}",
               "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
               "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    probe = (f"import sparsefl, sparsefl._native as n; "
             f"assert sparsefl.__file__.startswith({str(src)!r}); "
             f"assert n.has_cpu_kernels(), n.LOAD_ERROR")
    check = subprocess.run([sys.executable, "-c", probe],
                           cwd=src, env=run_env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                            "no:cacheprovider", "tests/test_topk_ops.py", "tests/test_sam_ops.py",
                            "tests/test_aggregate_ops.py", "tests/test_aggregate_tiled.py",
                            "tests/test_fused_sgd.py", "tests/test_sparse_conv.py",
                            "tests/test_sparse_compute.py", "tests/test_batch_norm_act.py",
                            "-k",
                            "cpp or native or bad or nan or empty or avx2 or isas or kth or "
                            "threshold_prune or first_batch_layer or layer_sparse_equals_dense "
                            "or non_contiguous or large_channel or layer_autograd or resnet_step "
                            "or mask_bits or saves_bits or per_batch_cut"],
                           cwd=src, env=run_env, capture_output=True, text=True)
    assert tests.returncode == 0, (tests.stdout[-3000:], tests.stderr[-3000:])
    assert "runtime error" not in tests.stderr and "AddressSanitizer" not in tests.stderr
