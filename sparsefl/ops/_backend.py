"""Backend choice for every op: reference | cpp | cuda | triton, or auto.

Order of precedence: the op's `backend=` argument, then the environment variable
SPARSEFL_BACKEND, then "auto".  auto picks the fastest backend that exists for the
tensors' device: cpp on CPU, cuda (else triton) on CUDA, reference otherwise.
Asking for a backend that cannot run raises a ValueError/RuntimeError that says why:
a silent fallback would make benchmark numbers lie.  One exception, with a warning: when
the extension's CUDA kernels cannot run on the GPU at hand (built for other
architectures: "no kernel image"), auto falls back to Triton, then to the reference, and
says so once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from sparsefl import _native

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")


def requested(backend: str | None) -> str:
    """The backend asked for, after the environment variable; validated."""
    name = backend if backend is not None else os.environ.get("SPARSEFL_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"sparsefl: unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def triton_module(name: str) -> ModuleType:
    """sparsefl.triton_kernels.<name>: installed (setup.py maps kernels/ there), or, when
    sparsefl runs from a source checkout on PYTHONPATH, kernels/<name>.py registered
    under the same name."""
    pkg = "sparsefl.triton_kernels"
    try:
        return importlib.import_module(f"{pkg}.{name}")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "kernels"
        if pkg in sys.modules or not (root / f"{name}.py").is_file():
            raise
        spec = importlib.util.spec_from_file_location(
            pkg, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = module
        spec.loader.exec_module(module)
        return importlib.import_module(f"{pkg}.{name}")


def triton_error(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or broken install
        return f"triton is not importable ({exc})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton support for device {device.type}"
    return None


_CUDA_IMAGE: dict[int, str | None] = {}  # device index -> why our kernels cannot run


def _probe_cuda(device: torch.device) -> None:
    """Launches the extension's aggregation kernels on one element: raises if this GPU
    has no kernel image for them."""
    out = torch.zeros(1, device=device)
    idx = torch.zeros(1, dtype=torch.int64, device=device)
    torch.ops.sparsefl_C.sparse_aggregate([idx], [torch.ones(1, device=device)], [1.0], out,
                                          None, 1.0)
    torch.cuda.synchronize(device)


def cuda_image_error(device: torch.device) -> str | None:
    """Why the extension's CUDA kernels cannot run on `device` (None if they can); probed
    once per GPU."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_IMAGE:
        try:
            _probe_cuda(torch.device("cuda", index))
            _CUDA_IMAGE[index] = None
        except RuntimeError as exc:
            _CUDA_IMAGE[index] = str(exc).strip().splitlines()[0] if str(exc) else repr(exc)
            warnings.warn(
                f"sparsefl: the CUDA kernels of this build cannot run on GPU {index} "
                f"({_CUDA_IMAGE[index]}); backend auto falls back to Triton (else the "
                "reference ops). Rebuild for this GPU, e.g. TORCH_CUDA_ARCH_LIST=\"9.0\" "
                "pip install --no-build-isolation .", RuntimeWarning, stacklevel=3)
    return _CUDA_IMAGE[index]


def resolve(backend: str | None, tensors: Sequence[Tensor], *, native_op: str = "perturb",
            triton: bool = True) -> str:
    """The concrete backend that will run on these tensors.

    native_op names the torch.ops.sparsefl_C op behind the kernel (its registrations say
    which devices the native backends cover); triton says whether a Triton kernel exists.
    """
    name = requested(backend)
    if len(tensors) == 0:
        return "reference"  # nothing to compute, and native ops cannot dispatch on no tensor
    device = tensors[0].device
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if _native.has_kernel(native_op, "cpu") else "reference"
        if device.type == "cuda":
            if _native.has_kernel(native_op, "cuda") and cuda_image_error(device) is None:
                return "cuda"
            return "triton" if triton and triton_error(device) is None else "reference"
        return "reference"
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"sparsefl: backend 'cpp' runs on CPU tensors, got {device}")
        if not _native.has_kernel(native_op, "cpu"):
            raise RuntimeError(f"sparsefl: backend 'cpp' unavailable: {_native.LOAD_ERROR}")
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"sparsefl: backend 'cuda' runs on CUDA tensors, got {device}")
        if not _native.has_kernel(native_op, "cuda"):
            raise RuntimeError(f"sparsefl: backend 'cuda' has no {native_op} kernel in this "
                               "build (torch without CUDA, no nvcc, or not written yet)")
        why = cuda_image_error(device)
        if why is not None:
            raise RuntimeError(f"sparsefl: backend 'cuda' cannot run on this GPU: {why}")
    elif name == "triton":
        if not triton:
            raise RuntimeError(f"sparsefl: backend 'triton' has no {native_op} kernel yet")
        why = triton_error(device)
        if why is not None:
            raise RuntimeError(f"sparsefl: backend 'triton' unavailable: {why}")
    return name
