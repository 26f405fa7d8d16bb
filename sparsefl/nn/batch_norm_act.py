"""BatchNorm + residual add + ReLU as one native op, forward and backward.

    y = relu(bn(x) + residual)        (residual and relu optional)

At the sizes FL clients train (ResNet-18 width 8-16, batch 16) eager torch pays ~1 ms
for one BatchNorm + ReLU forward and backward of a 200K-entry tensor (~40x a memory pass;
15-26% of a sparse step); csrc/cpu/batch_norm_act.cpp does it in five passes over
cache-resident channels.  Its definition is sparsefl/ops/reference/batch_norm_act.py,
which equals the eager composition (`eager` below, what a dense model runs): the same
batch statistics and running-stat update, gradients to fp32 rounding (tested).

Models call `bn_act(bn, x, residual, relu)`; it takes the native op only where the
BatchNorm was switched on with `enable(model)` (set_compute does, for sparse compute) and
the call qualifies (training, CPU, a float dtype, the C++ extension built); everywhere
else it is the eager modules, so a dense model is plain torch.  For backward the op keeps
x and its ReLU's mask as bits (1/32 of the output in fp32): the output itself is free as
soon as the next layer has read it (a sparse conv keeps only its pruned input).  With
recompute on (recompute.py), the saved input becomes a recipe made again with the same
kernels, so recomputing changes memory, not a bit of the result.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from sparsefl import _native

_FLAG = "_sparsefl_fused_bn"
# set by recompute.install on a BatchNorm: saving(bn, x, residual, relu, run) runs the op
# with its saved tensors swapped for recipes (sparsefl/nn/recompute.py)
SAVING = "_sparsefl_fused_saving"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def enable(model: nn.Module, on: bool = True) -> int:
    """Let (on) or stop (off) bn_act taking the native op for every BatchNorm of `model`;
    returns how many BatchNorms."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, _BatchNorm):
            if on:
                mod.__dict__[_FLAG] = True
            else:
                mod.__dict__.pop(_FLAG, None)
            n += 1
    return n


def enabled(bn: nn.Module) -> bool:
    return bool(bn.__dict__.get(_FLAG))


def _native_ok(bn: _BatchNorm, x: Tensor, residual: Tensor | None) -> bool:
    return (bn.__dict__.get(_FLAG, False) and bn.training and x.device.type == "cpu"
            and x.dtype in _DTYPES and x.dim() >= 2
            and x.numel() > x.shape[1]  # >1 value per channel: else torch's own error
            and (residual is None or (residual.shape == x.shape
                                      and residual.dtype == x.dtype))
            and _have_op())


@functools.cache
def _have_op() -> bool:
    """The extension loaded and has this op (not an older build)."""
    return _native.LOAD_ERROR is None and hasattr(torch.ops.sparsefl_C, "batch_norm_act_layer")


def eager(bn: nn.Module, x: Tensor, residual: Tensor | None = None,
          relu: nn.Module | bool = True) -> Tensor:
    """The plain-torch composition (the reference): bn, add, then the ReLU module if one
    is given (so its hooks run), F.relu if True."""
    y = bn(x)
    if residual is not None:
        y = y + residual
    if isinstance(relu, nn.Module):
        return relu(y)
    return F.relu(y) if relu else y


def bn_act(bn: nn.Module, x: Tensor, residual: Tensor | None = None,
           relu: nn.Module | bool = True) -> Tensor:
    """relu(bn(x) + residual): the native op where enabled and applicable, else `eager`.
    relu: True, False, or the model's nn.ReLU module (used by the eager path)."""
    if not (isinstance(bn, _BatchNorm) and _native_ok(bn, x, residual)):
        return eager(bn, x, residual, relu)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm
            momentum = 1.0 / float(bn.num_batches_tracked)
    stats = bn.track_running_stats and bn.running_mean is not None
    act = relu if isinstance(relu, bool) else True

    def run() -> Tensor:  # autograd in C++ (csrc/cpu/batch_norm_act.cpp)
        return torch.ops.sparsefl_C.batch_norm_act_layer(
            x, residual, bn.weight, bn.bias, bn.running_mean if stats else None,
            bn.running_var if stats else None, momentum, bn.eps, act)

    saving = bn.__dict__.get(SAVING)
    return saving(bn, x, residual, act, run) if saving is not None else run()


def forward_only(bn: _BatchNorm, x: Tensor, relu: bool) -> Tensor:
    """act(bn(x)) again, bit for bit as bn_act made it in training (batch statistics of
    x; running statistics untouched): recompute.py's recipe."""
    with torch.no_grad():
        return torch.ops.sparsefl_C.batch_norm_act_layer(x, None, bn.weight, bn.bias, None,
                                                         None, 0.0, bn.eps, relu)


__all__ = ["SAVING", "bn_act", "eager", "enable", "enabled", "forward_only"]
