"""Test set-up: the Triton interpreter must be switched on before triton is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
