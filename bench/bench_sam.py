"""Fused SAM/ASAM perturb+restore vs the eager davda54 way, ResNet-18 shapes, fp32.

    pytest bench/bench_sam.py --benchmark-json=sam.json && python bench/report.py sam.json
"""

from __future__ import annotations

import pytest

from sparsefl.bench.sam import sam_workloads

WORKLOADS, NUMEL = sam_workloads()


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_sam(benchmark, workload):
    benchmark.group = "sam-resnet18-fp32"
    benchmark.extra_info.update(bytes_moved=workload.bytes_moved, numel=NUMEL,
                                baseline=workload.baseline)
    benchmark.pedantic(workload.fn, rounds=30, warmup_rounds=3)
