"""Fused SAM/ASAM perturb+restore vs the eager davda54 way, ResNet-18 shapes, fp32.

    pytest bench/bench_sam.py --benchmark-json=sam.json && python bench/report.py sam.json

The copy workload measures the machine's memory bandwidth in the same run; report.py
turns the JSON into the table of docs/benchmarks.md (ratio, GB/s, % of copy bandwidth).
"""

from __future__ import annotations

import pytest

from sparsefl.bench.sam import sam_workloads

WORKLOADS, NUMEL = sam_workloads()


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_sam(benchmark, workload):
    benchmark.group = "sam-resnet18-fp32"
    benchmark.extra_info.update(bytes_per_param=workload.bytes_per_param, numel=NUMEL,
                                baseline=workload.baseline)
    benchmark.pedantic(workload.fn, rounds=30, warmup_rounds=3)
