"""Test set-up: without a GPU the Triton interpreter is switched on (before triton is
imported) so the Triton face runs on CPU tensors; with a GPU, Triton compiles for it and
the GPU cases of tests/test_gpu_ops.py run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "auto"'s recorded timings go to a file of this session, never the user's
# ~/.cache/sparsefl nor a SPARSEFL_AUTO_CACHE of their shell (subprocesses inherit it).
_AUTO_DIR = tempfile.mkdtemp(prefix="sparsefl-test-auto-")
os.environ["SPARSEFL_AUTO_CACHE"] = os.path.join(_AUTO_DIR, "compute-auto.json")
atexit.register(shutil.rmtree, _AUTO_DIR, ignore_errors=True)

import pytest  # noqa: E402

import sparsefl  # noqa: E402,F401
from sparsefl import _native  # noqa: E402
from sparsefl.ops import _backend  # noqa: E402


def cpu_backends() -> list:
    """Every backend that can run on CPU tensors here, each as a pytest param."""
    params = [pytest.param("reference", id="reference")]
    no_cpp = f"native extension not loaded: {_native.LOAD_ERROR}"
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        not _native.has_cpu_kernels(), reason=no_cpp)))
    why = _backend.triton_error(torch.device("cpu"))
    params.append(pytest.param("triton", id="triton",
                               marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def gpu_backends() -> list:
    """The GPU faces, each as a pytest param: skipped with the reason where they cannot
    run (no GPU here, a build without CUDA kernels, no triton)."""
    have_gpu = torch.cuda.is_available()
    no_gpu = "no CUDA device (torch.cuda.is_available() is False): GPU faces not run here"
    cuda_why = no_gpu if not have_gpu else (
        None if _native.has_cuda_kernels() else "this build has no CUDA kernels")
    triton_why = no_gpu if not have_gpu else _backend.triton_error(torch.device("cuda"))
    return [pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
                cuda_why is not None, reason=str(cuda_why))),
            pytest.param("triton", id="triton-gpu", marks=pytest.mark.skipif(
                triton_why is not None, reason=str(triton_why)))]


def pruned_resnet(density: float = 0.1):
    """A small Powerprop ResNet-18 (width 8, 3x16x16) with every layer pruned to `density`
    by magnitude (the sparse-compute tests' model)."""
    from sparsefl import ops
    from sparsefl.models.resnet import ResNet18
    from sparsefl.nn import sparsify
    from sparsefl.nn.powerprop import POWERPROP

    torch.manual_seed(0)
    m = sparsify(ResNet18((3, 16, 16), 10, 8), 1.25)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, POWERPROP):
                mod.weight.mul_(ops.topk_mask(mod.weight, density))
    return m


def pruned_mlp(hidden=(16, 12), bias=True, density=0.3, act=0.4, seed=0, beta=1.25):
    """A small Powerprop MLP (1x6x6 -> hidden -> 5) with every layer pruned to `density` by
    magnitude and activation density `act` (the sparse MLP tests' model)."""
    from torch import nn

    from sparsefl import ops
    from sparsefl.models.mlp import MLP
    from sparsefl.nn import sparsify
    from sparsefl.nn.powerprop import POWERPROP

    torch.manual_seed(seed)
    m = MLP((1, 6, 6), 5, hidden)
    if not bias:
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.bias = None
    m = sparsify(m, beta)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, POWERPROP):
                mod.weight.mul_(ops.topk_mask(mod.weight, density))
                mod.act_density = act
    return m


def run_with_isa_off(env: str, code: str) -> None:
    """Run `code` (Python, from the repository root, `tests` importable) in a subprocess
    with the ISA switch `env` set to 1 -- the kernels choose their ISA once per process,
    so the AVX2 and portable paths need a process of their own -- and assert that it
    printed 'ok'."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests')\n"
                          + code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, **{env: "1"}), timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
