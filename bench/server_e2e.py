"""The server's side of aggregation from decoded payloads to the new model, eager vs engine.

Payloads arrive as per-layer codec chunks.  Eager: flatten each client's chunks to one
int64 index tensor (`wire.to_flat_pair`) and run the index_add_ loop.  Engine: cut the
chunks into tiles (`wire.to_tiled`) and run the tiled merge.  Also times the two
preparations alone.  ResNet-18 layout, 100 clients x 5%, fp32 values, 2 threads.

    python bench/server_e2e.py [--clients 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsefl import models, ops
from sparsefl.bench.sparse import index_add_aggregate
from sparsefl.codec import SparseChunk
from sparsefl.fl import wire
from sparsefl.fl.layout import Layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layout = Layout(models.build("resnet18", (3, 32, 32), 10))
    clients = []
    for _ in range(args.clients):
        chunks = []
        for e in layout.entries:
            if e.prunable:
                k = max(1, int(e.numel * args.density))
                idx = torch.sort(torch.randperm(e.numel, generator=g)[:k]).values
            else:
                idx = torch.arange(e.numel)
            chunks.append(SparseChunk(e.numel, idx, torch.randn(idx.numel(), generator=g)))
        clients.append(chunks)
    w = [1.0 / args.clients] * args.clients
    base, out = torch.randn(layout.numel), torch.empty(layout.numel)

    def eager():
        return index_add_aggregate([wire.to_flat_pair(layout, ch) for ch in clients], w, base)

    def engine():
        return ops.sparse_aggregate([wire.to_tiled(layout, ch) for ch in clients], w, out=out,
                                    base=base)

    fns = {"eager: to_flat_pair + index_add_ loop": eager,
           "engine: to_tiled + tiled merge": engine,
           "to_flat_pair alone": lambda: [wire.to_flat_pair(layout, ch) for ch in clients],
           "to_tiled alone": lambda: [wire.to_tiled(layout, ch) for ch in clients]}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):  # interleaved
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"{args.clients} clients x {args.density:.0%}, {layout.numel:,} params, "
          f"threads={args.threads}, median of {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k}: {v:.1f} ms")
    a, b = med["eager: to_flat_pair + index_add_ loop"], med["engine: to_tiled + tiled merge"]
    print(f"  eager / engine: {a / b:.2f}x")
    torch.testing.assert_close(eager(), engine(), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    main()
