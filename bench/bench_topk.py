"""Global top-k mask (5%, 1%) vs the torch.topk way, ResNet-18 shapes, fp32.

    pytest bench/bench_topk.py --benchmark-json=topk.json && python bench/report.py topk.json
"""

from __future__ import annotations

import pytest

from sparsefl.bench.sparse import topk_workloads

WORKLOADS, NUMEL = topk_workloads()


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_topk(benchmark, workload):
    benchmark.group = "topk-resnet18-fp32"
    benchmark.extra_info.update(bytes_moved=workload.bytes_moved, numel=NUMEL,
                                baseline=workload.baseline)
    benchmark.pedantic(workload.fn, rounds=5, warmup_rounds=1)
