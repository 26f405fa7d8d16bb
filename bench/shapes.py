"""Parameter shapes the benchmarks run on (no model code needed to time kernels)."""

from __future__ import annotations

import torch


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """ResNet-18 with the CIFAR stem: 62 tensors, 11,173,962 parameters for 10 classes."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if s != 1 or cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def make_tensors(shapes, seed: int = 0, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
            for s in shapes]
