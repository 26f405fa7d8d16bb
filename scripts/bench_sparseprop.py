"""Issue #25 item 5: weight-only sparse 3x3 convs (the stride-1 shapes of ResNet-18, batch
64), fwd + bwd (dx and dw), 2 threads, interleaved: sparsefl's sparse path (beta = 1, a
fixed support, no activation pruning), SparseProp's two kernels, plain nn.Conv2d.

SparseProp is an optional dev tool, never a dependency:
    pip install pybind11 scipy
    pip install --no-build-isolation sparseprop==0.1.14   # its sdist, built -march=native
    python scripts/bench_sparseprop.py [REPS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from sparseprop.modules import SparseConv2d
from torch import nn

from sparsefl.nn import set_compute, sparsify

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # channels, image side


def candidates(c: int, sparsity: float) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= sparsity)
    ours = sparsify(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False)), 1.0)
    with torch.no_grad():
        ours[0].weight.copy_(conv.weight)
    set_compute(ours, "sparse", fixed_support=True)
    ours.train()
    out: dict[str, nn.Module] = {"plain": conv}
    for von in (False, True):
        out[f"sparseprop(von={von})"] = SparseConv2d.from_dense(conv, vectorizing_over_on=von)
    out["sparsefl"] = ours
    return out


def main(reps: int) -> None:
    torch.set_num_threads(2)
    for sparsity in (0.95, 0.99):
        for c, hw in SHAPES:
            cands = candidates(c, sparsity)
            x = torch.randn(64, c, hw, hw, requires_grad=True)
            gy = torch.randn(64, c, hw, hw)
            times: dict[str, list[float]] = {k: [] for k in cands}
            for m in cands.values():  # warm-up
                m(x).backward(gy)
            for r in range(reps):
                for k in list(cands) if r % 2 == 0 else list(cands)[::-1]:
                    t0 = time.perf_counter()
                    cands[k](x).backward(gy)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            best = min(v for k, v in med.items() if k.startswith("sparseprop"))
            cells = ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
            print(f"{sparsity:.0%} {c}->{c} 3x3 @{hw}: {cells} | sparsefl vs best SparseProp "
                  f"{best / med['sparsefl']:.2f}x, vs plain {med['plain'] / med['sparsefl']:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
