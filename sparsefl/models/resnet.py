"""ResNet-18 with the CIFAR stem (3x3 conv1, stride 1, no max-pool), as in SparsyFed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from sparsefl.nn.batch_norm_act import bn_act


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        # a module, not F.relu: the sparse path can then drop its output and recompute the
        # branch from x in backward (sparsefl/nn/recompute.py)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bn_act: relu(bn(x) + residual), one native op where set_compute enabled it, else
        # these same modules (sparsefl/nn/batch_norm_act.py)
        out = bn_act(self.bn1, self.conv1(x), relu=self.relu1)
        sc = x if len(self.shortcut) == 0 else \
            bn_act(self.shortcut[1], self.shortcut[0](x), relu=False)
        return bn_act(self.bn2, self.conv2(out), residual=sc)


class ResNet18(nn.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(bn_act(self.bn1, self.conv1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
