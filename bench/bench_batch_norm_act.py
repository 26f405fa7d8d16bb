"""BatchNorm (+ residual add) + ReLU, forward and backward, at the shapes of a ResNet-18
width-16 client step (batch 16, 28x28 input): the fused op (sparsefl/nn/batch_norm_act.py,
csrc/cpu/batch_norm_act.cpp) against the eager modules a user would run.

    pytest bench/bench_batch_norm_act.py --benchmark-json=bna.json
    python bench/report.py bna.json

bytes_moved: the fused op's traffic (forward reads x [+ r], writes y and the ReLU mask's
bits; backward reads dy, x and the bits, writes dx [+ dr]), for GB/s against the copy
bandwidth.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsefl import _native
from sparsefl.nn import batch_norm_act as bna

pytestmark = pytest.mark.skipif(not _native.has_kernel("batch_norm_act", "cpu"),
                                reason="kernels not built")

# (channels, side) of the four stages at width 16
SHAPES = [(16, 28), (32, 14), (64, 7), (128, 4)]


def _case(c: int, side: int, residual: bool, fused: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, c, side, side, generator=g).requires_grad_()
    r = torch.randn(16, c, side, side, generator=g).requires_grad_() if residual else None
    gy = torch.randn(16, c, side, side, generator=g)
    bn = nn.BatchNorm2d(c)
    if fused:
        bn = copy.deepcopy(bn)
        bna.enable(bn)
    fn = bna.bn_act if fused else bna.eager

    def step():
        x.grad = None
        fn(bn, x, r, True).backward(gy)

    return step, x.numel()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("c, side", SHAPES, ids=[f"{c}x{s}x{s}" for c, s in SHAPES])
def test_batch_norm_act(benchmark, c, side, residual, fused):
    step, n = _case(c, side, residual, fused)
    benchmark.group = f"bn-act-16x{c}x{side}x{side}-{'add' if residual else 'relu'}"
    benchmark.extra_info.update(bytes_moved=4 * n * (5 + 2 * residual) + n // 4, numel=n)
    benchmark.pedantic(step, rounds=100, warmup_rounds=10)
