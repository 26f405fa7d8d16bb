"""Weight initialisers selected by `model.init`."""

from __future__ import annotations

import math

import torch
from torch import nn

# std of the standard normal truncated to [-2, 2] (scipy.stats.truncnorm(-2, 2).std()):
# dividing by it makes the truncated draw's std exactly 1/sqrt(fan_in)
_TRUNC2_STD = 0.87962566103423978


@torch.no_grad()
def lecun_normal_(model: nn.Module) -> nn.Module:
    """LeCun normal init (as in the SparsyFed authors' code): every Linear/Conv2d weight
    from a normal truncated at 2 std with std 1/sqrt(fan_in), biases zero.  Other modules
    (BatchNorm) keep their init.  Draws from torch's global generator; returns the model."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            std = math.sqrt(1.0 / fan_in) / _TRUNC2_STD
            nn.init.trunc_normal_(m.weight, std=std, a=-2.0 * std, b=2.0 * std)
            if m.bias is not None:
                m.bias.zero_()
    return model


INITS = ("default", "lecun_normal")


def apply_init(model: nn.Module, name: str) -> nn.Module:
    if name == "default":
        return model
    if name == "lecun_normal":
        return lecun_normal_(model)
    raise ValueError(f"unknown init {name!r}; choose one of {INITS}")
