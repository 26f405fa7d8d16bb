"""Convert a model to Powerprop layers and inspect its weight sparsity."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsefl.nn.powerprop import (
    ACT_THRESHOLDS,
    POWERPROP,
    PowerpropConv2d,
    PowerpropLinear,
    to_omega,
)


def _convert(m: nn.Module, beta: float) -> nn.Module:
    if isinstance(m, nn.Linear):
        new = PowerpropLinear(m.in_features, m.out_features, m.bias is not None, beta=beta)
    else:
        if m.padding_mode != "zeros":
            raise ValueError(f"cannot sparsify Conv2d with padding_mode={m.padding_mode!r}")
        new = PowerpropConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                              m.padding, m.dilation, m.groups, m.bias is not None, beta=beta)
    with torch.no_grad():  # same function as before: theta = the old weight
        new.weight.copy_(to_omega(m.weight, beta))
        if m.bias is not None:
            new.bias.copy_(m.bias)
    return new.to(device=m.weight.device, dtype=m.weight.dtype)


def sparsify(model: nn.Module, beta: float = 1.25) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d with its Powerprop version, in place.

    The converted model computes the same function (theta equals the old weights);
    BatchNorm and biases stay dense.  Returns the model.
    """
    if not beta >= 1.0:
        raise ValueError(f"sparsify: beta must be >= 1, got {beta}")
    for name, child in list(model.named_children()):
        if isinstance(child, POWERPROP):
            continue
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(model, name, _convert(child, beta))
        else:
            sparsify(child, beta)
    return model


def prunable(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, weight) of every Linear/Conv2d layer: what global top-k prunes."""
    return [(f"{name}.weight" if name else "weight", m.weight)
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per prunable weight (one sync per layer; call per round)."""
    return {n: float((w == 0).sum()) / max(w.numel(), 1) for n, w in prunable(model)}


@torch.no_grad()
def set_activation_density(model: nn.Module, enabled: bool = True,
                           threshold: str = "per_batch") -> None:
    """SparsyFed: each Powerprop layer keeps the fraction (1 - s_l) of its saved input,
    s_l being the layer's current weight sparsity (constant during a round).
    threshold="first_batch": conv layers keep |x| >= the threshold of the next training
    batch (the round's first) from then on (the authors' form; powerprop.act_cut)."""
    if threshold not in ACT_THRESHOLDS:
        raise ValueError(f"set_activation_density: threshold must be one of {ACT_THRESHOLDS}, "
                         f"got {threshold!r}")
    for m in model.modules():
        if isinstance(m, POWERPROP):
            m.act_density = float((m.weight != 0).sum()) / max(m.weight.numel(), 1) \
                if enabled else 1.0
            m.act_threshold, m.act_tau = threshold, None
