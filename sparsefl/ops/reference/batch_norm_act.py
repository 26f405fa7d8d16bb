"""Reference (plain torch) for training-mode BatchNorm fused with a residual add and ReLU.

    y = act(BN(x) + residual),  BN(x) = (x - mean_c) * invstd_c * w_c + b_c,

with the batch statistics of x over every dimension but 1 (the channel), the biased
variance in invstd = 1 / sqrt(var + eps), act = ReLU or identity.  Forward returns
(y, mean, invstd) (float32 statistics, as torch.native_batch_norm saves them) and moves
running_mean / running_var (when given, in place) toward mean and the unbiased variance:
running = (1 - momentum) * running + momentum * batch, exactly nn.BatchNorm's update.

Backward, with dz = grad_y where y > 0 (ReLU; where y is NaN the gradient passes, as
torch's threshold_backward) or grad_y:
    grad_bias = sum(dz),  grad_weight = sum(dz * (x - mean)) * invstd,
    grad_x = (dz - sum(dz) / n - (x - mean) * invstd^2 * sum(dz * (x - mean)) / n) * w * invstd,
    grad_residual = dz  (an empty tensor when not asked for).
Math in float32 whatever the dtype (as the kernels do); outputs in x's dtype, parameter
gradients in the weight's.  This is what `F.relu(bn(x) + residual)` computes, to fp32
rounding (tests/test_batch_norm_act.py checks both against nn.BatchNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _check_x(x: Tensor, op: str) -> None:
    if x.dim() < 2:
        raise ValueError(f"sparsefl.{op}: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"sparsefl.{op}: dtype {x.dtype} is not supported (float32, "
                        "float16, bfloat16)")


def _check_channel(t: Tensor | None, c: int, name: str, op: str) -> None:
    if t is not None and tuple(t.shape) != (c,):
        raise ValueError(f"sparsefl.{op}: {name} must have shape ({c},), got "
                         f"{tuple(t.shape)}")


def _check_like(t: Tensor, x: Tensor, name: str, op: str) -> None:
    if t.shape != x.shape:
        raise ValueError(f"sparsefl.{op}: {name} must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"sparsefl.{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")


def check_forward(x: Tensor, residual: Tensor | None, weight: Tensor | None,
                  bias: Tensor | None, running_mean: Tensor | None,
                  running_var: Tensor | None, eps: float) -> None:
    op = "batch_norm_act"
    _check_x(x, op)
    if x.numel() <= x.shape[1] and x.shape[1] > 0:
        raise ValueError(f"sparsefl.{op}: expected more than 1 value per channel when "
                         f"training, got input of shape {tuple(x.shape)}")
    if not (eps >= 0 and eps != float("inf")):
        raise ValueError(f"sparsefl.{op}: eps must be finite and >= 0, got {eps}")
    if residual is not None:
        _check_like(residual, x, "residual", op)
    c = x.shape[1]
    _check_channel(weight, c, "weight", op)
    _check_channel(bias, c, "bias", op)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"sparsefl.{op}: running_mean and running_var come together")
    _check_channel(running_mean, c, "running stats", op)
    _check_channel(running_var, c, "running stats", op)


def batch_norm_act(x: Tensor, residual: Tensor | None, weight: Tensor | None,
                   bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, momentum: float, eps: float,
                   relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    check_forward(x, residual, weight, bias, running_mean, running_var, eps)
    xf, s = x.detach().float(), _shape(x)
    var, mean = torch.var_mean(xf, dim=_dims(x), correction=0)
    invstd = torch.rsqrt(var + eps)
    z = (xf - mean.view(s)) * invstd.view(s)
    if weight is not None:
        z = z * weight.detach().float().view(s)
    if bias is not None:
        z = z + bias.detach().float().view(s)
    if residual is not None:
        z = z + residual.detach().float()
    if relu:
        z = torch.relu(z)
    if running_mean is not None and running_var is not None:
        n = x.numel() // max(x.shape[1], 1)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(
                (var * (n / max(n - 1, 1))).to(running_var.dtype), alpha=momentum)
    return z.to(x.dtype), mean, invstd


def batch_norm_act_backward(grad_y: Tensor, x: Tensor, y: Tensor, weight: Tensor | None,
                            mean: Tensor, invstd: Tensor, relu: bool,
                            residual_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "batch_norm_act_backward"
    _check_x(x, op)
    _check_like(grad_y, x, "grad_y", op)
    _check_like(y, x, "y", op)
    c = x.shape[1]
    _check_channel(weight, c, "weight", op)
    for t in (mean, invstd):
        if tuple(t.shape) != (c,) or t.dtype != torch.float32:
            raise ValueError(f"sparsefl.{op}: mean and invstd must be float32 tensors of "
                             f"shape ({c},)")
    s, dims = _shape(x), _dims(x)
    g = grad_y.float()
    dz = g.masked_fill(y <= 0, 0) if relu else g
    xmu = x.float() - mean.view(s)
    n = x.numel() // max(c, 1)
    s_dz, s_dzx = dz.sum(dims), (dz * xmu).sum(dims)
    w = weight.detach().float() if weight is not None else torch.ones_like(mean)
    k2 = (invstd * invstd * s_dzx / n).view(s)
    dx = (dz - (s_dz / n).view(s) - xmu * k2) * (w * invstd).view(s)
    pdt = weight.dtype if weight is not None else torch.float32
    dr = dz.to(x.dtype) if residual_grad else x.new_empty(0)
    return dx.to(x.dtype), dr, (s_dzx * invstd).to(pdt), s_dz.to(pdt)
