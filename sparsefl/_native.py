"""Loads the native extension sparsefl._C once; never fails the import of sparsefl.

Loading the shared library registers the C++ (and, when built, CUDA) kernels with the
PyTorch dispatcher under torch.ops.sparsefl_C.*.  If it cannot be loaded, sparsefl falls
back to the reference ops and warns once, with the reason.
"""

from __future__ import annotations

import os
import warnings

import torch

LOAD_ERROR: str | None = None

try:
    from sparsefl import _C  # noqa: F401  (loading registers the ops)
except Exception as exc:  # ImportError, OSError (ABI mismatch), ...
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    if os.environ.get("SPARSEFL_BACKEND", "auto") not in ("reference", "triton"):
        warnings.warn(
            "sparsefl: the native extension sparsefl._C could not be loaded "
            f"({LOAD_ERROR}); falling back to the reference (plain torch) ops. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=2,
        )


def has_kernel(op: str, device_type: str) -> bool:
    """Whether sparsefl._C registered torch.ops.sparsefl_C.<op> for this device type."""
    if LOAD_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"sparsefl_C::{op}", key)


def has_cpu_kernels() -> bool:
    return LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    return has_kernel("perturb", "cuda")
