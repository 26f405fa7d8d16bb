"""Training-mode BatchNorm + residual add + ReLU, forward and backward, as one op each.

    batch_norm_act(x, residual, weight, bias, running_mean, running_var, momentum, eps,
                   relu)                      -> (y, mean, invstd); running stats in place
    batch_norm_act_backward(grad_y, x, y, weight, mean, invstd, relu, residual_grad)
                                              -> (grad_x, grad_residual, grad_weight,
                                                  grad_bias)

Definition: sparsefl/ops/reference/batch_norm_act.py.  Backends: reference (plain torch),
cpp (csrc/cpu/batch_norm_act.cpp).  No CUDA or Triton kernel on purpose: the per-op cost
this removes is a CPU one (eager BatchNorm on small tensors), and cuDNN's BatchNorm is
already one kernel; on CUDA tensors `auto` runs the reference.  Registered as
torch.ops.sparsefl.batch_norm_act / batch_norm_act_backward; autograd through it:
sparsefl.nn.batch_norm_act.bn_act (which calls the C++ op directly, without this
dispatch, on its hot path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import batch_norm_act as _ref

__all__ = ["batch_norm_act", "batch_norm_act_backward"]

_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("batch_norm_act(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
            "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, "
            "bool relu, str backend) -> (Tensor, Tensor, Tensor)")
_lib.define("batch_norm_act_backward(Tensor grad_y, Tensor x, Tensor y, Tensor? weight, "
            "Tensor mean, Tensor invstd, bool relu, bool residual_grad, str backend) "
            "-> (Tensor, Tensor, Tensor, Tensor)")


def _native(backend: str, x: Tensor, op: str) -> bool:
    return _backend.resolve(backend, [x], native_op=op, triton=False) == "cpp"


def _forward_impl(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu,
                  backend):
    if _native(backend, x, "batch_norm_act"):
        return torch.ops.sparsefl_C.batch_norm_act(x, residual, weight, bias, running_mean,
                                                   running_var, momentum, eps, relu)
    return _ref.batch_norm_act(x, residual, weight, bias, running_mean, running_var,
                               momentum, eps, relu)


def _backward_impl(grad_y, x, y, weight, mean, invstd, relu, residual_grad, backend):
    if _native(backend, x, "batch_norm_act_backward"):
        return torch.ops.sparsefl_C.batch_norm_act_backward(grad_y, x, y, weight, mean,
                                                            invstd, relu, residual_grad)
    return _ref.batch_norm_act_backward(grad_y, x, y, weight, mean, invstd, relu,
                                        residual_grad)


_lib.impl("batch_norm_act", _forward_impl, "CompositeExplicitAutograd")
_lib.impl("batch_norm_act_backward", _backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::batch_norm_act", lib=_lib)
def _(x, residual, weight, bias, running_mean, running_var, momentum, eps, relu, backend):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float32),
            x.new_empty(c, dtype=torch.float32))


@torch.library.register_fake("sparsefl::batch_norm_act_backward", lib=_lib)
def _(grad_y, x, y, weight, mean, invstd, relu, residual_grad, backend):
    pdt = weight.dtype if weight is not None else torch.float32
    c = x.shape[1]
    return (torch.empty_like(x), torch.empty_like(x) if residual_grad else x.new_empty(0),
            x.new_empty(c, dtype=pdt), x.new_empty(c, dtype=pdt))


def batch_norm_act(x: Tensor, residual: Tensor | None = None, weight: Tensor | None = None,
                   bias: Tensor | None = None, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, momentum: float = 0.1,
                   eps: float = 1e-5, relu: bool = True, *,
                   backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """y = relu(BN(x) + residual) with x's batch statistics -> (y, mean, invstd); the
    running statistics, when given, are updated in place (no autograd: see
    sparsefl.nn.batch_norm_act.bn_act)."""
    return torch.ops.sparsefl.batch_norm_act(x, residual, weight, bias, running_mean,
                                             running_var, float(momentum), float(eps),
                                             bool(relu), _backend.requested(backend))


def batch_norm_act_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight: Tensor | None,
                            mean: Tensor, invstd: Tensor, relu: bool = True,
                            residual_grad: bool = False, *, backend: str | None = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of batch_norm_act -> (grad_x, grad_residual or an empty tensor,
    grad_weight, grad_bias)."""
    return torch.ops.sparsefl.batch_norm_act_backward(
        grad_y, x, y, weight, mean, invstd, bool(relu), bool(residual_grad),
        _backend.requested(backend))
