"""Models by name: mlp, lenet5, resnet18 (CIFAR stem)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparsefl.models.lenet import LeNet5
from sparsefl.models.mlp import MLP
from sparsefl.models.resnet import ResNet18

NAMES = ("mlp", "lenet5", "resnet18")


def build(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    if name == "mlp":
        return MLP(input_shape, num_classes, **kwargs)
    if name == "lenet5":
        return LeNet5(input_shape, num_classes, **kwargs)
    if name == "resnet18":
        return ResNet18(input_shape, num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {NAMES}")


def head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final linear classifier (FedBABU's head): the last nn.Linear in the model."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ValueError("model has no nn.Linear layer to use as the head")
    return last


__all__ = ["MLP", "NAMES", "LeNet5", "ResNet18", "build", "head"]
