"""Powerprop layers and client steps, dense vs sparse compute (sparsefl.ops.sparse_conv).

    pytest bench/bench_sparse_conv.py --benchmark-json=sparse.json

The full tables (90/95/99%, auto, FLOPs, peak memory) come from `sparsefl bench
sparse-train`; this suite times the 95% cases of the acceptance: the ResNet-18 convs at
batch 64, the MLP's layers at batch 32, and the ResNet-18 / MLP client steps ("keep":
sparse without recomputing the BatchNorm inputs).
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparsefl.bench.sparse_train import _pass, _step, layer_cases, make_step
from sparsefl.nn import set_compute

CASES = layer_cases(0.05)
STEPS = [("resnet18", 64), ("resnet18", 16), ("mlp", 32)]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer(benchmark, case, mode):
    benchmark.group = f"layer {case.name} 95%"
    m = copy.deepcopy(case.layer)
    set_compute(m, mode)
    m.train()
    gy = torch.randn(m(case.x.detach()).shape)
    benchmark.extra_info.update(dense_flops=case.dense_flops, mode=mode)
    benchmark.pedantic(_pass(m, case.x, gy), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["plain", "dense", "sparse", "keep"])
@pytest.mark.parametrize("step", STEPS, ids=[f"{n}-b{b}" for n, b in STEPS])
def test_step(benchmark, step, mode):
    name, batch = step
    benchmark.group = f"step {name} batch {batch} 95%"
    model, x, y = make_step(name, batch, 0.05, mode)
    benchmark.pedantic(_step(model, x, y), rounds=5, warmup_rounds=1)
