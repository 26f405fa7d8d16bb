"""Sparse aggregation (10/100 clients, 5%/1%) vs an index_add_ loop, ResNet-18 size.

    pytest bench/bench_aggregate.py --benchmark-json=agg.json && python bench/report.py agg.json
"""

from __future__ import annotations

import pytest

from sparsefl.bench.sparse import aggregate_workloads

WORKLOADS, NUMEL = aggregate_workloads()


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_aggregate(benchmark, workload):
    benchmark.group = "aggregate-resnet18"
    benchmark.extra_info.update(bytes_moved=workload.bytes_moved, numel=NUMEL,
                                baseline=workload.baseline)
    benchmark.pedantic(workload.fn, rounds=5, warmup_rounds=1)
