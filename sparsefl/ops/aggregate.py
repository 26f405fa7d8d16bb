"""Weighted sum of many clients' sparse updates, fused with the server update.

    sparse_aggregate(payloads, weights, out=None, base=None, lr=1.0) -> out
        out = base + lr * sum_c weights[c] * payload_c     (dense float32, 1-D)
        out += sum_c weights[c] * payload_c                  (out float64: accumulate)

    SparseAccumulator(numel, group=16)  -- a streaming server's running sum: add()
        payloads as they arrive, result() at the end.  Memory: one float64 vector plus at
        most `group` payloads, whatever the number of clients; bitwise equal to one
        sparse_aggregate over all the payloads in the same order.

payloads: SparseChunk objects, (indices, values) pairs or TiledPayloads over one flat index
space of `numel` elements (taken from out, base or the payloads); indices int64/int32
strictly ascending, values float32/float16/bfloat16.  A pair with an empty index tensor and
numel values is a dense update.  A TiledPayload (sparsefl/ops/tiled.py: int16 offsets into
4096-element tiles plus where each tile's run starts) is the layout the C++ merge reads
fastest; when one payload is tiled, the others are tiled on the way in.  Bitwise
reproducible (fixed client order, float64 per element), and the kernel's working memory
does not grow with the number of clients.

Backends: reference (float64 index_add_), cpp (tiled merge, csrc/cpu/aggregate.cpp),
triton (one scatter per client in client order, kernels/aggregate.py), cuda (one block
per tile, flat and tiled payloads, accumulate mode; csrc/cuda/aggregate.cu:
compile-checked, not yet run on a GPU).  Every backend has every form.
Registered as torch.ops.sparsefl.sparse_aggregate and .sparse_aggregate_tiled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import aggregate as _reference
from sparsefl.ops.tiled import TiledPayload, tile_payload, untile

_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("sparse_aggregate(Tensor[] indices, Tensor[] values, float[] weights, "
            "Tensor(a!) out, Tensor? base, float lr, str backend) -> ()")


def _impl(indices, values, weights, out, base, lr, backend):
    name = _backend.resolve(backend, [out], native_op="sparse_aggregate", triton=True)
    if name == "reference":
        _reference.sparse_aggregate(indices, values, weights, out, base, lr)
    elif name == "triton":
        _triton = _backend.triton_module("aggregate")

        _triton.sparse_aggregate(indices, values, weights, out, base, lr)
    else:
        torch.ops.sparsefl_C.sparse_aggregate(indices, values, weights, out, base, lr)
    torch.autograd.graph.increment_version(out)


_lib.impl("sparse_aggregate", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::sparse_aggregate", lib=_lib)
def _(indices, values, weights, out, base, lr, backend):
    return None


_lib.define("sparse_aggregate_tiled(Tensor[] offsets, Tensor[] local, Tensor[] values, "
            "float[] weights, Tensor(a!) out, Tensor? base, float lr, str backend) -> ()")


def _impl_tiled(offsets, local, values, weights, out, base, lr, backend):
    name = _backend.resolve(backend, [out], native_op="sparse_aggregate_tiled", triton=True)
    if name in ("cpp", "cuda"):  # the tiled merge reads the layout as it is
        torch.ops.sparsefl_C.sparse_aggregate_tiled(offsets, local, values, weights, out, base,
                                                    lr)
        torch.autograd.graph.increment_version(out)
        return
    # reference and Triton take the flat pairs (the tile structure is checked on the way,
    # on the payload's device)
    numel = out.numel()
    if not len(offsets) == len(local) == len(values):
        raise ValueError(f"sparsefl.aggregate: {len(offsets)} offset tensors, {len(local)} "
                         f"local index tensors and {len(values)} value tensors")
    pairs = [untile(TiledPayload(o, i, v, numel), c)
             for c, (o, i, v) in enumerate(zip(offsets, local, values))]
    _impl([p[0] for p in pairs], [p[1] for p in pairs], weights, out, base, lr, name)


_lib.impl("sparse_aggregate_tiled", _impl_tiled, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::sparse_aggregate_tiled", lib=_lib)
def _(offsets, local, values, weights, out, base, lr, backend):
    return None


def _pairs(payloads) -> tuple[list, list[Tensor], int | None]:
    """(indices, values, numel) lists; a TiledPayload stays whole in `indices`."""
    indices, values, numel = [], [], None
    for i, p in enumerate(payloads):
        tiled = isinstance(p, TiledPayload)
        if tiled or (hasattr(p, "indices") and hasattr(p, "values")):
            idx, val = (p, p.values) if tiled else (p.indices, p.values)
            if numel is None:
                numel = p.numel
            elif p.numel != numel:
                raise ValueError(f"sparsefl.aggregate: payload {i} has numel {p.numel}, "
                                 f"payload 0 has {numel}")
        else:
            try:
                idx, val = p
            except (TypeError, ValueError):
                raise TypeError(f"sparsefl.aggregate: payload {i} must be a SparseChunk or an "
                                f"(indices, values) pair, got {type(p).__name__}") from None
        if not (tiled or isinstance(idx, Tensor)) or not isinstance(val, Tensor):
            raise TypeError(f"sparsefl.aggregate: payload {i} indices/values must be tensors")
        indices.append(idx if tiled else idx.contiguous())
        values.append(val.contiguous())
    return indices, values, numel


def sparse_aggregate(payloads: Sequence, weights: Sequence[float], out: Tensor | None = None,
                     base: Tensor | None = None, lr: float = 1.0, *, numel: int | None = None,
                     backend: str | None = None) -> Tensor:
    indices, values, chunk_numel = _pairs(payloads)
    weights = [float(w) for w in weights]
    if len(weights) != len(values):
        raise ValueError(f"sparsefl.aggregate: {len(values)} payloads but {len(weights)} "
                         "weights")
    if not math.isfinite(lr):
        raise ValueError(f"sparsefl.aggregate: lr must be finite, got {lr}")
    sizes = {n for n in (numel, chunk_numel, out.numel() if out is not None else None,
                         base.numel() if base is not None else None) if n is not None}
    if len(sizes) != 1:
        raise ValueError("sparsefl.aggregate: give the size through numel=, out, base or "
                         f"SparseChunk payloads, consistently (got {sorted(sizes)})")
    n = sizes.pop()
    if out is None:  # on the data's device (base, else the first payload's values)
        device = base.device if base is not None else (values[0].device if values else "cpu")
        out = torch.empty(n, dtype=torch.float32, device=device)
    if out.dtype not in (torch.float32, torch.float64) or out.dim() != 1 \
            or not out.is_contiguous():
        raise ValueError("sparsefl.aggregate: out must be a contiguous 1-D float32 tensor "
                         "(or float64, to accumulate into it)")
    if out.dtype == torch.float64 and (base is not None or lr != 1.0):
        raise ValueError("sparsefl.aggregate: a float64 out accumulates; base and lr do not "
                         "apply")
    if base is not None and (base.dtype != torch.float32 or base.dim() != 1):
        raise ValueError("sparsefl.aggregate: base must be a 1-D float32 tensor")
    base = None if base is None else base.contiguous()
    if any(isinstance(i, TiledPayload) for i in indices):
        tiled = [i if isinstance(i, TiledPayload) else tile_payload(i, v, n, which=c)
                 for c, (i, v) in enumerate(zip(indices, values))]
        torch.ops.sparsefl.sparse_aggregate_tiled(
            [t.offsets.contiguous() for t in tiled], [t.local.contiguous() for t in tiled],
            values, weights, out, base, float(lr), _backend.requested(backend))
    else:
        torch.ops.sparsefl.sparse_aggregate(indices, values, weights, out, base, float(lr),
                                            _backend.requested(backend))
    return out


class SparseAccumulator:
    """Streaming weighted sum of sparse payloads: what a server needs when clients arrive
    one by one and must not all be held at once.

    `add(payload, weight)` keeps the payload until `group` are buffered, then merges them
    with one tiled `sparse_aggregate` into a float64 running sum (accumulate mode) and
    drops them.  Every element still sums its contributions in arrival order in float64,
    so the result is bitwise the same for any `group`, and equal to one sparse_aggregate
    over all payloads.  Peak memory: 8 bytes per element plus `group` payloads.
    A bad payload raises ValueError at the merge that includes it and leaves the running
    sum as it was before that merge (the payloads of that group are dropped).
    """

    def __init__(self, numel: int, group: int = 16, device: torch.device | str = "cpu",
                 backend: str | None = None) -> None:
        if numel < 0 or group < 1:
            raise ValueError(f"sparsefl.SparseAccumulator: numel must be >= 0 and group >= 1, "
                             f"got {numel} and {group}")
        self.numel, self.group, self.backend = numel, group, backend
        self.sum = torch.zeros(numel, dtype=torch.float64, device=device)
        self.count = 0
        self._pending: list = []
        self._weights: list[float] = []

    def add(self, payload, weight: float) -> None:
        self._pending.append(payload)
        self._weights.append(float(weight))
        self.count += 1
        if len(self._pending) >= self.group:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, weights = self._pending, self._weights
        self._pending, self._weights = [], []
        sparse_aggregate(pending, weights, out=self.sum, backend=self.backend)

    def result(self, divisor: float = 1.0, base: Tensor | None = None, lr: float = 1.0,
               out: Tensor | None = None) -> Tensor:
        """float32 `base + lr * (sum / divisor)` (base omitted: 0), rounded once.

        divisor: e.g. the total weight, for a weighted mean of unnormalised weights."""
        if not (math.isfinite(divisor) and divisor != 0):
            raise ValueError(f"sparsefl.SparseAccumulator: divisor must be finite and "
                             f"non-zero, got {divisor}")
        self.flush()
        x = self.sum / divisor  # one float64 temporary; the rest is in place
        if lr != 1.0:
            x.mul_(lr)
        if base is not None:
            x.add_(base)  # float32 base promoted per element: bitwise base.double() + x
        if out is None:
            return x.float()
        return out.copy_(x)
