"""Sparse Powerprop layer ops: compute a Conv2d/Linear on the support of its weight.

    pack_support(omega)                                   -> Support (once per round)
    sparse_conv_forward(x, omega, beta, support, bias, stride, padding)      -> y
    sparse_act_pack(x, k, kernel, stride, padding)        -> ActPack (what backward reads)
    sparse_conv_backward(dy, pack, omega, beta, support, x_shape, stride, padding,
                         need_dx=True, need_dw=True)      -> (dx, domega)

theta = sign(omega)|omega|^beta is formed on the support values inside the kernels, and
the weight gradient is Powerprop's domega (chain rule fused), nonzero only on the support.
Linear layers are the 1x1 case: pass x as (B, C, 1, 1) and omega as (Co, C, 1, 1).
Definitions: sparsefl/ops/reference/sparse_conv.py.  Backends: reference (plain torch),
cpp (csrc/cpu/sparse_conv/, the fast path on CPUs).  There is no CUDA or Triton kernel
on purpose: unstructured 95% sparsity rarely beats cuDNN/cuBLAS on a GPU, so on CUDA
tensors `auto` runs the reference, i.e. dense cuDNN with the same semantics.
Registered as torch.ops.sparsefl.sparse_conv_forward / sparse_act_pack /
sparse_conv_backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import sparse_conv as _ref
from sparsefl.ops.reference.sparse_conv import LANES, Support

__all__ = ["ActPack", "LANES", "Support", "pack_support", "sparse_act_pack",
           "sparse_conv_backward", "sparse_conv_forward"]


class ActPack(NamedTuple):
    """A pruned layer input as the weight-gradient kernel reads it (see the reference)."""

    ptr: Tensor  # int64 [ceil(N/16) * C + 1]
    q: Tensor    # int32 positions
    v: Tensor    # float32 values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("sparse_conv_forward(Tensor x, Tensor omega, float beta, Tensor rowptr, "
            "Tensor cols, Tensor? bias, int[] stride, int[] padding, str backend) -> Tensor")
_lib.define("sparse_act_pack(Tensor x, int k, int[] kernel, int[] stride, int[] padding, "
            "str backend, float? tau=None) -> (Tensor, Tensor, Tensor)")
_lib.define("sparse_conv_backward(Tensor grad_output, Tensor xptr, Tensor xq, Tensor xv, "
            "Tensor omega, float beta, Tensor rowptr, Tensor cols, Tensor cptr, Tensor cent, "
            "int[] x_shape, int[] stride, int[] padding, bool need_dx, bool need_dw, "
            "str backend) -> (Tensor, Tensor)")


def _native(backend: str, tensors: Sequence[Tensor], op: str) -> bool:
    return _backend.resolve(backend, list(tensors), native_op=op, triton=False) == "cpp"


def pack_support(omega: Tensor, backend: str | None = None) -> Support:
    """The support (nonzeros) of omega, in both groupings the kernels read (definition:
    sparsefl/ops/reference/sparse_conv.py; C++ on CPU tensors: one pass, no sort)."""
    if isinstance(omega, Tensor) and omega.dim() in (2, 4) and _native(
            backend or "auto", [omega], "pack_support"):
        return Support(*torch.ops.sparsefl_C.pack_support(omega.detach()))
    return _ref.pack_support(omega)


def _forward_impl(x, omega, beta, rowptr, cols, bias, stride, padding, backend):
    if _native(backend, [x], "sparse_conv_forward"):
        return torch.ops.sparsefl_C.sparse_conv_forward(x, omega, beta, rowptr, cols, bias,
                                                        stride, padding)
    return _ref.sparse_conv_forward(x, omega, beta, rowptr, cols, bias, stride, padding)


def _pack_impl(x, k, kernel, stride, padding, backend, tau=None):
    if _native(backend, [x], "sparse_act_pack"):
        return torch.ops.sparsefl_C.sparse_act_pack(x, k, kernel, stride, padding, tau)
    return _ref.sparse_act_pack(x, k, kernel, stride, padding, tau)


def _backward_impl(dy, xptr, xq, xv, omega, beta, rowptr, cols, cptr, cent, x_shape, stride,
                   padding, need_dx, need_dw, backend):
    if _native(backend, [dy], "sparse_conv_backward"):
        dx, dw = torch.ops.sparsefl_C.sparse_conv_backward(
            dy, xptr, xq, xv, omega, beta, rowptr, cols, cptr, cent, x_shape, stride, padding,
            need_dx, need_dw)
    else:
        dx, dw = _ref.sparse_conv_backward(dy, xptr, xq, xv, omega, beta, rowptr, cols, cptr,
                                           cent, x_shape, stride, padding, need_dx, need_dw)
    # The schema returns tensors: an output not asked for is an empty tensor.
    return (dx if dx is not None else dy.new_empty(0),
            dw if dw is not None else omega.new_empty(0))


_lib.impl("sparse_conv_forward", _forward_impl, "CompositeExplicitAutograd")
_lib.impl("sparse_act_pack", _pack_impl, "CompositeExplicitAutograd")
_lib.impl("sparse_conv_backward", _backward_impl, "CompositeExplicitAutograd")


def _out_hw(x_shape, omega, stride, padding):
    return ((x_shape[2] + 2 * padding[0] - omega.shape[2]) // stride[0] + 1,
            (x_shape[3] + 2 * padding[1] - omega.shape[3]) // stride[1] + 1)


@torch.library.register_fake("sparsefl::sparse_conv_forward", lib=_lib)
def _(x, omega, beta, rowptr, cols, bias, stride, padding, backend):
    oh, ow = _out_hw(x.shape, omega, stride, padding)
    return x.new_empty(x.shape[0], omega.shape[0], oh, ow)


@torch.library.register_fake("sparsefl::sparse_act_pack", lib=_lib)
def _(x, k, kernel, stride, padding, backend, tau=None):
    n = x.shape[0]
    groups = -(-n // LANES) * x.shape[1] * stride[0] * stride[1] + 1
    ctx = torch.library.get_ctx()
    nnz = k if k >= 0 else ctx.new_dynamic_size()
    return (x.new_empty(groups, dtype=torch.int64), x.new_empty(nnz, dtype=torch.int32),
            x.new_empty(nnz, dtype=torch.float32))


@torch.library.register_fake("sparsefl::sparse_conv_backward", lib=_lib)
def _(dy, xptr, xq, xv, omega, beta, rowptr, cols, cptr, cent, x_shape, stride, padding,
      need_dx, need_dw, backend):
    dx = dy.new_empty(x_shape) if need_dx else dy.new_empty(0)
    dw = omega.new_empty(omega.shape) if need_dw else omega.new_empty(0)
    return dx, dw


def sparse_conv_forward(x: Tensor, omega: Tensor, beta: float, support: Support,
                        bias: Tensor | None = None, stride: Sequence[int] = (1, 1),
                        padding: Sequence[int] = (0, 0), *,
                        backend: str | None = None) -> Tensor:
    """conv2d(x, theta_S, bias, stride, padding) with theta = sign(omega)|omega|^beta on S."""
    return torch.ops.sparsefl.sparse_conv_forward(
        x, omega, float(beta), support.rowptr, support.cols, bias, list(stride), list(padding),
        _backend.requested(backend))


def sparse_act_pack(x: Tensor, k: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1),
                    padding: Sequence[int] = (0, 0), *, tau: float | None = None,
                    backend: str | None = None) -> ActPack:
    """The k largest-|x| entries of x (k = -1: every nonzero; k = -1 with `tau`: every
    entry with |x| >= tau, one pass and no selection), packed for the weight gradient of a
    layer with this kernel, stride and padding."""
    return ActPack(*torch.ops.sparsefl.sparse_act_pack(
        x, int(k), list(kernel), list(stride), list(padding), _backend.requested(backend),
        None if tau is None else float(tau)))


def sparse_conv_backward(dy: Tensor, pack: ActPack, omega: Tensor, beta: float,
                         support: Support, x_shape: Sequence[int], stride: Sequence[int],
                         padding: Sequence[int], *, need_dx: bool = True, need_dw: bool = True,
                         backend: str | None = None) -> tuple[Tensor | None, Tensor | None]:
    """(dx, domega) of the sparse layer; domega is zero off the support."""
    dx, dw = torch.ops.sparsefl.sparse_conv_backward(
        dy, pack.ptr, pack.q, pack.v, omega, float(beta), support.rowptr, support.cols,
        support.cptr, support.cent,
        list(x_shape), list(stride), list(padding), need_dx, need_dw,
        _backend.requested(backend))
    return (dx if need_dx else None), (dw if need_dw else None)

