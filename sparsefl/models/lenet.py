"""The LeNet-5-style CNN of FedSAM (Caldarola et al. 2022; Hsu et al. 2020):
conv64-5x5, pool, conv64-5x5, pool, FC384, FC192, FC classes.  No BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        if min(input_shape[1:]) < 13:
            raise ValueError(f"lenet5 needs images of at least 13x13, got {tuple(input_shape)}")
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU(),
            nn.Linear(192, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
