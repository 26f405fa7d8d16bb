"""SparsyFed's activation cut on one stage-1 layer input (16x16x28x28 post-ReLU, 50% zeros,
keep 45%): the C++ selection and masking against the torch ops a user would write.

    pytest bench/bench_act_selection.py --benchmark-json=act.json && python bench/report.py act.json
"""

from __future__ import annotations

import pytest
import torch

from sparsefl import _native
from sparsefl.ops import _backend

pytestmark = pytest.mark.skipif(not _native.has_cpu_kernels(), reason="kernels not built")

X = torch.randn(16, 16, 28, 28, generator=torch.Generator().manual_seed(0)).relu()
N = X.numel()
K = int(0.45 * N)
TAU = 0.5


def _torch_kth():  # what torch offers: kthvalue on |x|, then the counts
    a = X.abs().reshape(-1)
    tau = a.kthvalue(N - K + 1).values
    return tau, (a > tau).sum(), (a == tau).sum()


TAU_K = torch.ops.sparsefl_C.kth_magnitude_count(X, K)[0] if _native.has_cpu_kernels() else 1.0

CASES = {
    "kth_magnitude_count (C++)": lambda: torch.ops.sparsefl_C.kth_magnitude_count(X, K),
    # per batch, act_cut passes the last batch's cut +- a margin: no sample when it holds
    "kth_magnitude_count, bracket +-10% (C++)": lambda: torch.ops.sparsefl_C.kth_magnitude_count(
        X, K, TAU_K / 1.1, TAU_K * 1.1),
    "torch kthvalue + counts": _torch_kth,
    "topk_compress (C++, the old per-batch dense path)":
        lambda: torch.ops.sparsefl.topk_compress([X], [], K, _backend.requested(None)),
    "torch count_nonzero": lambda: torch.count_nonzero(X),
    "threshold_prune (C++)": lambda: torch.ops.sparsefl_C.threshold_prune(X, TAU),
    "torch abs < tau, count, masked_fill": lambda: (
        lambda d: (X.masked_fill(d, 0), N - int(torch.count_nonzero(d))))(X.abs() < TAU),
}


@pytest.mark.parametrize("name", list(CASES))
def test_act_selection(benchmark, name):
    benchmark.group = "act-cut-16x16x28x28"
    benchmark.extra_info.update(bytes_moved=4 * N, numel=N)
    benchmark.pedantic(CASES[name], rounds=200, warmup_rounds=10)
