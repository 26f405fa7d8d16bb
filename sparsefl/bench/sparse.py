"""Top-k, aggregation and codec workloads on ResNet-18 shapes (11.17M params).

Eager baselines, written here the way the field's code does it:
- global top-k mask: torch.cat of |w|, torch.topk for the k-th value, a compare per tensor;
- aggregation: a float32 accumulator and one index_add_ per client, then base + acc.
Fused: sparsefl.ops.topk_mask / sparse_aggregate.  Byte counts are the design's reads and
writes (top-k: 3 read passes + a read/write pass; aggregation: payloads + base + out).
"""

from __future__ import annotations

import torch

from sparsefl import codec, ops
from sparsefl.bench.report import Workload, report
from sparsefl.bench.sam import make_tensors, resnet18_shapes
from sparsefl.bench.timing import measure_interleaved


def copy_workload(n: int, device: str = "cpu") -> Workload:
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return Workload("copy (x.copy_)", lambda: dst.copy_(src), 8 * n, None)


def topk_workloads(seed: int = 0, device: str = "cpu", backend: str | None = None,
                   shapes=None) -> tuple[list[Workload], int]:
    xs = make_tensors(shapes or resnet18_shapes(), seed, device=device)
    n = sum(x.numel() for x in xs)

    def eager(density: float):
        flat = torch.cat([x.flatten() for x in xs]).abs()
        thr = torch.topk(flat, ops.keep_count(n, density), sorted=False).values.min()
        return [x.abs() >= thr for x in xs]

    def eager_kth(density: float):  # the other way the field writes it
        flat = torch.cat([x.flatten() for x in xs]).abs()
        thr = flat.kthvalue(n - ops.keep_count(n, density) + 1).values
        return [x.abs() >= thr for x in xs]

    out = [copy_workload(n, device)]
    for d in (0.05, 0.01):
        out.append(Workload(f"top-k mask {d:.0%} eager (torch.topk)",
                            lambda d=d: eager(d), None, None))
        out.append(Workload(f"top-k mask {d:.0%} eager (kthvalue threshold)",
                            lambda d=d: eager_kth(d), None, None))
        out.append(Workload(f"top-k mask {d:.0%} fused",
                            lambda d=d: ops.topk_mask(xs, d, backend=backend),
                            17 * n, f"top-k mask {d:.0%} eager (torch.topk)"))
    return out, n


def codec_pack_workloads(seed: int = 0, device: str = "cpu", density: float = 0.05,
                         shapes=None) -> tuple[list[Workload], int]:
    """The device side of encoding an update (sparsefl.fl.wire): a global top-k's kept
    entries of every tensor gathered into one host copy (indices and float32 value bits
    in one int64 tensor, `wire._to_host`), against the eager way (each tensor's indices
    and values copied to the host one by one).  Bytes: the kept entries' index + value
    reads and the one copy's writes."""
    from sparsefl.fl import wire

    xs = make_tensors(shapes or resnet18_shapes(), seed, device=device)
    n = sum(x.numel() for x in xs)
    masks = ops.topk_mask(xs, density)
    idxs = [m.reshape(-1).nonzero().flatten() for m in masks]
    vals = [x.reshape(-1)[i] for x, i in zip(xs, idxs)]
    k = sum(len(i) for i in idxs)

    def eager():
        return [(i.cpu(), v.cpu()) for i, v in zip(idxs, vals)]

    out = [copy_workload(n, device),
           Workload(f"pack {density:.0%} eager (.cpu() per tensor)", eager, None, None),
           Workload(f"pack {density:.0%} one copy (wire._to_host)",
                    lambda: wire._to_host(idxs, vals), 12 * k + 16 * k,
                    f"pack {density:.0%} eager (.cpu() per tensor)")]
    return out, n


def aggregate_workloads(seed: int = 0, cases=((10, 0.05), (100, 0.05), (100, 0.01)),
                        device: str = "cpu", backend: str | None = None, shapes=None
                        ) -> tuple[list[Workload], int]:
    n = sum(torch.Size(s).numel() for s in shapes or resnet18_shapes())
    g = torch.Generator().manual_seed(seed)
    base, out = torch.randn(n, device=device), torch.empty(n, device=device)
    work = [copy_workload(n, device)]
    be = backend
    for C, d in cases:
        k = int(n * d)
        pays = [(torch.sort(torch.randperm(n, generator=g)[:k]).values.to(device),
                 torch.randn(k, generator=g).to(device)) for _ in range(C)]
        pays32 = [(i.int(), v) for i, v in pays]
        tiled = [ops.tile_payload(i, v, n, backend=be) for i, v in pays32]
        w = [1.0 / C] * C

        def eager(pays=pays, w=w):
            return index_add_aggregate(pays, w, base)

        name = f"aggregate {C} clients x {d:.0%}"
        work.append(Workload(f"{name} eager (index_add_)", eager, None, None))
        work.append(Workload(f"{name} fused, int64 idx",
                             lambda p=pays, w=w: ops.sparse_aggregate(p, w, out=out, base=base,
                                                                      backend=be),
                             C * k * 12 + 8 * n, f"{name} eager (index_add_)"))
        work.append(Workload(f"{name} fused, int32 idx",
                             lambda p=pays32, w=w: ops.sparse_aggregate(p, w, out=out,
                                                                        base=base, backend=be),
                             C * k * 8 + 8 * n, f"{name} eager (index_add_)"))
        # the layout the engine hands the merge (ops.tile_payload, made at decode time)
        work.append(Workload(f"{name} fused, tiled int16 idx",
                             lambda p=tiled, w=w: ops.sparse_aggregate(p, w, out=out, base=base,
                                                                       backend=be),
                             C * k * 6 + 8 * n, f"{name} eager (index_add_)"))
        # the same, with the tiling of the int64 payloads counted as aggregation work
        work.append(Workload(f"{name} tile_payload + fused",
                             lambda p=pays, w=w: ops.sparse_aggregate(
                                 [ops.tile_payload(i, v, n, backend=be) for i, v in p], w,
                                 out=out, base=base, backend=be),
                             None, f"{name} eager (index_add_)"))
    return work, n


def index_add_aggregate(pays, weights, base: torch.Tensor) -> torch.Tensor:
    """The eager baseline: a float32 accumulator, one index_add_ per client (int64
    indices), then base + acc -- how FL code aggregates sparse updates in plain torch."""
    acc = torch.zeros_like(base)
    for (i, v), w in zip(pays, weights):
        acc.index_add_(0, i, v * w)
    return base + acc


def codec_table(seed: int = 0) -> str:
    xs = make_tensors(resnet18_shapes(), seed)
    numels = [x.numel() for x in xs]
    n = sum(numels)
    dense = codec.dense_bytes(n)
    rows = ["| sparsity | values | payload bytes | bytes/param | dense fp32 / payload |",
            "|---:|---|---:|---:|---:|"]
    for sparsity in (0.9, 0.95, 0.99):
        idx, val = ops.topk_compress(xs, 1 - sparsity)
        chunks = codec.split_flat(idx, val, numels)
        for dt in (torch.float32, torch.float16):
            size = len(codec.encode(chunks, dt))
            rows.append(f"| {sparsity:.0%} | {str(dt).split('.')[-1]} | {size:,} | "
                        f"{size / n:.4f} | {dense / size:.1f} |")
    return (f"dense fp32: {dense:,} bytes ({n:,} params)\n\n" + "\n".join(rows) + "\n\n"
            + codec_timing(xs))


def codec_timing(xs: list[torch.Tensor], density: float = 0.05, rounds: int = 15) -> str:
    """Encode/decode of one ResNet-18 update at `density` with fp16 values, the C++ codec
    against the numpy reference, in units of one dense fp32 copy of the model (same
    process, interleaved)."""
    numels = [x.numel() for x in xs]
    n = sum(numels)
    idx, val = ops.topk_compress(xs, density)
    chunks = codec.split_flat(idx, val, numels)
    blob = codec.encode(chunks, torch.float16)
    starts = [0, *torch.tensor(numels).cumsum(0)[:-1].tolist()]
    src, dst = torch.randn(n), torch.empty(n)
    fns = {
        "dense fp32 copy of the model": lambda: dst.copy_(src),
        "encode, reference (numpy)": lambda: codec.encode(chunks, torch.float16,
                                                          backend="reference"),
        "encode, C++": lambda: codec.encode(chunks, torch.float16, backend="cpp"),
        "decode, reference (numpy)": lambda: codec.decode(blob, backend="reference"),
        "decode, C++": lambda: codec.decode(blob, backend="cpp"),
        "decode to the tiled layout, reference": lambda: codec.decode_tiled(
            blob, starts, numels, n, backend="reference"),
        "decode to the tiled layout, C++": lambda: codec.decode_tiled(
            blob, starts, numels, n, backend="cpp"),
    }
    res = measure_interleaved(fns, rounds=rounds, warmup=2)
    copy = res["dense fp32 copy of the model"].median_s
    rows = [f"payload: {len(blob):,} bytes ({density:.0%} of {n:,} params, fp16 values, "
            f"{len(numels)} tensors); {rounds} interleaved rounds, "
            f"threads={torch.get_num_threads()}", "",
            "| operation | median ms | x one dense fp32 copy |", "|---|---:|---:|"]
    for name, t in res.items():
        rows.append(f"| {name} | {t.median_s * 1e3:.2f} | {t.median_s / copy:.2f} |")
    return "\n".join(rows)


def run(what: str, rounds: int = 10, device: str = "cpu", backend: str | None = None) -> str:
    if what == "codec":
        return codec_table()
    workloads, n = (topk_workloads(device=device, backend=backend) if what == "topk" else
                    aggregate_workloads(device=device, backend=backend))
    results = measure_interleaved({w.name: w.fn for w in workloads}, rounds=rounds, warmup=1)
    head = (f"{what}, ResNet-18 shapes ({n:,} params), device={device}, "
            f"threads={torch.get_num_threads()}, {rounds} rounds, interleaved\n\n")
    return head + report(results, workloads, n, "copy (x.copy_)")
