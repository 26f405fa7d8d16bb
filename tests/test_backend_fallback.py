"""Backend choice when the extension's CUDA kernels cannot run on the GPU at hand (built
for other architectures): auto falls back to Triton, then the reference, warning once;
asking for cuda explicitly raises with the reason.  Simulated here (no GPU): the probe
and the device are stand-ins."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from sparsefl import _native
from sparsefl.ops import _backend

CUDA_TENSOR = types.SimpleNamespace(device=torch.device("cuda", 0))  # what resolve reads


@pytest.fixture
def no_kernel_image(monkeypatch):
    calls = []

    def probe(device):
        calls.append(device)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the "
                           "device\nmore")

    monkeypatch.setattr(_backend, "_probe_cuda", probe)
    monkeypatch.setattr(_backend, "_CUDA_IMAGE", {})
    monkeypatch.setattr(_native, "has_kernel", lambda op, dev: True)
    return calls


def test_auto_falls_back_to_triton_then_reference_with_one_warning(no_kernel_image,
                                                                   monkeypatch):
    monkeypatch.setattr(_backend, "triton_error", lambda device: None)
    with pytest.warns(RuntimeWarning, match="no kernel image.*falls back to Triton"):
        assert _backend.resolve("auto", [CUDA_TENSOR]) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per GPU: the second choice is silent
        assert _backend.resolve("auto", [CUDA_TENSOR], native_op="topk_mask") == "triton"
    assert len(no_kernel_image) == 1  # probed once
    monkeypatch.setattr(_backend, "triton_error", lambda device: "no triton here")
    assert _backend.resolve("auto", [CUDA_TENSOR]) == "reference"


def test_explicit_cuda_raises_with_the_reason(no_kernel_image):
    with pytest.warns(RuntimeWarning), pytest.raises(
            RuntimeError, match="cannot run on this GPU: CUDA error: no kernel"):
        _backend.resolve("cuda", [CUDA_TENSOR])


def test_a_working_gpu_keeps_cuda(monkeypatch):
    monkeypatch.setattr(_backend, "_probe_cuda", lambda device: None)
    monkeypatch.setattr(_backend, "_CUDA_IMAGE", {})
    monkeypatch.setattr(_native, "has_kernel", lambda op, dev: True)
    assert _backend.resolve("auto", [CUDA_TENSOR]) == "cuda"
    assert _backend.resolve("cuda", [CUDA_TENSOR]) == "cuda"
