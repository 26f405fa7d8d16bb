"""A sparse MLP's local training, per epoch: torch's step loop vs one sparse_mlp_sgd call.

    pytest bench/bench_sparse_mlp_sgd.py --benchmark-json=mlp_sgd.json

An epoch of 20 batches (forward + backward + SGD at lr 0, so that every round does the same
work) at 90% and 95% sparsity: "plain" nn.Linear + torch SGD, "dense" / "sparse" Powerprop
layers in the step loop, "fused" every step in one call.  The table with ratios comes from
`sparsefl bench sparse-train` (section "Local training of an MLP").
"""

from __future__ import annotations

import pytest

from sparsefl.bench.sparse_train import TRAIN_BATCHES, TRAIN_MODELS, TRAIN_MODES, make_training


@pytest.mark.parametrize("mode", TRAIN_MODES)
@pytest.mark.parametrize("density", [0.1, 0.05])
@pytest.mark.parametrize("model", TRAIN_MODELS, ids=[m[0].split()[0] + m[0].split()[-1]
                                                     for m in TRAIN_MODELS])
def test_training_epoch(benchmark, model, density, mode):
    name, shape, hidden, batch = model
    benchmark.group = f"{name} b{batch} {1 - density:.0%} ({TRAIN_BATCHES} steps)"
    benchmark.extra_info.update(mode=mode, steps=TRAIN_BATCHES)
    benchmark.pedantic(make_training(shape, hidden, batch, density, mode), rounds=5,
                       warmup_rounds=1)
