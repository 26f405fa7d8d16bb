"""A plain multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from sparsefl.nn.sparse_compute import chain_forward


class MLP(nn.Sequential):
    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden: Sequence[int] = (200, 200)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # sparse compute (set_compute): the whole chain as one op when it applies
        if "_sparse_chain" in self.__dict__:
            y = chain_forward(self, x)
            if y is not None:
                return y
        return super().forward(x)
